"""Metrics. The default is one global AUC and log-loss over a split (PEP_SPEC section 6); the
reference's mean of per-batch metrics is kept for parity with published numbers."""

import numpy as np
import torch
from sklearn.metrics import log_loss, roc_auc_score

from .batches import run_model, to_device


@torch.no_grad()
def predict(model, x, batch_size=8192, device="cpu"):
    """Click probabilities for every row of x, in eval mode; the model's mode is restored."""
    was_training = model.training
    model.eval()
    scores = [torch.sigmoid(model(xb.to(device))).float().cpu() for xb in x.split(batch_size)]
    model.train(was_training)
    return torch.cat(scores).numpy() if scores else np.empty(0, dtype=np.float32)


def _metrics(y, p):
    if len(np.unique(y)) < 2:
        raise ValueError(f"AUC needs both labels among the {len(y)} examples, got only {np.unique(y).tolist()}")
    return {"auc": float(roc_auc_score(y, p)), "logloss": float(log_loss(y, p, labels=[0, 1]))}


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 8192, device="cpu") -> dict:
    """One global AUC and log-loss over the whole split (PEP_SPEC section 6's default).

    Args:
        model: a CTR model returning logits (B,); run in eval mode, its mode restored after.
        x, y: the split's inputs and 0/1 labels.
        batch_size, device: how the scores are computed.

    Returns:
        {"auc": ..., "logloss": ...}.

    Raises:
        ValueError: labels of one class only (AUC is undefined).

    Example:
        >>> evaluate(model, x_test, y_test)["auc"]
    """
    return _metrics(y.numpy(), predict(model, x, batch_size, device))


@torch.no_grad()
def evaluate_batches(model, batches, device="cpu"):
    """Global AUC and log-loss over every batch of `batches`, an iterable of `(inputs, labels)`
    (`pep_kernels.train.batches`), in eval mode; the model's mode is restored."""
    was_training = model.training
    model.eval()
    scores, labels = [], []
    for inputs, y in batches:
        scores.append(torch.sigmoid(run_model(model, to_device(inputs, device))).float().cpu().reshape(-1))
        labels.append(y.float().cpu().reshape(-1))
    model.train(was_training)
    if not labels:
        raise ValueError("no batches to evaluate")
    return _metrics(torch.cat(labels).numpy(), torch.cat(scores).numpy())


def evaluate_per_batch(model, x, y, batch_size=1024, device="cpu"):
    """The reference code's protocol: the mean of per-batch AUCs and log-losses (batches that
    hold one label only are skipped, as roc_auc_score cannot score them)."""
    p, y = predict(model, x, batch_size, device), y.numpy()
    scores = [_metrics(y[i: i + batch_size], p[i: i + batch_size]) for i in range(0, len(y), batch_size)
              if len(np.unique(y[i: i + batch_size])) == 2]
    return {k: float(np.mean([s[k] for s in scores])) for k in ("auc", "logloss")}
