"""`pep demo`: the whole PEP workflow on MovieLens-100K (or synthetic data without recbole).

Full-table baseline, one budgeted PEP search (the budget controller from the published
threshold_init -15, at lr 1e-2 on a plan of PLAN_STEPS steps), a lottery-ticket retrain of each
snapshot, the published recipe run beside it, and a table and two plots. Why these settings:
docs/design/budget_controller.md. `pep demo --model dlrm` (`run_dlrm_demo`) runs the workflow on a
user's kind of model instead: a plain PyTorch DLRM converted in one call, searched to byte budgets
of the whole model, retrained, exported and served from its stores.
"""

import json
import math
import time
from pathlib import Path

import torch

from .conversion import PEPConfig, convert, convert_to_serving
from .data import load_movielens_100k, split, synthetic_ctr_data
from .models import DLRM, DLRMBatches, FieldEmbedding
from .optim import Adam
from .train import evaluate, retrain, search
from .train.batches import run_model, to_device
from .train.evaluate import evaluate_batches
from .train.loop import fit, fit_batches
from .train.tables import export_stores, load_stores, retrain_model, search_model
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


DLRM_DIM, DLRM_BOTTOM, DLRM_TOP = 32, (64,), (64,)


def dlrm_demo_data(seed=0, log=print):
    """MovieLens-100K for a DLRM (genres as a multi-hot bag, age and year dense) when recbole is
    installed, else the synthetic task (one-hot fields only); and its name."""
    try:
        return (load_movielens_100k(genres_as_bag=True, dense=True),
                "MovieLens-100K (ids and side fields one-hot, genres multi-hot, age and year dense)")
    except FileNotFoundError as e:
        log(f"{e}; using synthetic data instead")
        return synthetic_ctr_data(100_000, seed), "synthetic CTR"


def run_dlrm_demo(out_dir="pep-demo-dlrm", data=None, epochs=30, device="cpu", backend="auto", seed=0, log=print):
    """The workflow on a user's model: a DLRM (`pep_kernels.models.DLRM`, one nn.EmbeddingBag per
    feature) trained with full tables; the same model converted by `pep_kernels.convert` and
    searched to 80/90/95% fewer bytes than its full tables (one budget for all its tables);
    each snapshot retrained, exported to stores and served from them. `data`: a (CTRData, name)
    pair, or None for `dlrm_demo_data`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    data, name = data or dlrm_demo_data(seed, log)
    parts = split(data, seed)
    train = DLRMBatches(parts[0], 1024, seed)
    val, test = (DLRMBatches(part, 8192, shuffle=False) for part in parts[1:])
    tables = DLRMBatches.tables(data)
    num_dense = 0 if data.dense is None else data.dense.shape[1]
    full_bytes = 4 * DLRM_DIM * sum(tables.values())
    log(f"{name}: {len(data)} examples; output in {out_dir}/\n"
        f"DLRM: {num_dense} dense features, {len(tables)} tables of {DLRM_DIM} dims "
        f"({', '.join(f'{t} {n}' for t, n in tables.items())} rows): {full_bytes} bytes")

    def make_model():
        torch.manual_seed(seed)
        return DLRM(num_dense, tables, DLRM_DIM, bottom_mlp=DLRM_BOTTOM, top_mlp=DLRM_TOP)

    config = PEPConfig(threshold_init=THRESHOLD_INIT, backend=backend,
                       optimizer=Adam(lr=TRAIN_LR, weight_decay=1e-5, mode="faithful"))
    quiet = dict(device=device, log=lambda *_: None)
    baseline_model = make_model()
    fit_batches(baseline_model, train, val, epochs=epochs, patience=3, lr=TRAIN_LR, seed=seed, desc="baseline", **quiet)
    baseline = evaluate_batches(baseline_model, test, device=device)

    plan_steps = min(PLAN_STEPS, epochs * len(train))
    budgets = [f"{math.floor((1 - b) * full_bytes)}B" for b in BUDGETS]
    run = search_model(convert(make_model(), config), train, out_dir / "search", budgets,
                       epochs=math.ceil(plan_steps / len(train)) + 1, steps=plan_steps, lr=TRAIN_LR, seed=seed,
                       **quiet)
    rows = []
    for level in run["levels"][1:]:
        model = convert(make_model(), config)
        result = retrain_model(model, out_dir / "search", level["level"], train, val, test, epochs=epochs, patience=3,
                               lr=TRAIN_LR, seed=seed,
                               save_path=out_dir / f"retrained-level{level['level']}.safetensors",
                               **quiet)
        store_dir = out_dir / f"stores-level{level['level']}"
        export_stores(model, store_dir)
        retrained_scores = _scores(model, test, device)
        convert_to_serving(model, load_stores(store_dir))
        served = evaluate_batches(model, test, device=device)
        rows.append(dict(result, step=level["step"], budget=run["budgets"][level["level"] - 1],
                         served_auc=served["auc"], served_exact=torch.equal(_scores(model, test, device),
                                                                             retrained_scores)))

    lines = [f"{'tables':<24} {'store bytes':>11} {'of full':>8} {'step':>6} {'test AUC':>9} {'AUC - full':>11} "
             f"{'served from stores':>19}",
             f"{'full (fp32, dense)':<24} {full_bytes:>11} {1:>8.1%} {'':>6} {baseline['auc']:>9.4f} {0:>+11.4f}"]
    for r in rows:
        served = "same scores" if r["served_exact"] else f"AUC {r['served_auc']:.4f}"
        lines.append(f"{'PEP <= ' + str(r['budget']) + 'B':<24} {r['store_bytes']:>11} "
                     f"{r['store_bytes'] / full_bytes:>8.1%} {r['step']:>6} {r['test_auc']:>9.4f} "
                     f"{r['test_auc'] - baseline['auc']:>+11.4f} {served:>19}")
    lines += ["", "entries kept per table (of rows x dims), by budget:"]
    for table, n in tables.items():
        kept = "  ".join(f"{r['tables'][f'embeddings.{table}']['nnz']:>6}" for r in rows)
        lines.append(f"  {table:<18} {n * DLRM_DIM:>7}  {kept}")
    if run["unreached"]:
        lines.append(f"budgets not reached: {run['unreached']}")
    summary = {"data": name, "full_bytes": full_bytes, "baseline": baseline, "retrained": rows,
               "search": {k: run[k] for k in ("budgets", "steps", "plan", "levels", "unreached")}}
    (out_dir / "demo.json").write_text(json.dumps(summary, indent=1))
    lines.append(f"{time.perf_counter() - start:.0f} s")
    log("\n".join(lines))
    return summary


@torch.no_grad()
def _scores(model, batches, device):
    model.eval()
    return torch.cat([run_model(model, to_device(inputs, device)) for inputs, _ in batches])
