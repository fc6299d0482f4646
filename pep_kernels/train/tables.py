"""The PEP workflow on a user's model: any number of PEP tables, one budget for the whole model.

The model is the user's `nn.Module` with PEP tables in it (`pep_kernels.convert`); the data is
any iterable of `(inputs, labels)` batches (`pep_kernels.train.batches`). Tables are named by
their fully qualified names in the model.

`search_model` (PEP_SPEC section 4 over many tables). The budgets are the whole model's: a
sparsity in (0, 1) of all the tables' entries, a count of non-zeros >= 1, or a size in bytes
("24000B") of the fp32 stores of all the tables (`SparseRowStore`). A budget in bytes is a
budget in entries: a store of an N x d table holds 4 (N + 1) bytes of row offsets, and per
entry 4 bytes of value and 1 byte of column id (2 for d > 256), or less with a row bitmask, so
`cost = sum over tables of (4 + id bytes) * nnz` must stay within the bytes less the offsets.

`allocation` decides who gets the entries:

- "shared" (the default): one budget for all tables. One controller (`controller`) scales the
  thresholds of every table by one gk, from the whole model's count, so the entries go where
  their magnitudes clear their learned thresholds, whatever table they are in: the search, not a
  split by hand, decides each table's share.
- "even": the budget split over the tables in proportion to their entries (every table keeps
  the same fraction, at least one entry), each table with its own controller and gk: the split
  by hand that "shared" is compared with.

A snapshot of a budget is taken for each group of tables (all of them, or one table under
"even") at the first counted step where the group is within its share, and holds its pruned
tables: `snapshot-level<k>-<group>.safetensors` (level 0: step 0, all tables; level k: the k-th
budget, largest first). The search stops when every group has passed every budget. It reports,
per budget and table, the kept entries, rows kept, dims-per-row histogram and store bytes.

Files of a run folder: `initial.safetensors` (the model's whole state at step 0: the lottery
ticket), the snapshots, `checkpoint.safetensors` (model, torch optimizer, RNG, controllers and
progress, written atomically every `checkpoint_every` steps and at epoch ends: calling
`search_model` again resumes) and `search.json`. `retrain_model` retrains a level's masks from
the initial state (PEP_SPEC section 5), `load_retrained_model` reads a retrained model back,
`export_stores` writes each table's store (`<fqn>.store`) and `load_stores` reads them for
`pep_kernels.convert_to_serving`.
"""

import json
import math
from pathlib import Path

import torch

from ..conversion import masked_twin, pep_tables, trained_tables
from ..store import SparseRowStore, encoded_nbytes
from . import checkpoint
from .controller import LOG_GK_RANGE, BudgetController, cubic_planned_steps
from .evaluate import evaluate_batches
from .loop import epoch_batches, fit_batches, make_optimizer, train_steps

ALLOCATIONS = ("shared", "even")
PRUNING_MODES = ("budget", "faithful")
RUN_FILES = ("initial.safetensors", "checkpoint.safetensors", "snapshot-level*.safetensors", "search.json")
SHARED_GROUP = "all"


def _entry_bytes(dim):
    """Store bytes per entry in the column-id layout: an fp32 value and its column id."""
    return 4 + (1 if dim <= 256 else 2)


def _offset_bytes(num_rows):
    return 4 * (num_rows + 1)


class ModelBudgets:
    """The budgets of a model's tables in one unit, largest first: `unit` "entries" (sparsities
    and counts) or "bytes"; `costs` what each budget allows of `cost` (the weighted count)."""

    def __init__(self, budgets, shapes):
        self.shapes = dict(shapes)  # fqn -> (N, d)
        self.entries = sum(n * d for n, d in self.shapes.values())
        in_bytes = [isinstance(b, str) and b.endswith("B") and b[:-1].isdigit() for b in budgets]
        if not budgets:
            raise ValueError("need at least one budget")
        if any(in_bytes) and not all(in_bytes):
            raise ValueError(f"budgets must all be bytes (like 24000B) or all sparsities and counts, got "
                             f"{list(budgets)}")
        self.unit = "bytes" if all(in_bytes) else "entries"
        self.fixed = sum(_offset_bytes(n) for n, _ in self.shapes.values()) if self.unit == "bytes" else 0
        totals = set()
        for b in budgets:
            totals.add(self._total(b))
        self.totals = sorted(totals, reverse=True)  # in the unit
        self.costs = [total - self.fixed for total in self.totals]

    def weight(self, fqn):
        """Cost of one entry of table `fqn`."""
        return _entry_bytes(self.shapes[fqn][1]) if self.unit == "bytes" else 1

    def in_unit(self, members, cost):
        """A group's cost as the budget's unit (bytes add the row offsets of its tables)."""
        return cost + sum(_offset_bytes(self.shapes[fqn][0]) for fqn in members if self.unit == "bytes")

    def cost(self, counts):
        """The weighted count of {fqn: nnz}."""
        return sum(self.weight(fqn) * nnz for fqn, nnz in counts.items())

    def _total(self, b):
        if self.unit == "bytes":
            total = int(b[:-1])
            smallest = self.fixed + min(_entry_bytes(d) for _, d in self.shapes.values())
            if total < smallest:
                raise ValueError(f"{b} is smaller than the stores of these tables with one non-zero ({smallest}B: "
                                 f"{self.fixed}B of row offsets)")
            return total
        try:
            value = float(b)
        except (TypeError, ValueError):
            raise ValueError(f"budget {b!r} is neither a sparsity in (0, 1), a non-zero count >= 1 nor bytes "
                             "like 24000B") from None
        if 0 < value < 1:
            return max(1, int(math.floor((1 - value) * self.entries + 1e-9)))
        if value >= 1 and value.is_integer():
            return int(value)
        raise ValueError(f"budget {b!r} is neither a sparsity in (0, 1) nor a non-zero count >= 1")

    def groups(self, allocation):
        """{group: (tables, costs per budget)}: one group of every table ("shared"), or one per
        table with its share of each budget ("even": the same fraction of its entries, rounded
        down, at least one entry)."""
        if allocation == "shared":
            return {SHARED_GROUP: (list(self.shapes), list(self.costs))}
        weighted = sum(self.weight(fqn) * n * d for fqn, (n, d) in self.shapes.items())
        return {fqn: ([fqn], [self.weight(fqn) * max(1, math.floor(cost / weighted * n * d + 1e-9))
                              for cost in self.costs])
                for fqn, (n, d) in self.shapes.items()}


def table_report(table):
    """What a pruned table (N, d) keeps: entries, rows, the dims-per-row histogram (entry k: rows
    keeping k dims) and the bytes of its fp32 store."""
    dims = (table != 0).sum(1)
    nnz, rows_kept = int(dims.sum()), int(torch.count_nonzero(dims))
    num_rows, dim = table.shape
    return {"nnz": nnz, "sparsity": 1 - nnz / table.numel(), "rows_kept": rows_kept,
            "dims_per_row_histogram": torch.bincount(dims, minlength=dim + 1).tolist(),
            "store_bytes": encoded_nbytes(num_rows, dim, nnz, rows_kept)}


def _tables_of(model):
    tables = pep_tables(model)
    if not tables:
        raise ValueError("the model holds no PEP table: convert it first (pep_kernels.convert)")
    if "" in tables:
        raise ValueError("the model is itself a PEP table; search a model that holds it")
    return tables


def _describe(tables):
    return {fqn: {"kind": type(t).__name__, "shape": [t.num_embeddings, t.embedding_dim],
                  "threshold_mode": t.threshold_mode} for fqn, t in tables.items()}


def _snapshot(out_dir, level, group, step, tables):
    pruned = {fqn: tables[fqn].pruned_weight() for fqn in sorted(tables)}
    path = out_dir / f"snapshot-level{level}-{group}.safetensors"
    meta = {"level": level, "group": group, "step": step, "tables": sorted(pruned)}
    checkpoint.save(path, pruned, meta)
    return {"level": level, "group": group, "step": step, "path": path.name,
            "tables": {fqn: table_report(t) for fqn, t in pruned.items()}}


def search_model(model, train, out_dir, budgets, *, epochs=10, steps=None, allocation="shared", pruning="budget",
                 lr=1e-3, weight_decay=1e-5, clip_norm=100.0, seed=0, device="cpu", count_every=1,
                 checkpoint_every=1000, loss_fn=None, log=print):
    """Runs (or resumes) a budgeted PEP search of every PEP table of `model` on the batches of
    `train`; returns the summary also written to search.json.

    The tables train as their `PEPConfig` says (a fused row optimizer, or with the rest); the rest
    of the model (and every parameter without a fused optimizer) with torch's Adam (`lr`,
    coupled L2 `weight_decay`), gradients clipped to `clip_norm`. `pruning="budget"` steers each
    group's gk so that its count passes each budget on a cubic plan ending at step `steps`
    (default: every step of `epochs`, which needs `len(train)`); "faithful" leaves gk alone."""
    if allocation not in ALLOCATIONS:
        raise ValueError(f"unknown allocation {allocation!r}; expected one of {ALLOCATIONS}")
    if pruning not in PRUNING_MODES:
        raise ValueError(f"unknown pruning {pruning!r}; expected one of {PRUNING_MODES}")
    if isinstance(count_every, bool) or not isinstance(count_every, int) or count_every < 1:
        raise ValueError(f"count_every must be a positive int, got {count_every!r}")
    if pruning == "faithful" and steps is not None:
        raise ValueError("steps plans the budget pruning; faithful pruning has no plan")
    if steps is None and pruning == "budget":
        if not hasattr(train, "__len__"):
            raise ValueError("the batches have no len(): give the plan's step budget as steps")
        steps = epochs * len(train)
    out_dir, device = Path(out_dir), torch.device(device)
    if out_dir.is_dir():
        checkpoint.remove_stale_temporaries(out_dir, RUN_FILES)
    torch.manual_seed(seed)
    model.to(device)
    tables = _tables_of(model)
    plan = ModelBudgets(budgets, {fqn: (t.num_embeddings, t.embedding_dim) for fqn, t in tables.items()})
    groups = plan.groups(allocation)
    optimizer = make_optimizer(model, lr, weight_decay)
    identity = json.loads(json.dumps({
        "tables": _describe(tables), "budgets": plan.totals, "unit": plan.unit, "allocation": allocation,
        "pruning": pruning, "seed": seed, "parameters": {k: list(v.shape) for k, v in model.state_dict().items()}}))
    state = {"step": 0, "epoch": 0, "batch": 0, "snapshots": [],
             "remaining": {g: list(costs) for g, (_, costs) in groups.items()},
             "base_gk": {fqn: t.gk for fqn, t in tables.items()}}
    history = []  # [step, nnz of each table (sorted by name), gk of each group] after each counted step
    names = sorted(tables)

    ckpt_path = out_dir / "checkpoint.safetensors"
    if ckpt_path.exists():
        tensors, meta = checkpoint.load(ckpt_path)
        if meta.get("identity") != identity:
            saved = meta.get("identity") if isinstance(meta.get("identity"), dict) else {}
            differ = sorted(k for k in set(identity) | set(saved) if saved.get(k) != identity.get(k))
            raise ValueError(f"{ckpt_path} belongs to another run ({', '.join(differ)} differ); use a new folder")
        model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        checkpoint.load_optimizer(optimizer, tensors)
        torch.set_rng_state(tensors["rng"])
        history = tensors["history"].tolist()
        state = meta["state"]
        log(f"resumed {out_dir} at step {state['step']} (epoch {state['epoch'] + 1}, batch {state['batch']})")
    else:
        checkpoint.save(out_dir / "initial.safetensors", model.state_dict(),
                        {"tables": _describe(tables), "seed": seed})
        state["snapshots"].append(_snapshot(out_dir, 0, SHARED_GROUP, 0, tables))
        initial = {fqn: report["nnz"] for fqn, report in state["snapshots"][0]["tables"].items()}
        if pruning == "budget":
            state["plan"] = {"planned_steps": cubic_planned_steps(plan.costs, plan.cost(initial), steps),
                             "initial_cost": {g: plan.cost({fqn: initial[fqn] for fqn in members})
                                              for g, (members, _) in groups.items()}}
    controllers = {}
    if pruning == "budget":
        for g, (members, costs) in groups.items():
            controllers[g] = BudgetController(costs, state["plan"]["planned_steps"], state["plan"]["initial_cost"][g])
            if "controllers" in state:
                controllers[g].load_state_dict(state["controllers"][g])
            for fqn in members:
                tables[fqn].gk = state["base_gk"][fqn] * controllers[g].gk
    saturation_warned = set()

    def save_checkpoint():
        tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
        tensors.update(checkpoint.optimizer_tensors(optimizer))
        tensors["rng"] = torch.get_rng_state()
        tensors["history"] = torch.tensor(history, dtype=torch.float64).reshape(-1, 1 + len(names) + len(groups))
        state["controllers"] = {g: c.state_dict() for g, c in controllers.items()}
        checkpoint.save(ckpt_path, tensors, {"identity": identity, "state": state})

    def after_step(loss):
        state["step"] += 1
        state["batch"] += 1
        step = state["step"]
        if step % count_every:
            return False
        counts = {fqn: tables[fqn].nnz() for fqn in names}
        history.append([step] + [counts[fqn] for fqn in names] +
                       [tables[members[0]].gk / state["base_gk"][members[0]] for members, _ in groups.values()])
        for g, (members, _) in groups.items():
            remaining = state["remaining"][g]
            cost = plan.cost({fqn: counts[fqn] for fqn in members})
            if remaining and cost <= remaining[0]:
                level = len(plan.costs) - len(remaining) + 1
                remaining.pop(0)
                state["snapshots"].append(_snapshot(out_dir, level, g, step, {fqn: tables[fqn] for fqn in members}))
                log(f"step {step}: {g} within budget {level} ({plan.totals[level - 1]} {plan.unit} for the model)")
            if g in controllers and remaining:
                gk = controllers[g].update(step, cost)
                for fqn in members:
                    tables[fqn].gk = state["base_gk"][fqn] * gk
                if controllers[g].saturated and g not in saturation_warned:
                    saturation_warned.add(g)
                    log(f"warning: at step {step} the gk of {g} reached the top of its range "
                        f"(e^{LOG_GK_RANGE[1]:.0f}): lower the lr or plan fewer steps")
        if step % checkpoint_every == 0:
            save_checkpoint()
        return not any(state["remaining"].values())

    done = not any(state["remaining"].values())
    while not done and state["epoch"] < epochs:
        done = train_steps(model, optimizer, epoch_batches(train, state["epoch"], state["batch"]), device, clip_norm,
                           after_step, desc=f"search epoch {state['epoch'] + 1}/{epochs}", loss_fn=loss_fn)
        if not done:
            state["epoch"] += 1
            state["batch"] = 0
        save_checkpoint()
    summary = {
        "tables": _describe(tables), "unit": plan.unit, "budgets": plan.totals, "allocation": allocation,
        "pruning": pruning, "seed": seed, "steps": state["step"], "plan": state.get("plan"),
        "groups": {g: {"tables": members, "budgets": [plan.in_unit(members, c) for c in costs]}
                   for g, (members, costs) in groups.items()},
        "unreached": {g: [plan.in_unit(groups[g][0], c) for c in r] for g, r in state["remaining"].items() if r},
        "snapshots": state["snapshots"], "levels": levels(state["snapshots"], len(plan.totals), names),
        "history_columns": ["step"] + [f"nnz:{fqn}" for fqn in names] + [f"gk:{g}" for g in groups],
    }
    checkpoint.save_text(out_dir / "search.json", json.dumps(summary, indent=1))
    summary["history"] = history
    return summary


def levels(snapshots, num_budgets, names):
    """Per level (0: step 0; k: the k-th budget) whose snapshots cover every table: the steps its
    groups passed it at, its files, and per table and in all the entries and store bytes."""
    out = []
    for level in range(num_budgets + 1):
        snaps = [s for s in snapshots if s["level"] == level]
        tables = {fqn: report for s in snaps for fqn, report in s["tables"].items()}
        if sorted(tables) != sorted(names):
            continue
        out.append({"level": level, "steps": {s["group"]: s["step"] for s in snaps},
                    "step": max(s["step"] for s in snaps), "files": [s["path"] for s in snaps],
                    "nnz": sum(r["nnz"] for r in tables.values()),
                    "store_bytes": sum(r["store_bytes"] for r in tables.values()), "tables": tables})
    return out


def level_masks(run_dir, level):
    """{fqn: mask} of a level of a search run: the non-zeros of its snapshots, which must hold each
    of the run's tables exactly once."""
    run_dir = Path(run_dir)
    paths = sorted(run_dir.glob(f"snapshot-level{int(level)}-*.safetensors"))
    if not paths:
        raise ValueError(f"{run_dir} has no snapshot of level {level}")
    masks = {}
    for path in paths:
        tensors, _ = checkpoint.load(path)
        for fqn, table in tensors.items():
            if fqn in masks:
                raise ValueError(f"{path}: table {fqn!r} is in another snapshot of level {level} too")
            masks[fqn] = table != 0
    return masks


def _swap_for_masked(model, tables, weights, masks, copy=True):
    """Each PEP table of `tables` replaced in `model` by its masked twin over weights[fqn], masks[fqn]."""
    for fqn, table in tables.items():
        shape = (table.num_embeddings, table.embedding_dim)
        for what, tensor in (("weight", weights[fqn]), ("mask", masks[fqn])):
            if tuple(tensor.shape) != shape:
                raise ValueError(f"{fqn}: expected a {shape[0]} x {shape[1]} {what}, got {tuple(tensor.shape)}")
        parent, _, name = fqn.rpartition(".")
        setattr(model.get_submodule(parent), name, masked_twin(table, weights[fqn], masks[fqn], copy=copy))


def retrain_model(model, run_dir, level, train, val, test=None, *, epochs=10, patience=2, lr=1e-3, weight_decay=1e-5,
                  clip_norm=100.0, seed=0, device="cpu", save_path=None, checkpoint_dir=None, checkpoint_every=1000,
                  loss_fn=None, log=print):
    """Lottery-ticket retrain of level `level` of the search run in `run_dir` (PEP_SPEC section 5),
    in place: `model` is the model the search ran on, or one made the same way (its PEP tables
    are named and shaped as the run's). Every parameter and buffer goes back to its step-0 value
    (`initial.safetensors`), each PEP table becomes its masked twin (initial weights times the
    level's mask, pruned entries held at zero), and the whole model trains with torch's Adam,
    keeping the epoch of best validation AUC (`fit_batches`). Returns the metrics (test ones when
    `test` batches are given), the entries and the store bytes; with `save_path` writes the model
    there (read it back with `load_retrained_model`); with `checkpoint_dir` checkpoints and resumes."""
    run_dir = Path(run_dir)
    if not (run_dir / "initial.safetensors").is_file():
        raise ValueError(f"{run_dir} is not a search run folder: it has no initial.safetensors")
    tables = _tables_of(model)
    initial, meta = checkpoint.load(run_dir / "initial.safetensors")
    if meta.get("tables") != json.loads(json.dumps(_describe(tables))):
        raise ValueError(f"{run_dir} searched other tables: {meta.get('tables')}, the model has {_describe(tables)}")
    try:
        model.load_state_dict(initial)
    except RuntimeError as e:
        raise ValueError(f"{run_dir / 'initial.safetensors'} does not fit the model: {str(e)[:500]}") from None
    masks = level_masks(run_dir, level)
    _swap_for_masked(model, tables, {fqn: t.weight.detach() for fqn, t in tables.items()}, masks)
    checkpoint_path = None
    if checkpoint_dir is not None:
        checkpoint_dir = Path(checkpoint_dir)
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        checkpoint_path = checkpoint_dir / "checkpoint.safetensors"
        checkpoint.remove_stale_temporaries(checkpoint_dir, [checkpoint_path.name])
    run = {"run": str(run_dir.resolve()), "level": int(level), "tables": _describe(tables)}
    best = fit_batches(model, train, val, epochs=epochs, patience=patience, lr=lr, weight_decay=weight_decay,
                       clip_norm=clip_norm, seed=seed, device=device, log=log, desc="retrain",
                       checkpoint_path=checkpoint_path, checkpoint_every=checkpoint_every, run=run, loss_fn=loss_fn)
    reports = {fqn: table_report(t.pruned_weight()) for fqn, t in trained_tables(model).items()}
    result = {"level": int(level), "nnz": sum(r["nnz"] for r in reports.values()),
              "store_bytes": sum(r["store_bytes"] for r in reports.values()), "tables": reports,
              "val_auc": best["auc"], "val_logloss": best["logloss"], "best_epoch": best["epoch"]}
    if test is not None:
        score = evaluate_batches(model, test, device=device)
        result.update(test_auc=score["auc"], test_logloss=score["logloss"])
    if save_path is not None:
        checkpoint.save(save_path, model.state_dict(), {"tables": _describe(tables), "retrain": result})
    return result


def load_retrained_model(model, path):
    """The retrained model written by `retrain_model(save_path=path)`, in place of `model` (made as
    the searched one was: its PEP tables become masked twins holding the file's tables); and the
    file's metadata."""
    state, meta = checkpoint.load(path)
    tables = _tables_of(model)
    if meta.get("tables") != json.loads(json.dumps(_describe(tables))):
        raise ValueError(f"{path} holds other tables: {meta.get('tables')}, the model has {_describe(tables)}")
    missing = [f"{fqn}.{name}" for fqn in tables for name in ("weight", "keep") if f"{fqn}.{name}" not in state]
    if missing:
        raise ValueError(f"{path} holds no retrained tables {missing}")
    _swap_for_masked(model, tables, {fqn: state[f"{fqn}.weight"] for fqn in tables},
                     {fqn: state[f"{fqn}.keep"] for fqn in tables}, copy=False)
    try:
        model.load_state_dict(state, assign=True)
    except RuntimeError as e:
        raise ValueError(f"{path} does not fit the model: {str(e)[:500]}") from None
    return model, meta


def export_stores(model, out_dir, values="fp32", encoding="auto"):
    """Writes the store of every trained table of `model` to `out_dir/<fqn>.store`; returns {fqn: path}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for fqn, table in trained_tables(model).items():
        paths[fqn] = out_dir / f"{fqn}.store"
        SparseRowStore.from_module(table, values=values, encoding=encoding).save(paths[fqn])
    if not paths:
        raise ValueError("the model holds no PEP or retrained table to export")
    return paths


def load_stores(folder, device="cpu"):
    """{fqn: store} of the `<fqn>.store` files `export_stores` wrote in `folder`."""
    paths = sorted(Path(folder).glob("*.store"))
    if not paths:
        raise ValueError(f"{folder} holds no .store file")
    return {path.name[:-len(".store")]: SparseRowStore.load(path, device=device) for path in paths}
