"""Why PEP's retrained tables lose AUC on MovieLens-100K with ids, and how much a longer search
wins back. Writes a markdown report and the raw results beside it as .json.

    python experiments/gap_study/gap_study.py [--models fm deepfm] [--seeds 0 1 2] [--jobs 2]
        [--out experiments/gap_study/gap_study.md]

Per (model, seed), on the seed's 80/10/10 split, every table trained as in
experiments/equal_budgets/budget_results.py (Adam lr 1e-2, coupled L2 1e-5, at most 15 epochs, patience 2):
- references: the full d = 16 table; the same model with a full d = 1 or d = 2 table (every
  feature keeps the same 1 or 2 dimensions: 93.75% / 87.5% fewer parameters); logistic regression
  (the linear term alone, what a model whose embeddings are all pruned falls back to);
- PEP: budget-controller searches (threshold_init -15) with three settings of search lr and step
  budget, and one more at lr 1e-2 over 3,000 steps with the thresholds ordered by dimension
  (threshold_init -30, threshold_slope 1), each 80/90/95% snapshot retrained (lottery ticket);
  per mask, the rows that keep at least one entry and, over the test pairs, how many kept
  dimensions a user row and an item row share (the only dimensions through which an FM
  interaction of the two can act);
- aligned columns: the same model with its trained full table's largest columns kept for every
  row (3 columns: 81.25% sparse, under the 80% budget; 1 column: 93.75%), retrained from the
  initial weights: the structure an FM needs, at the same or a smaller count.
"""

import argparse
import copy
import json
import math
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

BUDGETS = (0.8, 0.9, 0.95)
# (search lr, step budget, threshold_init, threshold_slope); the first is the controller's first version
SEARCHES = ((1e-3, 600, -15.0, 0.0), (3e-3, 3000, -15.0, 0.0), (1e-2, 3000, -15.0, 0.0), (1e-2, 3000, -30.0, 1.0))
MODEL_KWARGS = {"fm": {}, "deepfm": {"mlp_dims": (100, 100)}}
TRAIN = dict(epochs=15, patience=2, lr=1e-2)


def shared_dims(mask, x, field_dims):
    """Per test example, the kept dimensions the user row and the item row (fields 0, 1) share."""
    user, item = x[:, 0], x[:, 1] + field_dims[0]
    return (mask[user] & mask[item]).sum(1).float()


def one_run(model_name, seed, work):
    from pep_kernels.cli import load_data
    from pep_kernels.data import split
    from pep_kernels.models import FieldEmbedding
    from pep_kernels.train import evaluate, retrain, search
    from pep_kernels.train.checkpoint import load
    from pep_kernels.train.loop import fit
    from pep_kernels.train.retrain import masked_model
    from pep_kernels.train.spec import RunSpec

    data = load_data("ml-100k", seed=0)
    train, val, test = ((p.x, p.y) for p in split(data, seed))
    quiet = lambda *_: None  # noqa: E731
    kwargs = MODEL_KWARGS[model_name]
    out = {"model": model_name, "seed": seed, "rows": []}

    def row(method, auc, **extra):
        out["rows"].append(dict(method=method, auc=auc, **extra))

    def trained(model_name_, dim, kwargs_):
        torch.manual_seed(seed)
        spec = RunSpec(model_name_, data.field_dims, dim, model_kwargs=kwargs_)
        model = spec.build(FieldEmbedding(data.field_dims, dim))
        initial = copy.deepcopy(model.state_dict())
        fit(model, train, val, seed=seed, log=quiet, **TRAIN)
        return spec, model, initial

    spec, full, initial = trained(model_name, 16, kwargs)
    row("full d=16", evaluate(full, *test)["auc"])
    for dim in (1, 2):
        row(f"full d={dim}", evaluate(trained(model_name, dim, kwargs)[1], *test)["auc"], sparsity=1 - dim / 16)
    row("logistic regression", evaluate(trained("lr", 1, {})[1], *test)["auc"], sparsity=1.0)

    weight = full.embedding.embedding.weight.detach()
    for columns in (3, 1):
        keep = torch.zeros_like(weight, dtype=torch.bool)
        keep[:, weight.norm(dim=0).topk(columns).indices] = True
        model = masked_model(spec, initial["embedding.embedding.weight"], keep, initial)
        fit(model, train, val, seed=seed, log=quiet, **TRAIN)
        row(f"aligned {columns} column{'s' if columns > 1 else ''}", evaluate(model, *test)["auc"],
            sparsity=1 - columns / 16, shared=shared_dims(keep, test[0], data.field_dims).mean().item())

    steps_per_epoch = math.ceil(len(train[1]) / 1024)
    for lr, steps, threshold_init, slope in SEARCHES:
        torch.manual_seed(seed)
        pep_spec = RunSpec(model_name, data.field_dims, 16, model_kwargs=kwargs, threshold_init=threshold_init,
                           threshold_slope=slope)
        run_dir = work / f"{model_name}-{seed}-{lr}-{steps}-{slope}"
        run = search(pep_spec, *train, run_dir, BUDGETS, lr=lr, pruning="budget", steps=steps,
                     epochs=math.ceil(steps / steps_per_epoch) + 2, seed=seed, log=quiet)
        for target, snap in zip(BUDGETS, run["snapshots"][1:]):
            keep = load(run_dir / snap["path"])[0]["weight"] != 0
            result = retrain(run_dir, snap["path"], train, val, test, seed=seed, log=quiet, **TRAIN)
            shared = shared_dims(keep, test[0], data.field_dims)
            row(f"PEP lr {lr:g}, {steps} steps{f', slope {slope:g}' if slope else ''}", result["test_auc"],
                target=target, step=snap["step"], rows_kept=keep.any(1).float().mean().item(),
                shared=shared.mean().item(), pairs_sharing=(shared > 0).float().mean().item())
    return out


def worker(task):
    torch.set_num_threads(1)
    model_name, seed, work = task
    try:
        return one_run(model_name, seed, Path(work))
    except Exception as e:  # reported in the results, the other tasks go on
        return {"model": model_name, "seed": seed, "error": repr(e)}


def report(results, command, seconds):
    runs = [r for r in results if "rows" in r]
    lines = ["Mean ± standard deviation over the seeds; `Δ full`: AUC minus the same seed's full d = 16 "
             "table. `rows kept`: rows with at least one entry; `shared dims`: over the test examples, "
             "kept dimensions the user row and the item row have in common (mean), and the share of "
             "examples with at least one.", "",
             "| model | table | sparsity | test AUC | Δ full | rows kept | shared dims | examples sharing | seeds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for model in dict.fromkeys(r["model"] for r in runs):
        rs = [r for r in runs if r["model"] == model]
        full = {r["seed"]: r["rows"][0]["auc"] for r in rs}
        keys = list(dict.fromkeys((x["method"], x.get("target")) for r in rs for x in r["rows"]))
        for method, target in keys:
            xs = [(r["seed"], x) for r in rs for x in r["rows"] if x["method"] == method and x.get("target") == target]

            def stat(name, fmt):
                values = [x[name] for _, x in xs if name in x]
                return fmt.format(statistics.mean(values)) if values else ""

            aucs = [x["auc"] for _, x in xs]
            gaps = None if method == rs[0]["rows"][0]["method"] else [x["auc"] - full[s] for s, x in xs]
            sparsity = f"{target:.0%}" if target is not None else stat("sparsity", "{:.2%}") or "0%"
            sd = lambda v: f" ± {statistics.stdev(v):.4f}" if len(v) > 1 else ""  # noqa: E731
            lines.append(f"| {model} | {method} | {sparsity} | {statistics.mean(aucs):.4f}{sd(aucs)} | "
                         f"{f'{statistics.mean(gaps):+.4f}{sd(gaps)}' if gaps else '-'} | {stat('rows_kept', '{:.0%}')} | "
                         f"{stat('shared', '{:.2f}')} | {stat('pairs_sharing', '{:.0%}')} | {len(xs)} |")
    for e in (r for r in results if "error" in r):
        lines.append(f"\nFAILED: {e['model']} seed {e['seed']}: {e['error']}")
    lines.append(f"\nCommand: `{command}`; {seconds:.0f} s.")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODEL_KWARGS), choices=list(MODEL_KWARGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "gap_study.md")
    parser.add_argument("--report-only", action="store_true", help="rewrite the markdown from the .json")
    args = parser.parse_args(argv)
    if args.report_only:
        saved = json.loads(args.out.with_suffix(".json").read_text())
        args.out.write_text(report(saved["results"], saved["command"], saved["seconds"]) + "\n")
        return
    command = "python experiments/gap_study/gap_study.py " + " ".join(argv if argv is not None else sys.argv[1:])
    start = time.perf_counter()
    results = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work, multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        tasks = [(m, s, work) for m in args.models for s in args.seeds]
        for result in pool.imap_unordered(worker, tasks):
            results.append(result)
            seconds = time.perf_counter() - start
            print(f"{result['model']} seed {result['seed']}: {result.get('error', 'done')}, {seconds:.0f} s",
                  file=sys.stderr, flush=True)
            args.out.with_suffix(".json").write_text(json.dumps({"command": command, "seconds": seconds,
                                                                 "results": results}))
            args.out.write_text(report(results, command, seconds) + "\n")
    print(args.out.read_text())


if __name__ == "__main__":
    main()
