"""One training epoch with the published recipe's pieces: BCE on logits, Adam with coupled L2,
gradient clipping to total norm 100 (PEP_SPEC section 3)."""

import copy
import json
from pathlib import Path

import torch
from tqdm import tqdm

from . import checkpoint
from .evaluate import evaluate


def make_optimizer(model, lr=1e-3, weight_decay=1e-5):
    return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)


def epoch_order(num_examples, seed, epoch):
    """The example order of an epoch, a pure function of (seed, epoch) so that runs resume exactly."""
    return torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def train_steps(model, optimizer, x, y, batches, device, clip_norm=100.0, after_step=None, desc="train"):
    """Trains on the given index batches; `after_step(loss)` runs after each step and may return
    True to stop early."""
    loss_fn = torch.nn.BCEWithLogitsLoss()
    model.train()
    for idx in tqdm(batches, desc=desc, leave=False, mininterval=1.0, disable=None):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x[idx].to(device)), y[idx].to(device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
        optimizer.step()
        if after_step is not None and after_step(loss.item()):
            return True
    return False


def fit(model, train, val, *, epochs=10, patience=2, lr=1e-3, weight_decay=1e-5, batch_size=1024,
        clip_norm=100.0, seed=0, device="cpu", log=print, desc="train", checkpoint_path=None,
        checkpoint_every=1000, run=None):
    """Trains with early stopping on validation AUC and leaves the model at its best epoch.
    Returns that epoch's validation metrics (and `epoch`, 1-based).

    With `checkpoint_path`, the whole state (model, optimizer, RNG, best weights and metrics,
    epoch and batch, early-stopping counter) is written there atomically every `checkpoint_every`
    steps and after every epoch, and an existing checkpoint is resumed: the run ends exactly as
    an uninterrupted one would. `run` (a JSON-serialisable dict: what defines the run) is kept in
    the checkpoint; a checkpoint of another run, or of other training settings, is refused."""
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be a positive int, got {checkpoint_every!r}")
    device = torch.device(device)
    model.to(device)
    optimizer = make_optimizer(model, lr, weight_decay)
    x, y = train
    identity = json.loads(json.dumps({  # as read back from a checkpoint (tuples become lists)
        "run": run, "epochs": epochs, "patience": patience, "lr": lr, "weight_decay": weight_decay,
        "batch_size": batch_size, "clip_norm": clip_norm, "seed": seed, "train_examples": len(y)}))
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
        batches = list(epoch_order(len(y), seed, epoch).split(batch_size))[state["batch"]:]
        train_steps(model, optimizer, x, y, batches, device, clip_norm, after_step,
                    desc=f"{desc} epoch {epoch + 1}/{epochs}")
        score = evaluate(model, *val, device=device)
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
