"""`fast` vs `faithful` table training on MovieLens-100K (with ids): the step each budget is
reached, the non-zeros there, the retrained AUC at each budget, and the search time.

    python scripts/fast_vs_faithful.py [--models fm deepfm] [--seeds 0 1 2] [--out docs/fast_vs_faithful.md]

Both searches use the recipe of docs/RESULTS.md (Adam with coupled L2 1e-5, lr 1e-2,
threshold_init -4, batch 1024) and count non-zeros after every step; the retrain of each
snapshot is the same lottery-ticket retrain for both.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from pep_kernels.data import load_movielens_100k, split
from pep_kernels.train import budget_counts, retrain, search
from pep_kernels.train.spec import RunSpec

BUDGETS = (0.8, 0.9, 0.95)
RECIPE = dict(threshold_init=-4.0, lr=1e-2)
MODEL_KWARGS = {"fm": {}, "deepfm": {"mlp_dims": (100, 100)}, "autoint": {"mlp_dims": (100, 100)}}


def one_seed(model_name, seed, data, epochs, work):
    train, val, test = ((p.x, p.y) for p in split(data, seed))
    spec = RunSpec(model_name, data.field_dims, 16, model_kwargs=MODEL_KWARGS[model_name],
                   threshold_init=RECIPE["threshold_init"])
    out = {}
    for training in ("faithful", "fast"):
        run_dir = work / f"{model_name}-{seed}-{training}"
        start = time.perf_counter()
        run = search(spec, *train, run_dir, BUDGETS, epochs=epochs, lr=RECIPE["lr"], seed=seed, training=training,
                     pruning="faithful", log=lambda *_: None)
        seconds = time.perf_counter() - start
        target = dict(zip(budget_counts(BUDGETS, run["table_size"]), sorted(BUDGETS)))
        budgets = {}
        for snap in run["snapshots"][1:]:
            result = retrain(run_dir, snap["path"], train, val, test, epochs=epochs, patience=3, lr=RECIPE["lr"],
                             seed=seed, log=lambda *_: None)
            budgets[target[snap["budget"]]] = dict(step=snap["step"], nnz=snap["nnz"], auc=result["test_auc"])
        out[training] = dict(seconds=seconds, steps=run["steps"], budgets=budgets,
                             history=[h[:2] for h in run["history"]])
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["fm", "deepfm"], choices=list(MODEL_KWARGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("fast_vs_faithful.md"))
    args = parser.parse_args(argv)
    data = load_movielens_100k()
    start = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory() as work:
        for model_name in args.models:
            for seed in args.seeds:
                results[f"{model_name}-{seed}"] = one_seed(model_name, seed, data, args.epochs, Path(work))
                print(f"{model_name} seed {seed} done, {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    lines = ["| model | seed | budget | step faithful | step fast | non-zeros faithful | non-zeros fast | "
             "AUC faithful | AUC fast | AUC fast - faithful |", "|---|---|---|---|---|---|---|---|---|---|"]
    gaps, step_errors, identical = [], [], True
    for key, run in results.items():
        model_name, seed = key.rsplit("-", 1)
        a, b = run["faithful"], run["fast"]
        identical &= a["history"] == b["history"]
        for budget in BUDGETS:
            if budget not in a["budgets"] or budget not in b["budgets"]:
                lines.append(f"| {model_name} | {seed} | {budget:.0%} | not reached in both modes | | | | | | |")
                continue
            x, y = a["budgets"][budget], b["budgets"][budget]
            gaps.append(y["auc"] - x["auc"])
            step_errors.append(abs(y["step"] - x["step"]) / max(x["step"], 1))
            lines.append(f"| {model_name} | {seed} | {budget:.0%} | {x['step']} | {y['step']} | {x['nnz']} | {y['nnz']} | "
                         f"{x['auc']:.4f} | {y['auc']:.4f} | {y['auc'] - x['auc']:+.4f} |")
    seconds = {m: statistics.mean(r[m]["seconds"] for r in results.values()) for m in ("faithful", "fast")}
    lines += ["", f"- Largest AUC difference: {max(map(abs, gaps)):.4f}; largest relative difference of the step "
                  f"at which a budget is reached: {max(step_errors):.1%}; non-zero counts after every step "
                  f"identical in every run: {identical}.",
              f"- Mean search time: faithful {seconds['faithful']:.1f} s, fast {seconds['fast']:.1f} s "
              f"({torch.get_num_threads()} threads).",
              f"\nCommand: `python scripts/fast_vs_faithful.py --models {' '.join(args.models)} --seeds "
              f"{' '.join(map(str, args.seeds))} --epochs {args.epochs}`; {time.perf_counter() - start:.0f} s in all."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(
        {k: {m: {kk: vv for kk, vv in r.items() if kk != "history"} for m, r in run.items()} for k, run in results.items()},
        indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
