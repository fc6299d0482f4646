"""PEP search with parameter budgets: one run, many tables (PEP_SPEC section 4).

`search` trains with PEP and saves the pruned table whenever its non-zero count passes a budget,
steered by the budget controller or at the published recipe's own pace, and resumes from its run
folder. Design: docs/design/search_and_retrain.md.
"""

import json
import math
from pathlib import Path

import torch

from ..ops.indices import offset_field_ids
from ..optim import Adam
from . import checkpoint
from .controller import LOG_GK_RANGE, BudgetController, cubic_planned_steps
from .batches import TensorBatches
from .loop import epoch_batches, make_optimizer, train_steps
from .spec import RunSpec

TRAINING_MODES = Adam.MODES
RUN_FILES = ("initial.safetensors", "checkpoint.safetensors", "snapshot-step*.safetensors", "search.json")
PRUNING_MODES = ("budget", "faithful")


def budget_counts(budgets, table_size, embedding_dim=None):
    """Budgets as non-zero counts, largest first. A value in (0, 1) is a sparsity target
    (0.9: at most 10% of the table non-zero); a whole number >= 1 is a count; a string such as
    "24000B" is a size in bytes of the sparse-row store (`report.sparse_bytes`; needs
    `embedding_dim`), turned into the largest count that fits."""
    counts = set()
    for b in budgets:
        if isinstance(b, str) and b.endswith("B") and b[:-1].isdigit():
            counts.add(_count_for_bytes(int(b[:-1]), table_size, embedding_dim))
            continue
        try:
            b = float(b)
        except ValueError:
            raise ValueError(f"budget {b!r} is neither a sparsity in (0, 1), a non-zero count >= 1 nor bytes "
                             "like 24000B") from None
        if 0 < b < 1:
            counts.add(int(math.floor((1 - b) * table_size + 1e-9)))
        elif b >= 1 and float(b).is_integer():
            counts.add(int(b))
        else:
            raise ValueError(f"budget {b!r} is neither a sparsity in (0, 1) nor a non-zero count >= 1")
    return sorted(counts, reverse=True)


def _count_for_bytes(num_bytes, table_size, embedding_dim):
    from .report import sparse_bytes  # report pulls in matplotlib; only bytes budgets need it

    if embedding_dim is None:
        raise ValueError(f"a budget in bytes ({num_bytes}B) needs the embedding dim")
    num_rows = table_size // embedding_dim
    if sparse_bytes(num_rows, embedding_dim, 1) > num_bytes:
        raise ValueError(f"{num_bytes}B is smaller than a {num_rows} x {embedding_dim} store with one non-zero "
                         f"({sparse_bytes(num_rows, embedding_dim, 1)}B)")
    low, high = 1, table_size  # sparse_bytes grows with the count: the largest count that fits
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if sparse_bytes(num_rows, embedding_dim, mid) <= num_bytes else (low, mid - 1)
    return low


def _snapshot(out_dir, step, embedding, budget):
    table = embedding.pruned_weight()
    nnz = int(torch.count_nonzero(table))
    path = out_dir / f"snapshot-step{step:07d}.safetensors"
    meta = {"step": step, "nnz": nnz, "budget": budget, "sparsity": 1 - nnz / table.numel()}
    checkpoint.save(path, {"weight": table}, meta)
    return dict(meta, path=path.name)


def feature_occurrences(x, field_dims):
    """How often each row's feature occurs in `x` (per-field ids, one column per field)."""
    rows = offset_field_ids(torch.as_tensor(x), torch.tensor(field_dims)).reshape(-1)
    return torch.bincount(rows, minlength=sum(field_dims))


def _planned_vs_reached(counts, state):
    """Per budget: its planned step (budget pruning), the step it was reached at and the count there."""
    reached = {snap["budget"]: snap for snap in state["snapshots"][1:]}
    planned = state["plan"]["planned_steps"] if "plan" in state else [None] * len(counts)
    return [{"budget": count, "planned_step": plan, "reached_step": reached[count]["step"] if count in reached else None,
             "nnz": reached[count]["nnz"] if count in reached else None} for count, plan in zip(counts, planned)]


def search(spec: RunSpec, x: torch.Tensor, y: torch.Tensor, out_dir: str | Path, budgets: list, *, epochs: int = 10,
           lr: float = 1e-3, weight_decay: float = 1e-5, batch_size: int = 1024, clip_norm: float = 100.0,
           seed: int = 0, device="cpu", backend: str = "auto", training: str = "faithful", count_every: int = 1,
           checkpoint_every: int = 1000, pruning: str = "budget", steps: int | None = None,
           planned_steps: list[int] | None = None, min_occurrences: int = 0, log=print) -> dict:
    """Runs (or resumes) a budgeted PEP search (PEP_SPEC section 4): trains the spec's model with a
    PEP table and snapshots the pruned table when its non-zero count first reaches each budget.

    Args:
        spec: the model, its fields and the table's settings (`RunSpec`).
        x, y: the training split, per-field ids (n, F) and 0/1 labels (n,).
        out_dir: the run folder: `initial.safetensors` (step-0 state, the lottery ticket), one
            snapshot per budget, `checkpoint.safetensors`, `search.json`. An existing run resumes.
        budgets: sparsities in (0, 1), non-zero counts, or store bytes ("24000B").
        epochs, lr, weight_decay, batch_size, clip_norm, seed: the training (Adam, coupled L2).
        device, backend: where and on which kernels the table runs.
        training: the table's fused Adam, "faithful" (every row every step, the published
            recipe) or "fast" (looked-up rows, skipped steps caught up).
        count_every: count the non-zeros every N steps.
        checkpoint_every: checkpoint every N steps (and every epoch).
        pruning: "budget" (the controller steers gk so that each budget is passed at its planned
            step) or "faithful" (the published recipe: pruning at the thresholds' own pace).
        steps, planned_steps: the controller's plan: the step budget of a cubic plan (default:
            every step of `epochs`), or one planned step per budget.
        min_occurrences: zero, before the first step, the rows of features seen fewer than K
            times in `x` (they stay zero).
        log: where progress lines go.

    Returns:
        The summary written to `search.json` (snapshots, planned vs reached steps, budgets not
        reached), plus the count history.

    Raises:
        ValueError: bad settings, or an existing run folder of another run.

    Example:
        >>> spec = RunSpec("fm", field_dims, 16, threshold_init=-15.0)
        >>> summary = search(spec, x, y, "runs/fm", [0.8, 0.9, 0.95], epochs=30, lr=1e-2)
        >>> [s["path"] for s in summary["snapshots"]]
    """
    if not isinstance(spec, RunSpec):
        raise TypeError(f"spec must be a RunSpec, got {type(spec).__name__}")
    if training not in TRAINING_MODES:
        raise ValueError(f"unknown training mode {training!r}; expected one of {TRAINING_MODES}")
    if isinstance(count_every, bool) or not isinstance(count_every, int) or count_every < 1:
        raise ValueError(f"count_every must be a positive int, got {count_every!r}")
    if pruning not in PRUNING_MODES:
        raise ValueError(f"unknown pruning {pruning!r}; expected one of {PRUNING_MODES}")
    if isinstance(min_occurrences, bool) or not isinstance(min_occurrences, int) or min_occurrences < 0:
        raise ValueError(f"min_occurrences must be an int >= 0, got {min_occurrences!r}")
    if pruning == "faithful" and (steps is not None or planned_steps is not None):
        raise ValueError("steps and planned_steps plan the budget pruning; faithful pruning has no plan")
    out_dir, device = Path(out_dir), torch.device(device)
    if out_dir.is_dir():  # leftovers of writes killed before their rename (this run's files only)
        checkpoint.remove_stale_temporaries(out_dir, RUN_FILES)
    torch.manual_seed(seed)
    table_optimizer = Adam(lr=lr, weight_decay=weight_decay, mode=training)
    model = spec.build(spec.pep_embedding(backend, optimizer=table_optimizer)).to(device)
    embedding = model.embedding
    optimizer = make_optimizer(model, lr, weight_decay)
    remaining = budget_counts(budgets, spec.num_embeddings * spec.embedding_dim, spec.embedding_dim)
    if planned_steps is not None and len(planned_steps) != len(remaining):
        raise ValueError(f"need one planned step per budget: {len(remaining)} budgets {remaining}, "
                         f"planned steps {list(planned_steps)}")
    available = epochs * math.ceil(len(y) / batch_size)
    if steps is None:
        steps = available
    plan_end = max(planned_steps) if planned_steps is not None else steps
    if pruning == "budget" and plan_end > available:
        log(f"warning: the plan ends at step {plan_end}, past the {available} steps of {epochs} epochs")
    state = {"step": 0, "epoch": 0, "batch": 0, "remaining": list(remaining), "snapshots": [], "cut_rows": 0}
    history = []  # (step, nnz, mean threshold, gk) after every counted step
    saturation_warned = False

    ckpt_path = out_dir / "checkpoint.safetensors"
    if ckpt_path.exists():
        tensors, meta = checkpoint.load(ckpt_path)
        if (RunSpec.from_dict(meta["spec"]) != spec or meta["seed"] != seed or meta.get("training") != training
                or meta.get("min_occurrences", 0) != min_occurrences):
            raise ValueError(f"{ckpt_path} belongs to another run (spec, seed, training or min_occurrences differ); "
                             "use a new folder")
        model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        checkpoint.load_optimizer(optimizer, tensors)
        torch.set_rng_state(tensors["rng"])
        history = [h + [spec.gk] * (4 - len(h)) for h in tensors["history"].tolist()]  # older runs kept no gk
        state = meta["state"]
        if meta.get("pruning", "faithful") != pruning:
            raise ValueError(f"{ckpt_path} was searched with {meta.get('pruning', 'faithful')} pruning, not {pruning}")
        log(f"resumed {out_dir} at step {state['step']} (epoch {state['epoch'] + 1}, batch {state['batch']})")
    else:
        if min_occurrences:
            rare = feature_occurrences(x, spec.field_dims) < min_occurrences
            with torch.no_grad():
                embedding.weight[rare.to(device)] = 0
            state["cut_rows"] = int(rare.sum())
            log(f"cut {state['cut_rows']} of {spec.num_embeddings} rows: features seen fewer than {min_occurrences} "
                "times")
        checkpoint.save(out_dir / "initial.safetensors", model.state_dict(), {"spec": spec.to_dict(), "seed": seed})
        state["snapshots"].append(_snapshot(out_dir, 0, embedding, None))
        if pruning == "budget":
            initial_nnz = state["snapshots"][0]["nnz"]
            plan = list(planned_steps) if planned_steps is not None else cubic_planned_steps(remaining, initial_nnz, steps)
            state["plan"] = {"initial_nnz": initial_nnz, "planned_steps": plan}
    controller = None
    if pruning == "budget":
        controller = BudgetController(remaining, state["plan"]["planned_steps"], state["plan"]["initial_nnz"], spec.gk)
        if "controller" in state:
            controller.load_state_dict(state["controller"])
        embedding.gk = controller.gk

    def save_checkpoint():
        tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
        tensors.update(checkpoint.optimizer_tensors(optimizer))
        tensors["rng"] = torch.get_rng_state()
        tensors["history"] = torch.tensor(history, dtype=torch.float64).reshape(-1, 4)
        if controller is not None:
            state["controller"] = controller.state_dict()
        checkpoint.save(ckpt_path, tensors, {"spec": spec.to_dict(), "seed": seed, "training": training,
                                             "pruning": pruning, "min_occurrences": min_occurrences, "state": state})

    def after_step(loss):
        nonlocal saturation_warned
        state["step"] += 1
        state["batch"] += 1
        if state["step"] % count_every:
            return False
        nnz = embedding.nnz()
        history.append([state["step"], nnz, float(embedding.threshold.detach().float().mean()), embedding.gk])
        if state["remaining"] and nnz <= state["remaining"][0]:
            snap = _snapshot(out_dir, state["step"], embedding, state["remaining"].pop(0))
            state["snapshots"].append(snap)
            log(f"step {state['step']}: {nnz} non-zeros ({snap['sparsity']:.1%} sparse) <= budget {snap['budget']}")
        if controller is not None and state["remaining"]:
            embedding.gk = controller.update(state["step"], nnz)
            if controller.saturated and not saturation_warned:
                saturation_warned = True
                log(f"warning: at step {state['step']} gk reached the top of its range (e^{LOG_GK_RANGE[1]:.0f}): the "
                    "thresholds have fallen too far for the plan to be followed; lower the lr or plan fewer steps")
        if state["step"] % checkpoint_every == 0:
            save_checkpoint()
        return not state["remaining"]

    done = not state["remaining"]
    batches = TensorBatches(x, y, batch_size, seed)
    while not done and state["epoch"] < epochs:
        done = train_steps(model, optimizer, epoch_batches(batches, state["epoch"], state["batch"]), device,
                           clip_norm, after_step, desc=f"search epoch {state['epoch'] + 1}/{epochs}")
        if not done:
            state["epoch"] += 1
            state["batch"] = 0
        save_checkpoint()
    summary = {
        "spec": spec.to_dict(), "seed": seed, "training": training, "steps": state["step"], "budgets": remaining,
        "unreached": state["remaining"], "snapshots": state["snapshots"],
        "final_nnz": embedding.nnz(), "table_size": spec.num_embeddings * spec.embedding_dim, "pruning": pruning,
        "plan": state.get("plan"), "targets": _planned_vs_reached(remaining, state),
        "min_occurrences": min_occurrences, "cut_rows": state.get("cut_rows", 0),
    }
    checkpoint.save_text(out_dir / "search.json", json.dumps(summary, indent=1))
    summary["history"] = history
    return summary
