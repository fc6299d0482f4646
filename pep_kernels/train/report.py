"""Sizes and plots of search results."""

import math

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def sparse_bytes(num_rows, dim, nnz, value_bytes=4):
    """Bytes of a per-row compressed table: int64 row offsets, fp32 values, and per entry a
    column id (uint8 for d <= 256, else int16) or per row a bitmask of d bits, whichever is
    smaller for this table (the layouts of the sparse-row store)."""
    column_ids = nnz * (1 if dim <= 256 else 2)
    bitmasks = num_rows * math.ceil(dim / 8)
    return (num_rows + 1) * 8 + nnz * value_bytes + min(column_ids, bitmasks)


def plot_auc_vs_parameters(rows, baseline, path):
    """Test AUC of each retrained table against its non-zero count, with the full table's."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["nnz"] for r in rows], [r["test_auc"] for r in rows], "o-", label="PEP, retrained")
    ax.axhline(baseline["test_auc"], color="gray", ls="--", label="full table")
    if rows:  # a search that reached no budget leaves only the full table's line
        ax.set_xscale("log")
    ax.set_xlabel("embedding parameters (non-zeros)")
    ax.set_ylabel("test AUC")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def planned_vs_reached_lines(summary):
    """One line per budget of a search summary: planned step, step reached, count there."""
    lines = [f"{'budget (non-zeros)':>18} {'sparsity':>9} {'planned step':>12} {'reached step':>12} {'off by':>7} "
             f"{'non-zeros':>10}"]
    for target in summary["targets"]:
        planned, reached = target["planned_step"], target["reached_step"]
        off = f"{(reached - planned) / planned:+.0%}" if planned and reached is not None else "-"
        lines.append(f"{target['budget']:>18} {1 - target['budget'] / summary['table_size']:>9.1%} "
                     f"{planned if planned is not None else '-':>12} "
                     f"{reached if reached is not None else 'not reached':>12} {off:>7} "
                     f"{target['nnz'] if target['nnz'] is not None else '-':>10}")
    return lines


def plot_planned_vs_reached(summary, path):
    """Sparsity over a search's steps, with its plan (budget pruning) and each budget's planned
    and reached step."""
    from .controller import BudgetController

    history, table_size, plan = summary["history"], summary["table_size"], summary.get("plan")
    steps = [h[0] for h in history]
    planned_nnz = None if plan is None else \
        BudgetController(summary["budgets"], plan["planned_steps"], plan["initial_nnz"]).planned_nnz
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.plot(steps, [1 - h[1] / table_size for h in history], color="C0", label="measured")
    if planned_nnz is not None and steps:
        ax.plot(steps, [1 - planned_nnz(s) / table_size for s in steps], color="gray", ls="--", label="plan")
    for target in summary["targets"]:
        sparsity = 1 - target["budget"] / table_size
        ax.axhline(sparsity, color="lightgray", lw=0.8)
        if target["planned_step"] is not None:
            ax.plot(target["planned_step"], sparsity, "o", mfc="none", color="gray")
        if target["reached_step"] is not None:
            ax.plot(target["reached_step"], 1 - target["nnz"] / table_size, "x", color="C3")
    ax.set_xlabel("step")
    ax.set_ylabel("sparsity")
    ax.set_title("o planned, x reached", fontsize=9)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
