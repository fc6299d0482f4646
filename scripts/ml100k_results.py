"""MovieLens-100K accuracy at equal budgets: full table vs PEP (retrained winning ticket) vs
magnitude pruning at the same non-zero count, PEP pruning at the recipe's own pace (faithful).
Made the earlier tables of docs/RESULTS.md; scripts/budget_results.py is the current grid.

    python scripts/ml100k_results.py [--models fm deepfm autoint] [--seeds 0 1 2] [--out ml100k.md]

Every run uses one recipe: Adam with coupled L2 1e-5, batch 1024, gradient clipping at 100, and
the settings under which PEP prunes within the budget on this small dataset (threshold_init -4,
lr 1e-2; the published -15 / 1e-3 hardly prunes here, see the last column). Model selection and
early stopping on the validation split, one global test AUC / log-loss, split by the seed.
"""

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from pep_kernels.data import load_movielens_100k, split
from pep_kernels.models import FieldEmbedding
from pep_kernels.train import budget_counts, evaluate, retrain, search
from pep_kernels.train.loop import fit
from pep_kernels.train.magnitude import magnitude_ticket
from pep_kernels.train.spec import RunSpec

BUDGETS = (0.8, 0.9, 0.95)
RECIPE = dict(threshold_init=-4.0, lr=1e-2)
# MovieLens sizes of the PEP reference (PEP_SPEC section 3).
MODEL_KWARGS = {"fm": {}, "deepfm": {"mlp_dims": (100, 100)}, "autoint": {"mlp_dims": (100, 100)}}


def log(message):
    print(message, file=sys.stderr, flush=True)


def one_run(model_name, seed, data, epochs, work):
    train, val, test = ((p.x, p.y) for p in split(data, seed))
    kwargs = MODEL_KWARGS[model_name]
    spec = RunSpec(model_name, data.field_dims, 16, model_kwargs=kwargs, threshold_init=RECIPE["threshold_init"])
    common = dict(epochs=epochs, patience=3, lr=RECIPE["lr"], seed=seed, log=lambda *_: None)

    torch.manual_seed(seed)
    full = spec.build(FieldEmbedding(data.field_dims, 16))
    initial = copy.deepcopy(full.state_dict())
    fit(full, train, val, desc="full", **common)
    rows = [dict(table="full", sparsity=0.0, nnz=spec.num_embeddings * 16, **evaluate(full, *test))]

    run = search(spec, *train, work / f"{model_name}-{seed}", BUDGETS, epochs=epochs, lr=RECIPE["lr"], seed=seed,
                 pruning="faithful", log=lambda *_: None)
    target = dict(zip(budget_counts(BUDGETS, run["table_size"]), sorted(BUDGETS)))  # count -> sparsity target
    for snap in run["snapshots"][1:]:
        pep = retrain(work / f"{model_name}-{seed}", snap["path"], train, val, test, **common)
        rows.append(dict(table="PEP", target=target[snap["budget"]], sparsity=pep["sparsity"], nnz=pep["nnz"],
                         auc=pep["test_auc"], logloss=pep["test_logloss"]))
        masked = magnitude_ticket(spec, initial, full.embedding.embedding.weight, pep["nnz"])
        fit(masked, train, val, desc="magnitude", **common)
        rows.append(dict(table="magnitude", target=target[snap["budget"]], sparsity=masked.embedding.sparsity(),
                         nnz=masked.embedding.nnz(), **evaluate(masked, *test)))
    return rows, run["unreached"]


def published_sparsity(model_name, data, epochs, work):
    """How far the published recipe (threshold_init -15, lr 1e-3) prunes in the same number of epochs."""
    train = split(data, 0)[0]
    spec = RunSpec(model_name, data.field_dims, 16, model_kwargs=MODEL_KWARGS[model_name], threshold_init=-15.0)
    run = search(spec, train.x, train.y, work / f"{model_name}-published", BUDGETS, epochs=epochs, lr=1e-3,
                 pruning="faithful", log=lambda *_: None)
    return 1 - run["final_nnz"] / run["table_size"], run["steps"]


def spread(values):
    mean = statistics.mean(values)
    return f"{mean:.4f} ± {statistics.stdev(values):.4f}" if len(values) > 1 else f"{mean:.4f}"


def table(results):
    lines = ["| model | table | budget (sparsity) | mean sparsity | test AUC | AUC - full | test log-loss | runs |",
             "|---|---|---|---|---|---|---|---|"]
    for model_name, runs in results.items():
        full = {seed: next(r for r in rows if r["table"] == "full") for seed, (rows, _) in runs.items()}
        lines.append(f"| {model_name} | full | - | 0% | {spread([f['auc'] for f in full.values()])} | - | "
                     f"{spread([f['logloss'] for f in full.values()])} | {len(full)} |")
        for kind in ("PEP", "magnitude"):
            for budget in BUDGETS:
                picked = [(seed, r) for seed, (rows, _) in runs.items() for r in rows
                          if r["table"] == kind and r["target"] == budget]
                if not picked:
                    continue
                lines.append(
                    f"| {model_name} | {kind} | {budget:.0%} | {statistics.mean(r['sparsity'] for _, r in picked):.1%} | "
                    f"{spread([r['auc'] for _, r in picked])} | "
                    f"{spread([r['auc'] - full[s]['auc'] for s, r in picked])} | "
                    f"{spread([r['logloss'] for _, r in picked])} | {len(picked)} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODEL_KWARGS), choices=list(MODEL_KWARGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--out", type=Path, default=Path("ml100k.md"), help="markdown table; raw results go beside it as .json")
    args = parser.parse_args(argv)
    data = load_movielens_100k()
    start = time.perf_counter()
    results, published = {}, {}
    with tempfile.TemporaryDirectory() as work:
        for model_name in args.models:
            results[model_name] = {}
            for seed in args.seeds:
                results[model_name][seed] = one_run(model_name, seed, data, args.epochs, Path(work))
                log(f"{model_name} seed {seed} done, {time.perf_counter() - start:.0f} s")
            published[model_name] = published_sparsity(model_name, data, args.epochs, Path(work))
    text = [table(results), ""]
    for model_name, runs in results.items():
        unreached = sorted({u for _, (_, un) in runs.items() for u in un})
        sparsity, steps = published[model_name]
        text.append(f"- {model_name}: budgets not reached in {args.epochs} epochs (non-zero counts): "
                    f"{unreached or 'none'}; the published recipe reached {sparsity:.1%} sparsity in {steps} steps.")
    text.append(f"\nCommand: `python scripts/ml100k_results.py --models {' '.join(args.models)} --seeds "
                f"{' '.join(map(str, args.seeds))} --epochs {args.epochs}`; {time.perf_counter() - start:.0f} s on "
                f"{torch.get_num_threads()} threads.")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(text) + "\n")
    (args.out.with_suffix(".json")).write_text(json.dumps({m: {s: r for s, (r, _) in runs.items()}
                                                          for m, runs in results.items()}, indent=1))
    print("\n".join(text))


if __name__ == "__main__":
    main()
