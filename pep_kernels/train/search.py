"""PEP search with parameter budgets: one run, many tables (PEP_SPEC section 4).

Train with PEP; after every step count the non-zeros of the pruned table; whenever the count
drops to or below the largest remaining budget, save the pruned table under its actual count and
retire that budget (at most one per step). The step-0 table and the full initial state of every
parameter are saved first; search stops when every budget is used or the epochs run out.

The table trains with the fused row optimizer of `pep_kernels.optim`: Adam with coupled L2,
`training="faithful"` (every row every step, the published recipe) or `"fast"` (looked-up rows
only, skipped steps replayed exactly: the same numbers). The rest of the model (and shared
thresholds) use torch's Adam with the same settings. Non-zeros are counted by a C++ pass over
W and s (no table copy) every `count_every` steps; in `fast` mode a count first brings every row
up to date, so counting less often lets the replay batch up.

A run folder holds `initial.safetensors` (every parameter at step 0, and the run spec),
`snapshot-step<step>.safetensors` (pruned tables), `checkpoint.safetensors` (model, optimizer,
RNG and progress, rewritten atomically every `checkpoint_every` steps and at epoch ends) and
`search.json` (the summary). Calling `search` again on the same folder resumes from the
checkpoint.
"""

import json
import math
from pathlib import Path

import torch

from ..optim import Adam
from . import checkpoint
from .loop import epoch_order, make_optimizer, train_steps
from .spec import RunSpec

TRAINING_MODES = Adam.MODES
RUN_FILES = ("initial.safetensors", "checkpoint.safetensors", "snapshot-step*.safetensors", "search.json")


def budget_counts(budgets, table_size):
    """Budgets as non-zero counts, largest first. A value in (0, 1) is a sparsity target
    (0.9: at most 10% of the table non-zero); a whole number >= 1 is a count."""
    counts = set()
    for b in budgets:
        if 0 < b < 1:
            counts.add(int(math.floor((1 - b) * table_size + 1e-9)))
        elif b >= 1 and float(b).is_integer():
            counts.add(int(b))
        else:
            raise ValueError(f"budget {b!r} is neither a sparsity in (0, 1) nor a non-zero count >= 1")
    return sorted(counts, reverse=True)


def _snapshot(out_dir, step, embedding, budget):
    table = embedding.pruned_weight()
    nnz = int(torch.count_nonzero(table))
    path = out_dir / f"snapshot-step{step:07d}.safetensors"
    meta = {"step": step, "nnz": nnz, "budget": budget, "sparsity": 1 - nnz / table.numel()}
    checkpoint.save(path, {"weight": table}, meta)
    return dict(meta, path=path.name)


def search(spec, x, y, out_dir, budgets, *, epochs=10, lr=1e-3, weight_decay=1e-5, batch_size=1024,
           clip_norm=100.0, seed=0, device="cpu", backend="auto", training="faithful", count_every=1,
           checkpoint_every=1000, log=print):
    """Runs (or resumes) a budgeted PEP search on (x, y); returns the summary also written to search.json."""
    if not isinstance(spec, RunSpec):
        raise TypeError(f"spec must be a RunSpec, got {type(spec).__name__}")
    if training not in TRAINING_MODES:
        raise ValueError(f"unknown training mode {training!r}; expected one of {TRAINING_MODES}")
    if isinstance(count_every, bool) or not isinstance(count_every, int) or count_every < 1:
        raise ValueError(f"count_every must be a positive int, got {count_every!r}")
    out_dir, device = Path(out_dir), torch.device(device)
    if out_dir.is_dir():  # leftovers of writes killed before their rename (this run's files only)
        checkpoint.remove_stale_temporaries(out_dir, RUN_FILES)
    torch.manual_seed(seed)
    table_optimizer = Adam(lr=lr, weight_decay=weight_decay, mode=training)
    model = spec.build(spec.pep_embedding(backend, optimizer=table_optimizer)).to(device)
    embedding = model.embedding
    optimizer = make_optimizer(model, lr, weight_decay)
    remaining = budget_counts(budgets, spec.num_embeddings * spec.embedding_dim)
    state = {"step": 0, "epoch": 0, "batch": 0, "remaining": list(remaining), "snapshots": []}
    history = []  # (step, nnz, mean threshold) after every counted step

    ckpt_path = out_dir / "checkpoint.safetensors"
    if ckpt_path.exists():
        tensors, meta = checkpoint.load(ckpt_path)
        if meta["spec"] != spec.to_dict() or meta["seed"] != seed or meta.get("training") != training:
            raise ValueError(f"{ckpt_path} belongs to another run (spec, seed or training differ); use a new folder")
        model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        checkpoint.load_optimizer(optimizer, tensors)
        torch.set_rng_state(tensors["rng"])
        history = tensors["history"].tolist()
        state = meta["state"]
        log(f"resumed {out_dir} at step {state['step']} (epoch {state['epoch'] + 1}, batch {state['batch']})")
    else:
        checkpoint.save(out_dir / "initial.safetensors", model.state_dict(), {"spec": spec.to_dict(), "seed": seed})
        state["snapshots"].append(_snapshot(out_dir, 0, embedding, None))

    def save_checkpoint():
        tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
        tensors.update(checkpoint.optimizer_tensors(optimizer))
        tensors["rng"] = torch.get_rng_state()
        tensors["history"] = torch.tensor(history, dtype=torch.float64).reshape(-1, 3)
        checkpoint.save(ckpt_path, tensors, {"spec": spec.to_dict(), "seed": seed, "training": training, "state": state})

    def after_step(loss):
        state["step"] += 1
        state["batch"] += 1
        if state["step"] % count_every:
            return False
        nnz = embedding.nnz()
        history.append([state["step"], nnz, float(embedding.threshold.detach().float().mean())])
        if state["remaining"] and nnz <= state["remaining"][0]:
            snap = _snapshot(out_dir, state["step"], embedding, state["remaining"].pop(0))
            state["snapshots"].append(snap)
            log(f"step {state['step']}: {nnz} non-zeros ({snap['sparsity']:.1%} sparse) <= budget {snap['budget']}")
        if state["step"] % checkpoint_every == 0:
            save_checkpoint()
        return not state["remaining"]

    done = not state["remaining"]
    while not done and state["epoch"] < epochs:
        batches = list(epoch_order(len(y), seed, state["epoch"]).split(batch_size))[state["batch"]:]
        done = train_steps(model, optimizer, x, y, batches, device, clip_norm, after_step,
                           desc=f"search epoch {state['epoch'] + 1}/{epochs}")
        if not done:
            state["epoch"] += 1
            state["batch"] = 0
        save_checkpoint()
    summary = {
        "spec": spec.to_dict(), "seed": seed, "training": training, "steps": state["step"], "budgets": remaining,
        "unreached": state["remaining"], "snapshots": state["snapshots"],
        "final_nnz": embedding.nnz(), "table_size": spec.num_embeddings * spec.embedding_dim,
    }
    checkpoint.save_text(out_dir / "search.json", json.dumps(summary, indent=1))
    summary["history"] = history
    return summary
