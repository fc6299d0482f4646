"""Lottery-ticket retrain of a search snapshot (PEP_SPEC section 5): the winning ticket (or a random
control) under the snapshot's mask, resumable from a checkpoint folder.
Design: docs/design/search_and_retrain.md.
"""

import contextlib
from pathlib import Path

import torch

from ..modules import MaskedEmbedding
from . import checkpoint
from .evaluate import evaluate
from .loop import fit
from .spec import RunSpec


def load_ticket(run_dir, snapshot, *, rewind=True, seed=0):
    """The retrain model of a snapshot, not yet trained, and the snapshot's metadata."""
    run_dir = Path(run_dir)
    if not (run_dir / "initial.safetensors").is_file():
        raise ValueError(f"{run_dir} is not a search run folder: it has no initial.safetensors")
    initial, meta = checkpoint.load(run_dir / "initial.safetensors")
    with naming(run_dir / "initial.safetensors"):
        spec = RunSpec.from_dict(meta.get("spec"))
    snapshot_path = run_dir / snapshot if not Path(snapshot).is_absolute() else Path(snapshot)
    tables, snap_meta = checkpoint.load(snapshot_path)
    shape = (spec.num_embeddings, spec.embedding_dim)
    for path, tensors, name in ((run_dir / "initial.safetensors", initial, "embedding.weight"),
                                (snapshot_path, tables, "weight")):
        if name not in tensors or tuple(tensors[name].shape) != shape:
            got = tuple(tensors[name].shape) if name in tensors else "none"
            raise ValueError(f"{path}: expected a {shape[0]} x {shape[1]} table {name!r} (the run spec's), got {got}")
    mask = tables["weight"] != 0
    with naming(run_dir / "initial.safetensors"):
        if rewind:
            state = initial
        else:
            torch.manual_seed(seed + 1)  # any draw other than the search's
            state = spec.build(spec.pep_embedding()).state_dict()
        model = masked_model(spec, state["embedding.weight"], mask, state)
    return model, dict(snap_meta, spec=spec.to_dict())


@contextlib.contextmanager
def naming(path):
    """A ValueError raised inside (a run file's contents that do not fit) names the file."""
    try:
        yield
    except ValueError as e:
        if str(path) in str(e):
            raise
        raise ValueError(f"{path}: {e}") from None


def masked_model(spec, weight, mask, state):
    """The spec's model over MaskedEmbedding(weight, mask), every other parameter from `state`."""
    model = spec.build(MaskedEmbedding(weight, mask, field_dims=spec.field_dims))
    others = {k: v for k, v in state.items() if not k.startswith("embedding.")}
    try:
        missing, unexpected = model.load_state_dict(others, strict=False)
    except RuntimeError as e:  # a saved parameter of another shape
        raise ValueError(f"saved parameters do not fit the {spec.model} model: {str(e)[:500]}") from None
    leftover = [k for k in missing if not k.startswith("embedding.")]
    if leftover or unexpected:
        raise ValueError(f"saved parameters do not match the {spec.model} model: missing {leftover}, "
                         f"unexpected {unexpected}")
    return model


def retrain(run_dir: str | Path, snapshot: str | Path, train: tuple, val: tuple, test: tuple, *, rewind: bool = True,
            epochs: int = 10, patience: int = 2, seed: int = 0, device="cpu", save_path: str | Path | None = None,
            checkpoint_dir: str | Path | None = None, checkpoint_every: int = 1000, log=print, **optim) -> dict:
    """Retrains a search snapshot as a lottery ticket (PEP_SPEC section 5): the snapshot's mask
    over the search's step-0 weights, every other parameter at its step-0 value, trained with
    early stopping on validation AUC; the test split is scored once, at the best epoch.

    Args:
        run_dir: the search's run folder.
        snapshot: a snapshot file in it (`snapshot-step*.safetensors`).
        train, val, test: (x, y) pairs.
        rewind: the winning ticket (step-0 weights); False re-initialises at random (the control).
        epochs, patience, seed, device: the training; `optim` as `fit`'s (lr, weight_decay,
            batch_size, clip_norm).
        save_path: write the retrained model there (read it back with `load_retrained`).
        checkpoint_dir: checkpoint there and resume from an existing checkpoint.
        log: where progress lines go.

    Returns:
        The snapshot's non-zeros and sparsity, the best epoch's validation metrics and the test
        AUC and log-loss.

    Raises:
        ValueError: a run folder or snapshot that is not one, or a checkpoint of another retrain.

    Example:
        >>> result = retrain("runs/fm", "snapshot-step0001064.safetensors", train, val, test, lr=1e-2)
        >>> result["test_auc"], result["nnz"]
    """
    model, meta = load_ticket(run_dir, snapshot, rewind=rewind, seed=seed)
    checkpoint_path = None
    if checkpoint_dir is not None:
        checkpoint_dir = Path(checkpoint_dir)
        if checkpoint_dir.exists() and not checkpoint_dir.is_dir():
            raise ValueError(f"checkpoint folder {checkpoint_dir} is a file, not a folder")
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        checkpoint_path = checkpoint_dir / "checkpoint.safetensors"
        checkpoint.remove_stale_temporaries(checkpoint_dir, [checkpoint_path.name])
    if save_path is not None and Path(save_path).parent.is_dir():
        checkpoint.remove_stale_temporaries(Path(save_path).parent, [Path(save_path).name])
    run = {"spec": meta["spec"], "snapshot": Path(snapshot).name, "snapshot_step": meta.get("step"),
           "snapshot_nnz": meta.get("nnz"), "rewind": rewind}
    best = fit(model, train, val, epochs=epochs, patience=patience, seed=seed, device=device, log=log,
               desc="retrain", checkpoint_path=checkpoint_path, checkpoint_every=checkpoint_every, run=run, **optim)
    test_score = evaluate(model, *test, device=device)
    result = {
        "snapshot": str(snapshot), "rewind": rewind, "nnz": model.embedding.nnz(),
        "sparsity": model.embedding.sparsity(), "val_auc": best["auc"], "val_logloss": best["logloss"],
        "best_epoch": best["epoch"], "test_auc": test_score["auc"], "test_logloss": test_score["logloss"],
    }
    if save_path is not None:
        checkpoint.save(save_path, model.state_dict(), {"spec": meta["spec"], "retrain": result})
    return result


def load_retrained(path):
    """A model written by `retrain(save_path=...)`, and its metadata."""
    state, meta = checkpoint.load(path)
    with naming(path):
        spec = RunSpec.from_dict(meta.get("spec"))
        if "embedding.weight" not in state or "embedding.keep" not in state:
            raise ValueError("it holds no retrained PEP table (embedding.weight and embedding.keep)")
        weight, keep = state["embedding.weight"], state["embedding.keep"]
        if not weight.is_floating_point() or keep.dtype != torch.bool:
            raise ValueError(f"the retrained table must be floating-point with a bool mask, got {weight.dtype} "
                             f"and {keep.dtype}")
        # copy=False, assign: the model takes the loaded tensors themselves, the table is never copied
        model = spec.build(MaskedEmbedding(weight, keep, field_dims=spec.field_dims, copy=False))
        try:
            model.load_state_dict(state, assign=True)
        except RuntimeError as e:  # missing, unexpected or misshapen parameters
            raise ValueError(f"the saved parameters do not fit the {spec.model} model: {str(e)[:500]}") from None
    return model, meta
