"""Which rows the controller's and the recipe's masks keep on the synthetic task, by how often each
feature occurs in the training split (issue 6: why the recipe's AutoInt tables retrain better there).

    python experiments/equal_budgets/mask_frequency.py [--model autoint] [--seeds 0 1 2] [--jobs 2] [--work DIR]
        [--out experiments/equal_budgets/mask_frequency.md]

Per seed, the two searches of budget_results.py (the controller: threshold_init -15, lr
1e-2, the 3,000-step plan; the recipe: threshold_init -4, lr 1e-2, faithful pruning), and per
80/90/95% snapshot: the non-zero count, the rows that keep at least one entry, the entries on rows
whose planted embedding is empty (pep_kernels.data.synthetic: such features carry no signal), and
the entries by the feature's number of occurrences in the training split.

Then, at 90% and 95%, which rows matter: the controller's entries restricted to as many rows as the
recipe's snapshot keeps (the recipe's own rows, or the features that occur most often in the
training split), refilled to the recipe's count with the largest entries of those rows in the
controller's snapshot of the budget before (80% for 90%, 90% for 95%: the snapshot of the budget
itself holds too few entries in those rows). Each such mask is retrained like budget_results.py's
(lottery ticket, lr 1e-2, at most 15 epochs, patience 2), beside the recipe's and the controller's
own snapshots (the same retrains as there, deterministic). With --work, finished searches in that
folder are read back, not rerun.
"""

import argparse
import math
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from budget_results import BUDGETS, MODEL_KWARGS, compared_searches, setting  # noqa: E402

DATA = "synthetic=50000"
BUCKETS = ((0, 0), (1, 4), (5, 19), (20, 99), (100, 999), (1000, None))


def restricted(pool, keep_rows, count):
    """The `count` largest entries of `pool` within the rows `keep_rows`, as a table like `pool`."""
    candidates = (pool.abs() * keep_rows[:, None]).flatten()
    mask = torch.zeros(pool.numel(), dtype=torch.bool)
    mask[candidates.topk(count).indices] = True
    return torch.where(mask.view_as(pool) & (pool != 0), pool, torch.zeros_like(pool))


def one_seed(task):
    from pep_kernels.data import make_synthetic_ctr
    from pep_kernels.train import checkpoint, retrain, search
    from pep_kernels.train.search import feature_occurrences

    model_name, seed, work = task
    torch.set_num_threads(1)
    data, (train, val, test), spec, sparsity_of, common = setting(DATA, model_name, seed, 15, "feature_dim")
    # the task load_data builds (pep_kernels.data.synthetic_ctr_data: planted dimension 8, seed 0)
    true_dims = make_synthetic_ctr(int(DATA.split("=")[1]), data.field_dims, 8, seed=0).true_dims.numpy()
    occurrences = feature_occurrences(train[0], data.field_dims).numpy()
    in_bucket = [(occurrences >= lo) & (occurrences <= (hi if hi is not None else occurrences.max()))
                 for lo, hi in BUCKETS]
    rows, tables, dirs = [], {}, {}
    for method, run_spec, options in compared_searches(spec, math.ceil(len(train[1]) / 1024)):
        run_dir = dirs[method] = work / f"{DATA}-{model_name}-{seed}-{method}"
        run = search(run_spec, *train, run_dir, BUDGETS, seed=seed, log=lambda *_: None, **options)
        for snap in run["snapshots"][1:]:
            table = tables[method, sparsity_of[snap["budget"]]] = checkpoint.load(run_dir / snap["path"])[0]["weight"]
            kept = (table != 0).numpy()
            auc = retrain(run_dir, snap["path"], train, val, test, **common)["test_auc"]
            rows.append(dict(method=method, seed=seed, budget=sparsity_of[snap["budget"]], step=snap["step"], auc=auc,
                             nnz=int(kept.sum()), rows=int(kept.any(1).sum()),
                             empty_planted=int(kept[true_dims == 0].sum()),
                             by_occurrences=[int(kept[b].sum()) for b in in_bucket]))

    most_frequent = torch.as_tensor(np.argsort(-occurrences, kind="stable"))
    restricted_rows = []
    for budget, pool_budget in ((0.9, 0.8), (0.95, 0.9)):
        recipe_kept = tables["recipe", budget] != 0
        count, num_rows = int(recipe_kept.sum()), int(recipe_kept.any(1).sum())
        frequent_rows = torch.zeros(spec.num_embeddings, dtype=torch.bool)
        frequent_rows[most_frequent[:num_rows]] = True
        for rows_of, keep_rows in (("recipe", recipe_kept.any(1)), ("frequent", frequent_rows)):
            table = restricted(tables["controller", pool_budget], keep_rows, count)
            path = dirs["controller"] / f"restricted-{budget}-{rows_of}.safetensors"
            checkpoint.save(path, {"weight": table}, {"nnz": int((table != 0).sum())})
            result = retrain(dirs["controller"], path.name, train, val, test, **common)
            restricted_rows.append(dict(seed=seed, budget=budget, rows_of=rows_of, nnz=result["nnz"],
                                        rows=int((table != 0).any(1).sum()), auc=result["test_auc"]))
    return dict(rows=rows, restricted=restricted_rows, features=[int(b.sum()) for b in in_bucket],
                empty_features=int((true_dims == 0).sum()))


def report(results, model_name, command, seconds):
    buckets = [f"{lo}" if hi == lo else f"{lo}-{hi}" if hi else f"{lo}+" for lo, hi in BUCKETS]
    lines = [f"# Masks by feature occurrences: {model_name} on {DATA}", "", f"Command: `{command}` ({seconds:.0f} s).",
             "Per seed, the first line counts the features (rows) of the table; the others the entries each "
             "snapshot keeps.", "",
             "| seed | method | step | test AUC | non-zeros | rows kept | on empty planted rows | "
             + " | ".join(f"{b} occurrences" for b in buckets) + " |",
             "|" + "---|" * (7 + len(buckets))]
    for result in results:
        seed = result["rows"][0]["seed"]
        lines.append(f"| {seed} | features | | | | {sum(result['features'])} | {result['empty_features']} | "
                     + " | ".join(str(n) for n in result["features"]) + " |")
        for r in result["rows"]:
            lines.append(f"| {seed} | {r['method']} | {r['step']} | {r['auc']:.4f} | {r['nnz']} | {r['rows']} | "
                         f"{r['empty_planted']} | " + " | ".join(str(n) for n in r["by_occurrences"]) + " |")
    lines += ["", "The controller's entries in as many rows as the recipe keeps (`recipe`: its own rows; `frequent`: "
              "the features that occur most often), at the recipe's count; `- recipe` and `- controller`: test AUC "
              "minus the recipe's and the controller's own snapshot at that budget, same seed.", "",
              "| seed | budget | rows | non-zeros | rows kept | test AUC | - recipe | - controller |", "|---|---|---|---|---|---|---|---|"]
    minus_recipe = {}
    for result in results:
        own = {(r["method"], r["budget"]): r["auc"] for r in result["rows"]}
        for r in result["restricted"]:
            gain = minus_recipe.setdefault((r["budget"], r["rows_of"]), [])
            gain.append(r["auc"] - own["recipe", r["budget"]])
            lines.append(f"| {r['seed']} | {r['budget']:.0%} | {r['rows_of']} | {r['nnz']} | {r['rows']} | {r['auc']:.4f} | "
                         f"{gain[-1]:+.4f} | {r['auc'] - own['controller', r['budget']]:+.4f} |")
    lines.append("")
    for (budget, rows_of), gains in minus_recipe.items():
        lines.append(f"- {budget:.0%}, {rows_of} rows: minus the recipe {statistics.mean(gains):+.4f} on average "
                     f"over {len(gains)} seeds")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="autoint", choices=list(MODEL_KWARGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--work", type=Path, help="keep the searches here (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "mask_frequency.md")
    args = parser.parse_args(argv)
    command = "python experiments/equal_budgets/mask_frequency.py " + " ".join(sys.argv[1:] if argv is None else argv)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        tasks = [(args.model, seed, work) for seed in args.seeds]
        with multiprocessing.get_context("spawn").Pool(min(args.jobs, len(tasks))) as pool:
            results = pool.map(one_seed, tasks)
    args.out.write_text(report(results, args.model, command, time.perf_counter() - start))
    print(args.out.read_text())


if __name__ == "__main__":
    main()
