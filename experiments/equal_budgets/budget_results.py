"""PEP at equal budgets on MovieLens-100K (with ids) and the synthetic task: the full table, PEP
with the budget controller, PEP with the recipe's own pruning, and magnitude pruning, each
pruned table retrained (lottery ticket) and scored on the test split. Writes a markdown report
and the raw results beside it as .json (the runs of this study: README.md in this folder).

    python experiments/equal_budgets/budget_results.py [--data ml-100k synthetic=50000]
        [--models fm deepfm autoint] [--seeds 0 1 2] [--jobs 3] [--out experiments/equal_budgets/budget_results.md]
    python experiments/equal_budgets/budget_results.py --equal-count --out RESULTS.md
    python experiments/equal_budgets/budget_results.py --min-occurrences 10 --reuse SAVED.json [...] --out CUT.md

Per (data, model, seed), on the seed's 80/10/10 split:
- full: the full table, Adam lr 1e-2 (coupled L2 1e-5, batch 1024, clipping at 100 throughout).
- controller: `search(pruning="budget")` from `--threshold-init` (default the published -15,
  where the thresholds' own drift hardly prunes; with `--threshold-slope` dimension j starts at
  init + j * slope) and search lr `--search-lr`, planned to pass 80/90/95%
  sparsity by step `--steps` on a cubic; every snapshot retrained. The defaults (lr 1e-2, 3,000
  steps) are the settings this study recommends; lr 1e-3 over 600 steps is the first
  version (experiments/gap_study compares them).
- recipe: `search(pruning="faithful")` with the settings that prune by themselves on this small
  data (threshold_init -4, lr 1e-2, the recipe of the first tables of this study), at most RECIPE_EPOCHS
  epochs; every snapshot retrained.
- magnitude: the `nnz` largest entries of the trained full table, at the controller's counts.
- controller at recipe count: where the recipe passed a budget by a jump and its snapshot holds
  more than 1% fewer non-zeros than the controller's (80% at step 2-3 on most of these tables),
  a controller search to the recipe's own count, planned where the default plan passes that
  count; `ctrl - recipe` compares at equal counts with it. `--equal-count` adds these rows to
  the .json of a run made without them.
The controller and the recipe search with `--threshold-mode` (default feature_dim, the published
runs' mode). `--min-occurrences K` cuts, in the controller's searches only, the features seen fewer
than K times in the training split (`search(min_occurrences=K)`); the recipe keeps every row.
`--reuse SAVED.json ...` runs only the controller (its searches and retrains) and takes the full,
recipe and magnitude rows of each (data, model, seed) from the saved results: they are
deterministic and would come out the same (the magnitude rows stay at the saved controller's
counts, within 0.1% of every budget).
Every retrain and the full table: lr 1e-2, at most TRAIN_EPOCHS epochs, early stopping on
validation AUC with patience PATIENCE. One more run, the published recipe itself (threshold_init
-15, lr 1e-3, faithful pruning) on MovieLens FM seed 0 for up to PUBLISHED_STEPS steps, measures
how long it needs for each budget.

Tasks run in `--jobs` worker processes of one thread each; results are appended to the .json as
they finish, and `--report-only` rewrites the markdown from it.
"""

import argparse
import copy
import dataclasses
import json
import math
import multiprocessing
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

BUDGETS = (0.8, 0.9, 0.95)
SEARCH_LR, STEPS = 1e-2, 3000
RECIPE_EPOCHS = 14
TRAIN_EPOCHS, PATIENCE = 15, 2
PUBLISHED_STEPS = 12_000
EQUAL_COUNT_SLACK = 0.01
EQUAL = "controller at recipe count"
MODEL_KWARGS = {"fm": {}, "deepfm": {"mlp_dims": (100, 100)}, "autoint": {"mlp_dims": (100, 100)}}


def log(message):
    print(message, file=sys.stderr, flush=True)


def setting(data_name, model_name, seed, train_epochs, threshold_mode, threshold_init=-15.0, threshold_slope=0.0):
    """The data, the seed's (train, val, test) split, the controller's run spec, the budgets'
    count -> sparsity map and the options of every retrain."""
    from pep_kernels.cli import load_data
    from pep_kernels.data import split
    from pep_kernels.train import budget_counts
    from pep_kernels.train.spec import RunSpec

    data = load_data(data_name, seed=0)  # one synthetic task for every seed; the split varies
    splits = tuple((p.x, p.y) for p in split(data, seed))
    spec = RunSpec(model_name, data.field_dims, 16, model_kwargs=MODEL_KWARGS[model_name],
                   threshold_init=threshold_init, threshold_slope=threshold_slope, threshold_mode=threshold_mode)
    sparsity_of = dict(zip(budget_counts(BUDGETS, sum(data.field_dims) * 16), sorted(BUDGETS)))
    common = dict(epochs=train_epochs, patience=PATIENCE, lr=1e-2, seed=seed, log=lambda *_: None)
    return data, splits, spec, sparsity_of, common


def compared_searches(ctrl_spec, steps_per_epoch, search_lr=SEARCH_LR, steps=STEPS, min_occurrences=0):
    """(method, spec, search options) of the controller's search and the recipe's, on the same model."""
    recipe_spec = dataclasses.replace(ctrl_spec, threshold_init=-4.0, threshold_slope=0.0)
    # epochs: room to pass the last budget up to 10% past its planned step (issue 6's tolerance)
    return (("controller", ctrl_spec, dict(lr=search_lr, pruning="budget", steps=steps, min_occurrences=min_occurrences,
                                           epochs=math.ceil(1.1 * steps / steps_per_epoch))),
            ("recipe", recipe_spec, dict(lr=1e-2, pruning="faithful", epochs=RECIPE_EPOCHS)))


def one_run(data_name, model_name, seed, work, train_epochs=TRAIN_EPOCHS, search_lr=SEARCH_LR, steps=STEPS,
            threshold_mode="feature_dim", threshold_init=-15.0, threshold_slope=0.0, min_occurrences=0, saved=None):
    """Every row of one (data, model, seed); with `saved` (that triple's saved results), only the
    controller's, the others copied from it."""
    from pep_kernels.models import FieldEmbedding
    from pep_kernels.train import evaluate, retrain, search
    from pep_kernels.train.loop import fit
    from pep_kernels.train.magnitude import magnitude_ticket

    data, (train, val, test), ctrl_spec, sparsity_of, common = setting(data_name, model_name, seed, train_epochs,
                                                                       threshold_mode, threshold_init, threshold_slope)
    steps_per_epoch = math.ceil(len(train[1]) / 1024)
    quiet = common["log"]
    table_size = sum(data.field_dims) * 16
    out = {"data": data_name, "model": model_name, "seed": seed, "rows": [], "searches": {}}
    start = time.perf_counter()
    searches = compared_searches(ctrl_spec, steps_per_epoch, search_lr, steps, min_occurrences)
    if saved is not None:
        out["rows"] = [x for x in saved["rows"] if x["method"] in ("full", "recipe", "magnitude")]
        out["searches"]["recipe"] = saved["searches"]["recipe"]
        searches = searches[:1]
    else:
        torch.manual_seed(seed)
        full = ctrl_spec.build(FieldEmbedding(data.field_dims, 16))
        initial = copy.deepcopy(full.state_dict())
        best = fit(full, train, val, desc="full", **common)
        out["rows"].append(dict(method="full", target=0.0, nnz=table_size, best_epoch=best["epoch"],
                                **evaluate(full, *test)))

    for method, spec, options in searches:
        run_dir = work / f"{data_name}-{model_name}-{seed}-{method}"
        t0 = time.perf_counter()
        run = search(spec, *train, run_dir, BUDGETS, seed=seed, log=quiet, **options)
        out["searches"][method] = {"steps": run["steps"], "targets": run["targets"], "final_nnz": run["final_nnz"],
                                   "seconds": time.perf_counter() - t0, "cut_rows": run["cut_rows"],
                                   "history": run["history"][::10]}  # every 10th count, for plots
        for snap in run["snapshots"][1:]:
            result = retrain(run_dir, snap["path"], train, val, test, **common)
            out["rows"].append(dict(method=method, target=sparsity_of[snap["budget"]], nnz=result["nnz"],
                                    step=snap["step"], best_epoch=result["best_epoch"], auc=result["test_auc"],
                                    logloss=result["test_logloss"]))
    out["rows"] += equal_count_rows(ctrl_spec, out["searches"], train, val, test, work / f"{data_name}-{model_name}-{seed}",
                                    sparsity_of, common, seed, search_lr, steps, min_occurrences)
    for target in out["searches"]["controller"]["targets"] if saved is None else []:
        nnz = target["nnz"] if target["nnz"] is not None else target["budget"]
        masked = magnitude_ticket(ctrl_spec, initial, full.embedding.embedding.weight, nnz)
        best = fit(masked, train, val, desc="magnitude", **common)
        out["rows"].append(dict(method="magnitude", target=sparsity_of[target["budget"]], nnz=masked.embedding.nnz(),
                                best_epoch=best["epoch"], **evaluate(masked, *test)))
    out["seconds"] = time.perf_counter() - start
    return out


def equal_count_rows(spec, searches, train, val, test, work, sparsity_of, common, seed, search_lr, steps,
                     min_occurrences=0):
    """Where the recipe passed a budget by a jump (more than EQUAL_COUNT_SLACK under the controller's
    count, e.g. 80% at step 2), the controller searched to the recipe's own count, planned where the
    default plan passes that count, and retrained: the comparison at the same non-zero count."""
    from pep_kernels.train import retrain, search
    from pep_kernels.train.controller import cubic_planned_steps

    pairs = zip(searches["controller"]["targets"], searches["recipe"]["targets"])
    counts = {r["nnz"]: c["budget"] for c, r in pairs
              if r["nnz"] is not None and c["nnz"] is not None and r["nnz"] < (1 - EQUAL_COUNT_SLACK) * c["nnz"]}
    if not counts:
        return []
    # the default plan's crossings, with the recipe's counts among the budgets (from the full table)
    merged = sorted([t["budget"] for t in searches["controller"]["targets"]] + list(counts), reverse=True)
    plan = dict(zip(merged, cubic_planned_steps(merged, spec.num_embeddings * spec.embedding_dim, steps)))
    wanted = sorted(counts, reverse=True)
    run_dir = Path(f"{work}-equal")
    run = search(spec, *train, run_dir, wanted, seed=seed, log=common["log"], lr=search_lr, pruning="budget",
                 planned_steps=[plan[c] for c in wanted], min_occurrences=min_occurrences,
                 epochs=math.ceil(1.1 * steps / math.ceil(len(train[1]) / 1024)))
    rows = []
    for snap in run["snapshots"][1:]:
        result = retrain(run_dir, snap["path"], train, val, test, **common)
        rows.append(dict(method=EQUAL, target=sparsity_of[counts[snap["budget"]]],
                         nnz=result["nnz"], step=snap["step"], planned_step=plan[snap["budget"]],
                         best_epoch=result["best_epoch"], auc=result["test_auc"], logloss=result["test_logloss"]))
    return rows


def equal_count_run(saved, work, search_lr, steps, threshold_mode, train_epochs, threshold_init, threshold_slope):
    """`equal_count_rows` for a run saved by an earlier version of this script (its other rows
    are deterministic: they would come out the same)."""
    data_name, model_name, seed = saved["data"], saved["model"], saved["seed"]
    _, (train, val, test), spec, sparsity_of, common = setting(data_name, model_name, seed, train_epochs,
                                                               threshold_mode, threshold_init, threshold_slope)
    rows = equal_count_rows(spec, saved["searches"], train, val, test, work / f"{data_name}-{model_name}-{seed}",
                            sparsity_of, common, seed, search_lr, steps)
    return {"data": data_name, "model": model_name, "seed": seed, "equal_count_rows": rows}


def published_run(data_name, model_name, work):
    """How many steps the published recipe needs for each budget (seed 0, no retrain)."""
    from pep_kernels.cli import load_data
    from pep_kernels.data import split
    from pep_kernels.train import search
    from pep_kernels.train.spec import RunSpec

    data = load_data(data_name, seed=0)
    train = split(data, 0)[0]
    spec = RunSpec(model_name, data.field_dims, 16, model_kwargs=MODEL_KWARGS[model_name], threshold_init=-15.0)
    t0 = time.perf_counter()
    run = search(spec, train.x, train.y, work / f"published-{data_name}-{model_name}", BUDGETS,
                 epochs=math.ceil(PUBLISHED_STEPS / math.ceil(len(train.y) / 1024)), lr=1e-3, pruning="faithful",
                 count_every=10, log=lambda *_: None)
    return {"data": data_name, "model": model_name, "seed": 0, "published": True, "steps": run["steps"],
            "targets": run["targets"], "final_sparsity": 1 - run["final_nnz"] / run["table_size"],
            "seconds": time.perf_counter() - t0}


def worker(task):
    torch.set_num_threads(1)
    kind, data_name, model_name, seed, work, options = task
    try:
        if kind == "published":
            return published_run(data_name, model_name, Path(work))
        if kind == "equal":
            return equal_count_run(options.pop("saved"), Path(work), **options)
        return one_run(data_name, model_name, seed, Path(work), **options)
    except Exception as e:  # reported in the results, the other tasks go on
        return {"data": data_name, "model": model_name, "seed": seed, "error": repr(e)}


def spread(values):
    if not values:
        return "-"
    mean = statistics.mean(values)
    return f"{mean:+.4f} ± {statistics.stdev(values):.4f}".lstrip("+") if len(values) > 1 else f"{mean:.4f}"


def signed(values):
    if not values:
        return "-"
    mean = statistics.mean(values)
    return f"{mean:+.4f} ± {statistics.stdev(values):.4f}" if len(values) > 1 else f"{mean:+.4f}"


def report(results, command, seconds, equal_count=None):
    runs = [r for r in results if "rows" in r]
    published = [r for r in results if r.get("published")]
    errors = [r for r in results if "error" in r]
    groups = {}
    for r in runs:
        groups.setdefault((r["data"], r["model"]), []).append(r)
    lines = ["### Planned vs reached (controller)", "",
             "Step at which each budget was passed against its planned step, over the seeds; "
             "`off` is (reached - planned) / planned.", "",
             "| data | model | budget | planned step | reached steps (per seed) | largest off | non-zeros (per seed) |",
             "|---|---|---|---|---|---|---|"]
    worst = 0.0
    for (data, model), rs in groups.items():
        for i, budget in enumerate(BUDGETS):
            targets = [r["searches"]["controller"]["targets"][i] for r in rs]
            planned = targets[0]["planned_step"]
            reached = [t["reached_step"] for t in targets]
            offs = [abs(s - t["planned_step"]) / t["planned_step"] for s, t in zip(reached, targets) if s is not None]
            worst = max([worst] + offs)
            lines.append(f"| {data} | {model} | {budget:.0%} ({targets[0]['budget']}) | {planned} | "
                         f"{', '.join(str(s) if s is not None else 'not reached' for s in reached)} | "
                         f"{f'{max(offs):.1%}' if offs else '-'} | {', '.join(str(t['nnz']) for t in targets)} |")
    lines += ["", f"Largest |reached - planned| / planned: {worst:.1%}."]
    cut = {key: [r["searches"]["controller"].get("cut_rows", 0) for r in rs] for key, rs in groups.items()}
    if any(any(rows) for rows in cut.values()):
        lines += ["", "Rows cut before the controller's searches (features seen fewer than `--min-occurrences` times "
                  "in the seed's training split), per seed: " + "; ".join(
                      f"{data} {model} {', '.join(map(str, rows))}" for (data, model), rows in cut.items()) + "."]
    lines += ["",
              "### Test AUC at equal budgets", "",
              "Mean ± standard deviation over the seeds. `Δ full`: AUC minus the same seed's full table; "
              "`ctrl - recipe`: controller minus the recipe's pruning at the same budget, paired by seed, at the "
              "same non-zero count: where the recipe's snapshot holds more than 1% fewer non-zeros than the "
              "controller's (it passed the budget by a jump, such as 80% at step 2), the controller searched to "
              "the recipe's own count instead, planned where the default plan passes that count, and retrained "
              "(marked †; the seeds where the counts were within 1% pair with the controller's row).", "",
              "| data | model | budget | full AUC | controller AUC | Δ full | recipe AUC | Δ full | ctrl - recipe | "
              "magnitude AUC | Δ full | ctrl - magnitude | recipe: non-zeros at step | seeds |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (data, model), rs in groups.items():
        full = {r["seed"]: next(x for x in r["rows"] if x["method"] == "full")["auc"] for r in rs}
        lines.append(f"| {data} | {model} | full table | {spread(list(full.values()))} | | | | | | | | | | {len(rs)} |")
        for budget in BUDGETS:
            per = {m: {r["seed"]: x for r in rs for x in r["rows"] if x["method"] == m and x["target"] == budget}
                   for m in ("controller", "recipe", "magnitude", EQUAL)}
            cells = []
            for m in ("controller", "recipe", "magnitude"):
                aucs = [x["auc"] for x in per[m].values()]
                cells += [spread(aucs), signed([x["auc"] - full[s] for s, x in per[m].items()])]
                if m != "controller":  # against the recipe, at its own count where the controller's differs
                    ctrl = {**per["controller"], **per[EQUAL]} if m == "recipe" else per["controller"]
                    cells.append(signed([ctrl[s]["auc"] - x["auc"] for s, x in per[m].items() if s in ctrl])
                                 + (" †" if m == "recipe" and per[EQUAL] else ""))
            steps = [x["step"] for x in per["recipe"].values()]
            nnz = [x["nnz"] for x in per["recipe"].values()]
            recipe_at = f"{min(nnz)}-{max(nnz)} at {min(steps)}-{max(steps)}" if steps else "not reached"
            if steps and len(steps) < len(rs):
                recipe_at += f" ({len(rs) - len(steps)} not reached)"
            lines.append(f"| {data} | {model} | {budget:.0%} | | {' | '.join(cells)} | {recipe_at} | {len(rs)} |")
    equal = sorted(((r, x) for r in runs for x in r["rows"] if x["method"] == EQUAL),
                   key=lambda rx: (rx[0]["data"], rx[0]["model"], rx[1]["target"], rx[0]["seed"]))
    if equal:
        lines += ["", "#### The controller at the recipe's count (†)", "",
                  "| data | model | budget | seed | recipe non-zeros | controller non-zeros | planned step | reached step "
                  "| AUC | Δ full | ctrl - recipe |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r, x in equal:
            full = next(y for y in r["rows"] if y["method"] == "full")["auc"]
            recipe = next(y for y in r["rows"] if y["method"] == "recipe" and y["target"] == x["target"])
            lines.append(f"| {r['data']} | {r['model']} | {x['target']:.0%} | {r['seed']} | {recipe['nnz']} | {x['nnz']} | "
                         f"{x['planned_step']} | {x['step']} | {x['auc']:.4f} | {x['auc'] - full:+.4f} | "
                         f"{x['auc'] - recipe['auc']:+.4f} |")
    lines += ["", "### Search steps", "",
              "| data | model | controller: steps to 95% | recipe (-4, 1e-2): steps to 90% / 95% | "
              "controller search s | recipe search s |", "|---|---|---|---|---|---|"]
    for (data, model), rs in groups.items():
        ctrl = [r["searches"]["controller"]["steps"] for r in rs]
        rec90 = [r["searches"]["recipe"]["targets"][1]["reached_step"] for r in rs]
        rec95 = [r["searches"]["recipe"]["targets"][2]["reached_step"] for r in rs]
        fmt = lambda v: ", ".join(str(x) if x is not None else "-" for x in v)  # noqa: E731
        lines.append(f"| {data} | {model} | {fmt(ctrl)} | {fmt(rec90)} / {fmt(rec95)} | "
                     f"{statistics.mean(r['searches']['controller']['seconds'] for r in rs):.0f} | "
                     f"{statistics.mean(r['searches']['recipe']['seconds'] for r in rs):.0f} |")
    for p in published:
        reached = ", ".join(f"{b:.0%}: {t['reached_step'] if t['reached_step'] is not None else 'not reached'}"
                            for b, t in zip(BUDGETS, p["targets"]))
        lines.append(f"\nPublished recipe (threshold_init -15, lr 1e-3, faithful pruning), {p['data']} {p['model']} "
                     f"seed 0: {reached} after {p['steps']} steps ({p['final_sparsity']:.1%} sparse at the end, "
                     f"{p['seconds']:.0f} s).")
    for e in errors:
        lines.append(f"\nFAILED: {e['data']} {e['model']} seed {e['seed']}: {e['error']}")
    lines.append(f"\nCommand: `{command}`; {seconds:.0f} s.")
    if equal_count:
        lines.append(f"\nRows marked †, added to that run's results by `{equal_count['command']}`; "
                     f"{equal_count['seconds']:.0f} s.")
    return "\n".join(lines)


def add_equal_counts(raw, args, command, start):
    saved = json.loads(raw.read_text())
    runs = {(r["data"], r["model"], r["seed"]): r for r in saved["results"] if "searches" in r}
    made = build_parser().parse_args(shlex.split(saved["command"])[2:])  # the saved run's settings
    options = dict(search_lr=made.search_lr, steps=made.steps, threshold_mode=made.threshold_mode,
                   train_epochs=made.train_epochs, threshold_init=made.threshold_init,
                   threshold_slope=made.threshold_slope)
    with tempfile.TemporaryDirectory() as work, multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        tasks = [("equal", *key, work, dict(options, saved=run)) for key, run in runs.items()
                 if not any(x["method"] == EQUAL for x in run["rows"])]
        for result in pool.imap_unordered(worker, sorted(tasks, key=lambda t: t[2] == "autoint")):
            log(f"{result['data']} {result['model']} seed {result['seed']}: "
                f"{'error ' + result['error'] if 'error' in result else 'done'}, {time.perf_counter() - start:.0f} s")
            if "error" not in result:
                runs[result["data"], result["model"], result["seed"]]["rows"] += result["equal_count_rows"]
            saved["equal_count"] = {"command": command, "seconds": time.perf_counter() - start}
            raw.write_text(json.dumps(saved))
    args.out.write_text(report(saved["results"], saved["command"], saved["seconds"], saved.get("equal_count")) + "\n")
    print(args.out.read_text())


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", default=["ml-100k", "synthetic=50000"])
    parser.add_argument("--models", nargs="+", default=list(MODEL_KWARGS), choices=list(MODEL_KWARGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=3)
    parser.add_argument("--train-epochs", type=int, default=TRAIN_EPOCHS,
                        help="most epochs of the full table and of each retrain")
    parser.add_argument("--search-lr", type=float, default=SEARCH_LR, help="the controller search's learning rate")
    parser.add_argument("--steps", type=int, default=STEPS, help="the controller search's step budget")
    parser.add_argument("--threshold-mode", default="feature_dim", help="PEP's threshold granularity (PEP_SPEC 1)")
    parser.add_argument("--threshold-init", type=float, default=-15.0, help="the controller search's threshold_init")
    parser.add_argument("--threshold-slope", type=float, default=0.0,
                        help="the controller search's threshold_slope (dimension j starts at init + j * slope)")
    parser.add_argument("--min-occurrences", type=int, default=0,
                        help="the controller's searches cut the features seen fewer than this many times")
    parser.add_argument("--reuse", nargs="+", type=Path, default=[],
                        help="saved results (.json) to take the full, recipe and magnitude rows from: only the "
                             "controller runs")
    parser.add_argument("--no-published", action="store_true", help="skip the long published-recipe run")
    parser.add_argument("--report-only", action="store_true", help="rewrite the markdown from the .json")
    parser.add_argument("--equal-count", action="store_true",
                        help="add the equal-count controller rows to the runs in the .json (made without them)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "budget_results.md")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    raw = args.out.with_suffix(".json")
    command = "python experiments/equal_budgets/budget_results.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.report_only:
        saved = json.loads(raw.read_text())
        args.out.write_text(report(saved["results"], saved["command"], saved["seconds"], saved.get("equal_count")) + "\n")
        return
    start = time.perf_counter()
    if args.equal_count:
        add_equal_counts(raw, args, command, start)
        return
    with tempfile.TemporaryDirectory() as work:
        reused = {(r["data"], r["model"], r["seed"]): r for f in args.reuse
                  for r in json.loads(f.read_text())["results"] if "searches" in r}
        tasks = [] if args.no_published or reused else [("published", args.data[0], "fm", 0, work, None)]
        # AutoInt (ten times slower per step) last, so that an interrupted run has the other models whole
        runs = [(d, m, s) for d in args.data for m in args.models for s in args.seeds]
        options = dict(train_epochs=args.train_epochs, search_lr=args.search_lr, steps=args.steps,
                       threshold_mode=args.threshold_mode, threshold_init=args.threshold_init,
                       threshold_slope=args.threshold_slope, min_occurrences=args.min_occurrences)
        missing = [run for run in runs if reused and run not in reused]
        if missing:
            raise SystemExit(f"--reuse: no saved results for {missing}")
        tasks += [("run", d, m, s, work, dict(options, saved=reused.get((d, m, s)))) for d, m, s in sorted(
            runs, key=lambda r: (r[1] == "autoint", args.data.index(r[0])))]
        results = []
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
            for result in pool.imap_unordered(worker, tasks):
                results.append(result)
                log(f"{result['data']} {result['model']} seed {result['seed']}: "
                    f"{'error ' + result['error'] if 'error' in result else 'done'}, {time.perf_counter() - start:.0f} s")
                seconds = time.perf_counter() - start
                raw.write_text(json.dumps({"command": command, "seconds": seconds, "results": results}))
                args.out.write_text(report(results, command, seconds) + "\n")
    print(args.out.read_text())


if __name__ == "__main__":
    main()
