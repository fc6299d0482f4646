"""Training with the published recipe's pieces: BCE on logits, Adam with coupled L2, gradient
clipping to total norm 100 (PEP_SPEC section 3), over any iterable of `(inputs, labels)` batches
(`batches`), with early stopping on validation AUC and exact resume from checkpoints."""

import copy
import itertools
import json
from pathlib import Path

import torch
from tqdm import tqdm

from . import checkpoint
from .batches import TensorBatches, epoch_order, run_model, start_epoch, to_device
from .evaluate import evaluate, evaluate_batches

__all__ = ["epoch_order", "fit", "fit_batches", "make_optimizer", "train_steps"]


def make_optimizer(model, lr=1e-3, weight_decay=1e-5):
    return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)


def train_steps(model, optimizer, batches, device, clip_norm=100.0, after_step=None, desc="train", loss_fn=None):
    """Trains on `batches` ((inputs, labels) pairs); `after_step(loss)` runs after each step and
    may return True to stop early. `loss_fn(logits, labels)` defaults to BCE on logits."""
    loss_fn = loss_fn or torch.nn.BCEWithLogitsLoss()
    model.train()
    total = len(batches) if hasattr(batches, "__len__") else None
    for inputs, labels in tqdm(batches, desc=desc, total=total, leave=False, mininterval=1.0, disable=None):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(run_model(model, to_device(inputs, device)), labels.to(device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
        optimizer.step()
        if after_step is not None and after_step(loss.item()):
            return True
    return False


def epoch_batches(batches, epoch, skip):
    """The batches of `epoch` (`set_epoch` called), less the first `skip` (those a resumed epoch had trained on)."""
    start_epoch(batches, epoch)
    return itertools.islice(batches, skip, None) if skip else batches


def fit(model, train, val, *, epochs=10, patience=2, lr=1e-3, weight_decay=1e-5, batch_size=1024,
        clip_norm=100.0, seed=0, device="cpu", log=print, desc="train", checkpoint_path=None,
        checkpoint_every=1000, run=None):
    """Trains on `train` = (x, y) with early stopping on the AUC of `val` = (x, y) and leaves the
    model at its best epoch. Returns that epoch's validation metrics (and `epoch`, 1-based).

    With `checkpoint_path`, the whole state (model, optimizer, RNG, best weights and metrics,
    epoch and batch, early-stopping counter) is written there atomically every `checkpoint_every`
    steps and after every epoch, and an existing checkpoint is resumed: the run ends exactly as
    an uninterrupted one would. `run` (a JSON-serialisable dict: what defines the run) is kept in
    the checkpoint; a checkpoint of another run, or of other training settings, is refused."""
    return _fit(model, TensorBatches(*train, batch_size, seed), lambda: evaluate(model, *val, device=device),
                {"run": run, "batch_size": batch_size, "train_examples": len(train[1])}, epochs=epochs,
                patience=patience, lr=lr, weight_decay=weight_decay, clip_norm=clip_norm, seed=seed, device=device,
                log=log, desc=desc, checkpoint_path=checkpoint_path, checkpoint_every=checkpoint_every)


def fit_batches(model, train, val, *, epochs=10, patience=2, lr=1e-3, weight_decay=1e-5, clip_norm=100.0, seed=0,
                device="cpu", log=print, desc="train", checkpoint_path=None, checkpoint_every=1000, run=None,
                loss_fn=None):
    """`fit` over iterables of `(inputs, labels)` batches (`pep_kernels.train.batches`): a user's
    model and data loader. `loss_fn(logits, labels)` defaults to BCE on logits; validation is the
    global AUC over `val`. Resume is exact when `train` yields an epoch's batches in the same
    order each time (its `set_epoch` is called before each epoch)."""
    return _fit(model, train, lambda: evaluate_batches(model, val, device=device), {"run": run}, epochs=epochs,
                patience=patience, lr=lr, weight_decay=weight_decay, clip_norm=clip_norm, seed=seed, device=device,
                log=log, desc=desc, checkpoint_path=checkpoint_path, checkpoint_every=checkpoint_every,
                loss_fn=loss_fn)


def _fit(model, train, validate, run_identity, *, epochs, patience, lr, weight_decay, clip_norm, seed, device, log,
         desc, checkpoint_path, checkpoint_every, loss_fn=None):
    """The loop of `fit` and `fit_batches`: `train` batches, `validate()` the validation metrics,
    `run_identity` what of the run's definition the checkpoint must match besides the settings."""
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be a positive int, got {checkpoint_every!r}")
    device = torch.device(device)
    model.to(device)
    optimizer = make_optimizer(model, lr, weight_decay)
    identity = json.loads(json.dumps({  # as read back from a checkpoint (tuples become lists)
        **run_identity, "epochs": epochs, "patience": patience, "lr": lr, "weight_decay": weight_decay,
        "clip_norm": clip_norm, "seed": seed}))
    state = {"epoch": 0, "batch": 0, "step": 0, "best": None, "stale": 0, "done": False}
    best_state = None
    torch.manual_seed(seed)
    if checkpoint_path is not None and Path(checkpoint_path).exists():
        tensors, meta = checkpoint.load(checkpoint_path)
        if meta.get("identity") != identity:
            saved = meta.get("identity") if isinstance(meta.get("identity"), dict) else {}
            differ = sorted(k for k in set(identity) | set(saved) if saved.get(k) != identity.get(k))
            raise ValueError(f"{checkpoint_path} belongs to another run ({', '.join(differ)} differ); "
                             "use another checkpoint folder or remove it")
        model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        checkpoint.load_optimizer(optimizer, tensors)
        torch.set_rng_state(tensors["rng"])
        state = meta["state"]
        if state["best"] is not None:
            best_state = {k[len("best."):]: v.to(device) for k, v in tensors.items() if k.startswith("best.")}
        log(f"{desc}: resumed {checkpoint_path} at step {state['step']} (epoch {state['epoch'] + 1}, "
            f"batch {state['batch']})")

    def save_checkpoint():
        if checkpoint_path is None:
            return
        tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
        tensors.update(checkpoint.optimizer_tensors(optimizer))
        if best_state is not None:
            tensors.update({f"best.{k}": v for k, v in best_state.items()})
        tensors["rng"] = torch.get_rng_state()
        checkpoint.save(checkpoint_path, tensors, {"identity": identity, "state": state})

    def after_step(loss):
        state["step"] += 1
        state["batch"] += 1
        if state["step"] % checkpoint_every == 0:
            save_checkpoint()
        return False

    while not state["done"] and state["epoch"] < epochs:
        epoch = state["epoch"]
        train_steps(model, optimizer, epoch_batches(train, epoch, state["batch"]), device, clip_norm, after_step,
                    desc=f"{desc} epoch {epoch + 1}/{epochs}", loss_fn=loss_fn)
        score = validate()
        log(f"{desc} epoch {epoch + 1}: validation AUC {score['auc']:.4f}, log-loss {score['logloss']:.4f}")
        if state["best"] is None or score["auc"] > state["best"]["auc"]:
            state["best"], state["stale"] = dict(score, epoch=epoch + 1), 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            state["stale"] += 1
            state["done"] = state["stale"] >= patience
        state["epoch"], state["batch"] = epoch + 1, 0
        save_checkpoint()
    model.load_state_dict(best_state)
    return state["best"]
