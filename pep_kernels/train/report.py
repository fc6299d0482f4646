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
    ax.set_xscale("log")
    ax.set_xlabel("embedding parameters (non-zeros)")
    ax.set_ylabel("test AUC")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_search_history(history, table_size, path):
    """Sparsity and mean threshold s over search steps."""
    steps = [h[0] for h in history]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(steps, [1 - h[1] / table_size for h in history], color="C0")
    ax.set_xlabel("step")
    ax.set_ylabel("sparsity", color="C0")
    twin = ax.twinx()
    twin.plot(steps, [h[2] for h in history], color="C1")
    twin.set_ylabel("mean threshold s", color="C1")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
