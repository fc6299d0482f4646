"""`pep demo`: the whole PEP workflow on MovieLens-100K (or synthetic data without recbole).

Full-table baseline, one budgeted PEP search (the budget controller from the published
threshold_init -15, at lr 1e-2 on a plan of PLAN_STEPS steps), a lottery-ticket retrain of each
snapshot, the published recipe run beside it, and a table and two plots. Why these settings:
docs/design/budget_controller.md.
"""

import json
import math
import time
from pathlib import Path

import torch

from .data import load_movielens_100k, split, synthetic_ctr_data
from .models import FieldEmbedding
from .train import evaluate, retrain, search
from .train.loop import fit
from .train.report import plot_auc_vs_parameters, plot_planned_vs_reached, planned_vs_reached_lines, sparse_bytes
from .train.spec import RunSpec

BUDGETS = (0.8, 0.9, 0.95)
THRESHOLD_INIT = -15.0  # the published value
PUBLISHED_LR, TRAIN_LR = 1e-3, 1e-2  # the published recipe's; the search's, the baseline's and the retrains'
PLAN_STEPS = 3000


def demo_data(seed=0, log=print):
    """MovieLens-100K with ids when recbole is installed, else the synthetic task; and its name."""
    try:
        return load_movielens_100k(), "MovieLens-100K (with user and item ids)"
    except FileNotFoundError as e:
        log(f"{e}; using synthetic data instead")
        return synthetic_ctr_data(100_000, seed), "synthetic CTR"


def run_demo(out_dir="pep-demo", data=None, model="fm", embedding_dim=16, epochs=30, device="cpu", backend="auto",
             seed=0, log=print):
    """`data`: a (CTRData, name) pair, or None for `demo_data`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    data, name = data or demo_data(seed, log)
    train, val, test = ((part.x, part.y) for part in split(data, seed))
    table_size = sum(data.field_dims) * embedding_dim
    log(f"{name}: {len(data)} examples, {len(data.field_dims)} fields, table {sum(data.field_dims)} x {embedding_dim}; "
        f"model {model}; output in {out_dir}/")

    spec = RunSpec(model, data.field_dims, embedding_dim, threshold_init=THRESHOLD_INIT)
    torch.manual_seed(seed)
    baseline_model = spec.build(FieldEmbedding(data.field_dims, embedding_dim))
    fit(baseline_model, train, val, epochs=epochs, patience=3, lr=TRAIN_LR, seed=seed, device=device,
        log=lambda *_: None, desc="baseline")
    baseline = evaluate(baseline_model, *test, device=device)
    baseline.update(nnz=table_size, sparsity=0.0)

    steps_per_epoch = math.ceil(len(train[1]) / 1024)
    plan_steps = min(PLAN_STEPS, epochs * steps_per_epoch)
    search_epochs = math.ceil(plan_steps / steps_per_epoch) + 1  # room for a late budget
    run = search(spec, *train, out_dir / "search", BUDGETS, epochs=search_epochs, lr=TRAIN_LR, seed=seed,
                 device=device, backend=backend, steps=plan_steps, log=lambda *_: None)
    published = search(spec, *train, out_dir / "search-published", BUDGETS, epochs=search_epochs,
                       lr=PUBLISHED_LR, seed=seed, device=device, backend=backend, pruning="faithful",
                       log=lambda *_: None)

    rows = []
    for snap in run["snapshots"][1:]:
        result = retrain(out_dir / "search", snap["path"], train, val, test, epochs=epochs, patience=3,
                         lr=TRAIN_LR, seed=seed, device=device, log=lambda *_: None)
        rows.append(dict(result, budget=snap["budget"], step=snap["step"]))

    num_rows = sum(data.field_dims)
    lines = [
        f"{'table':<22} {'non-zeros':>10} {'sparsity':>9} {'bytes':>9} {'test AUC':>9} {'log-loss':>9} {'AUC - full':>11}",
        f"{'full table':<22} {table_size:>10} {0:>9.1%} {table_size * 4:>9} {baseline['auc']:>9.4f} "
        f"{baseline['logloss']:>9.4f} {0:>+11.4f}",
    ]
    for r in rows:
        lines.append(
            f"{'PEP <= ' + str(r['budget']) + ' (step ' + str(r['step']) + ')':<22} {r['nnz']:>10} {r['sparsity']:>9.1%} "
            f"{sparse_bytes(num_rows, embedding_dim, r['nnz']):>9} {r['test_auc']:>9.4f} {r['test_logloss']:>9.4f} "
            f"{r['test_auc'] - baseline['auc']:>+11.4f}"
        )
    published_sparsity = 1 - published["final_nnz"] / table_size
    lines += ["", "budget controller, planned vs reached:", *planned_vs_reached_lines(run)]
    lines.append(
        f"budgets not reached: {run['unreached'] or 'none'}. The published recipe without the controller "
        f"(threshold_init -15, lr 1e-3) reached {published_sparsity:.1%} sparsity in {published['steps']} steps."
    )
    baseline_row = dict(test_auc=baseline["auc"], nnz=table_size)
    plot_auc_vs_parameters(rows, baseline_row, out_dir / "auc_vs_parameters.png")
    plot_planned_vs_reached(run, out_dir / "planned_vs_reached.png")
    summary = {"data": name, "baseline": baseline, "retrained": rows, "targets": run["targets"],
               "published_recipe_sparsity": published_sparsity}
    (out_dir / "demo.json").write_text(json.dumps(summary, indent=1))
    lines.append(f"plots: {out_dir / 'auc_vs_parameters.png'}, {out_dir / 'planned_vs_reached.png'}; "
                 f"{time.perf_counter() - start:.0f} s")
    log("\n".join(lines))
    return summary
