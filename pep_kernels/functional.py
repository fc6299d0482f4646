"""The functional API: validates inputs and dispatches to a backend by device."""

import torch

from . import reference
from ._validation import check_gk, check_lookup
from .ops.soft_threshold import SoftThresholdEmbeddingFunction, _cpu_ops, _triton_ops

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


@torch.no_grad()
def soft_threshold_rows(weight, threshold_rows, gk=1.0):
    """S(W, s) row by row, (R, d): row i of `weight` (R, d) thresholded by row i of
    `threshold_rows` (R, 1 or d; any strides, so an expanded shared or per-field threshold costs
    no copy), computed by the lookup kernels themselves (C++ on CPU, Triton on GPU).

    So a pruned table is what its lookups return, bit for bit, and it does not depend on how the
    rows are split into blocks or on the CPU's vector width (torch's vectorised sigmoid rounds
    the tail of a tensor differently from its body, and AVX-512 from AVX2). Half-precision tables
    are computed in float32 and rounded once, as the lookups do.
    """
    gk = check_gk(gk)
    if weight.dim() != 2 or threshold_rows.dim() != 2 or threshold_rows.shape[0] != weight.shape[0] \
            or threshold_rows.shape[1] not in (1, weight.shape[1]):
        raise ValueError(f"threshold_rows must be (R, 1) or (R, d) for weight (R, d) = {tuple(weight.shape)}, got "
                         f"{tuple(threshold_rows.shape)}")
    mode = "feature_dim" if threshold_rows.shape[1] == weight.shape[1] else "feature"
    ids = torch.arange(weight.shape[0], device=weight.device)
    if weight.is_cuda:
        return _triton_ops()[0](ids, weight, threshold_rows, mode, gk)
    compute = torch.promote_types(weight.dtype, torch.float32)
    return _cpu_ops()[0](ids, weight.to(compute), threshold_rows.to(compute), mode, gk).to(weight.dtype)
