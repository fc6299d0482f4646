"""A DLRM on MovieLens-100K (genres as a multi-hot bag), pruned by PEP to 80/90/95% fewer
embedding bytes than its full tables: one budget shared by all tables against the same budget
split evenly over the tables (every table the same fraction of its entries).

    python experiments/dlrm_ml100k/dlrm_ml100k.py [--seeds 0 1 2] [--work DIR] [--out experiments/dlrm_ml100k]

Per seed (the split and every draw): the full-table DLRM trained with early stopping on
validation AUC; the same model converted by `pep_kernels.convert` and searched with the budgets
in bytes of its fp32 stores (`search_model`, allocation "shared" and "even"); each snapshot
retrained from the initial weights (lottery ticket) and scored on the test split. The settings
are `pep demo --model dlrm`'s (pep_kernels/demo.py): DLRM with 32-dim tables, bottom MLP (64,),
top MLP (64,), Adam lr 1e-2 with coupled L2 1e-5 everywhere, batch 1024, threshold_init -15,
the controller's plan over 30 epochs of steps, retrains of up to 30 epochs with patience 3.
Run folders (snapshots, models) go to --work, outside the repository.
"""

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from pep_kernels import PEPConfig, convert
from pep_kernels.data import load_movielens_100k, split
from pep_kernels.demo import BUDGETS, DLRM_BOTTOM, DLRM_DIM, DLRM_TOP, PLAN_STEPS, THRESHOLD_INIT, TRAIN_LR
from pep_kernels.models import DLRM, DLRMBatches
from pep_kernels.optim import Adam
from pep_kernels.train.evaluate import evaluate_batches
from pep_kernels.train.loop import fit_batches
from pep_kernels.train.tables import retrain_model, search_model

EPOCHS, PATIENCE = 30, 3
ALLOCATIONS = ("shared", "even")


def log(message):
    print(message, file=sys.stderr, flush=True)


def one_seed(seed, data, work):
    parts = split(data, seed)
    train = DLRMBatches(parts[0], 1024, seed)
    val, test = (DLRMBatches(part, 8192, shuffle=False) for part in parts[1:])
    tables = DLRMBatches.tables(data)
    full_bytes = 4 * DLRM_DIM * sum(tables.values())
    quiet = dict(log=lambda *_: None)

    def make_model():
        torch.manual_seed(seed)
        return DLRM(data.dense.shape[1], tables, DLRM_DIM, bottom_mlp=DLRM_BOTTOM, top_mlp=DLRM_TOP)

    config = PEPConfig(threshold_init=THRESHOLD_INIT, optimizer=Adam(lr=TRAIN_LR, weight_decay=1e-5, mode="faithful"))
    start = time.perf_counter()
    full = make_model()
    best = fit_batches(full, train, val, epochs=EPOCHS, patience=PATIENCE, lr=TRAIN_LR, seed=seed, **quiet)
    rows = [dict(seed=seed, table="full", budget_reduction=0.0, store_bytes=full_bytes, best_epoch=best["epoch"],
                 **{f"test_{k}": v for k, v in evaluate_batches(full, test).items()})]
    log(f"seed {seed}: full tables {rows[0]['test_auc']:.4f} ({time.perf_counter() - start:.0f} s)")
    plan_steps = min(PLAN_STEPS, EPOCHS * len(train))
    budgets = [f"{math.floor((1 - b) * full_bytes)}B" for b in BUDGETS]
    for allocation in ALLOCATIONS:
        run_dir = work / f"seed{seed}-{allocation}"
        run = search_model(convert(make_model(), config), train, run_dir, budgets, epochs=EPOCHS + 1,
                           steps=plan_steps, allocation=allocation, lr=TRAIN_LR, seed=seed, **quiet)
        log(f"seed {seed}: {allocation} search, {run['steps']} steps, unreached {run['unreached']} "
            f"({time.perf_counter() - start:.0f} s)")
        for level in run["levels"][1:]:
            result = retrain_model(convert(make_model(), config), run_dir, level["level"], train, val, test,
                                   epochs=EPOCHS, patience=PATIENCE, lr=TRAIN_LR, seed=seed, **quiet)
            rows.append(dict(seed=seed, table=allocation, budget_reduction=BUDGETS[level["level"] - 1],
                             budget_bytes=run["budgets"][level["level"] - 1], search_steps=level["steps"],
                             step=level["step"], snapshot_store_bytes=level["store_bytes"],
                             store_bytes=result["store_bytes"], nnz=result["nnz"], best_epoch=result["best_epoch"],
                             test_auc=result["test_auc"], test_logloss=result["test_logloss"],
                             tables={fqn.removeprefix("embeddings."): {k: r[k] for k in ("nnz", "rows_kept")}
                                     for fqn, r in result["tables"].items()}))
            log(f"seed {seed}: {allocation} -{BUDGETS[level['level'] - 1]:.0%} bytes: {rows[-1]['test_auc']:.4f}, "
                f"{rows[-1]['store_bytes']} bytes ({time.perf_counter() - start:.0f} s)")
    return rows, full_bytes, tables


def mean_sd(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def report(rows, full_bytes, tables, seeds):
    full = {r["seed"]: r for r in rows if r["table"] == "full"}
    lines = [
        f"DLRM on MovieLens-100K, {len(seeds)} seeds ({', '.join(map(str, seeds))}); full tables: "
        f"{sum(tables.values())} rows x {DLRM_DIM} dims = {full_bytes} bytes (fp32). Test AUC mean ± sd over seeds; "
        "bytes of the retrained tables' fp32 stores; steps: the search step each budget was passed at (shared: the "
        "model's; even: the last table's).", "",
        "| tables | bytes (of full) | steps | test AUC | AUC − full | log-loss |",
        "|---|---|---|---|---|---|",
    ]
    auc, sd = mean_sd([r["test_auc"] for r in full.values()])
    loss, _ = mean_sd([r["test_logloss"] for r in full.values()])
    lines.append(f"| full | {full_bytes} (100%) | - | {auc:.4f} ± {sd:.4f} | - | {loss:.4f} |")
    for allocation in ALLOCATIONS:
        for reduction in BUDGETS:
            chosen = [r for r in rows if r["table"] == allocation and r["budget_reduction"] == reduction]
            if not chosen:
                continue
            nbytes, _ = mean_sd([r["store_bytes"] for r in chosen])
            steps, _ = mean_sd([r["step"] for r in chosen])
            auc, sd = mean_sd([r["test_auc"] for r in chosen])
            gap, gap_sd = mean_sd([r["test_auc"] - full[r["seed"]]["test_auc"] for r in chosen])
            loss, _ = mean_sd([r["test_logloss"] for r in chosen])
            lines.append(f"| PEP {allocation}, -{reduction:.0%} bytes | {nbytes:.0f} ({nbytes / full_bytes:.1%}) | "
                         f"{steps:.0f} | {auc:.4f} ± {sd:.4f} | {gap:+.4f} ± {gap_sd:.4f} | {loss:.4f} |")
    lines += ["", "One budget shared by all tables against the same budget split evenly (every table the same "
              "fraction of its entries), per seed at equal budget:", "",
              "| budget | shared AUC | even AUC | shared − even (mean ± sd) | seeds shared ahead | shared bytes | "
              "even bytes |", "|---|---|---|---|---|---|---|"]
    for reduction in BUDGETS:
        pairs = [(s, e) for s in rows for e in rows
                 if s["table"] == "shared" and e["table"] == "even" and s["seed"] == e["seed"]
                 and s["budget_reduction"] == e["budget_reduction"] == reduction]
        if not pairs:
            continue
        diff, diff_sd = mean_sd([s["test_auc"] - e["test_auc"] for s, e in pairs])
        lines.append(f"| -{reduction:.0%} bytes | {statistics.mean(s['test_auc'] for s, _ in pairs):.4f} | "
                     f"{statistics.mean(e['test_auc'] for _, e in pairs):.4f} | {diff:+.4f} ± {diff_sd:.4f} | "
                     f"{sum(s['test_auc'] > e['test_auc'] for s, e in pairs)} of {len(pairs)} | "
                     f"{statistics.mean(s['store_bytes'] for s, _ in pairs):.0f} | "
                     f"{statistics.mean(e['store_bytes'] for _, e in pairs):.0f} |")
    lines += ["", "Entries kept per table after the retrain (mean over seeds; of rows x dims):", "",
              "| table | entries | " + " | ".join(f"{a} -{b:.0%}" for a in ALLOCATIONS for b in BUDGETS) + " |",
              "|---|---|" + "---|" * (len(ALLOCATIONS) * len(BUDGETS))]
    for table, n in tables.items():
        cells = []
        for allocation in ALLOCATIONS:
            for reduction in BUDGETS:
                chosen = [r["tables"][table]["nnz"] for r in rows
                          if r["table"] == allocation and r["budget_reduction"] == reduction]
                cells.append(f"{statistics.mean(chosen):.0f}" if chosen else "-")
        lines.append(f"| {table} | {n * DLRM_DIM} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--work", type=Path, help="run folders (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    args = parser.parse_args()
    data = load_movielens_100k(genres_as_bag=True, dense=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="dlrm_ml100k-"))
    rows, start = [], time.perf_counter()
    for seed in args.seeds:
        seed_rows, full_bytes, tables = one_seed(seed, data, work)
        rows += seed_rows
        (args.out / "results.json").write_text(json.dumps(
            {"seeds": args.seeds, "full_bytes": full_bytes, "tables": tables, "rows": rows}, indent=1))
    text = report(rows, full_bytes, tables, args.seeds)
    (args.out / "results.md").write_text(text + f"\n\n{time.perf_counter() - start:.0f} s in all.\n")
    print(text)


if __name__ == "__main__":
    main()
