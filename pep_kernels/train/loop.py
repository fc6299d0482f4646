"""One training epoch with the published recipe's pieces: BCE on logits, Adam with coupled L2,
gradient clipping to total norm 100 (PEP_SPEC section 3)."""

import copy

import torch
from tqdm import tqdm

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
        clip_norm=100.0, seed=0, device="cpu", log=print, desc="train"):
    """Trains with early stopping on validation AUC and leaves the model at its best epoch.
    Returns that epoch's validation metrics (and `epoch`, 1-based)."""
    device = torch.device(device)
    model.to(device)
    optimizer = make_optimizer(model, lr, weight_decay)
    (x, y), best, best_state, stale = train, None, None, 0
    torch.manual_seed(seed)
    for epoch in range(epochs):
        batches = epoch_order(len(y), seed, epoch).split(batch_size)
        train_steps(model, optimizer, x, y, batches, device, clip_norm, desc=f"{desc} epoch {epoch + 1}/{epochs}")
        score = evaluate(model, *val, device=device)
        log(f"{desc} epoch {epoch + 1}: validation AUC {score['auc']:.4f}, log-loss {score['logloss']:.4f}")
        if best is None or score["auc"] > best["auc"]:
            best, best_state, stale = dict(score, epoch=epoch + 1), copy.deepcopy(model.state_dict()), 0
        else:
            stale += 1
            if stale >= patience:
                break
    model.load_state_dict(best_state)
    return best
