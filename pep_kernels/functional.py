"""The functional API: validates inputs and dispatches to a backend by device."""

from . import reference
from ._validation import check_lookup
from .ops.soft_threshold import SoftThresholdEmbeddingFunction

BACKENDS = ("auto", "triton", "cpu", "reference")


def resolve_backend(backend, device):
    """'auto' -> Triton for CUDA tensors, the C++ kernels for CPU tensors."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "cpu"
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend 'cpu' needs CPU tensors, got tensors on {device}")
    return backend


def soft_threshold_embedding(
    indices, weight, threshold, *, mode="feature_dim", gk=1.0, sparse=False, deterministic=False, backend="auto"
):
    """Soft-thresholded embedding lookup (PEP): `indices.shape + (d,)`.

        out = sign(W[indices]) * relu(|W[indices]| - gk * sigmoid(s[...]))

    `threshold` has the shape of its `mode` (see `threshold_shape`); for the field modes the last
    axis of `indices` is the field axis and its size must equal `threshold.shape[0]`.
    `sparse=True` gives coalesced row-sparse gradients for `weight` and for per-row thresholds
    (`feature`, `feature_dim`), like `nn.Embedding(sparse=True)`. `deterministic=True`
    accumulates duplicate ids in sorted order, so gradients are bitwise repeatable; the default
    Triton path adds them with atomics (faster, summation order not fixed). The CPU kernel is
    deterministic either way; the reference follows torch's own settings.
    """
    gk = check_lookup(indices, weight, threshold, mode, gk)
    backend = resolve_backend(backend, weight.device)
    if backend == "reference":
        return reference.soft_threshold_embedding(indices, weight, threshold, mode, gk, sparse)
    return SoftThresholdEmbeddingFunction.apply(indices, weight, threshold, mode, gk, sparse, deterministic, backend)
