"""The functional API: validates inputs and dispatches to a backend by device."""

from . import reference
from ._validation import bag_inputs, check_bag_mode, check_lookup, check_pooling, padding_row
from .ops.bag import SoftThresholdBagFunction
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


def soft_threshold_embedding_bag(
    input, weight, threshold, offsets=None, *, mode="feature_dim", gk=1.0, pooling="mean", per_sample_weights=None,
    include_last_offset=False, padding_idx=None, sparse=False, backend="auto"
):
    """`F.embedding_bag` of the soft-thresholded table (PEP): (B, d), each bag's soft-thresholded
    rows pooled in the same pass, with no (lookups, d) intermediate.

    Input forms as `F.embedding_bag`'s: 2-D `input` (B, L) is B bags of L ids; 1-D `input` with
    `offsets`, the start of each bag (B,), or with `include_last_offset` B + 1 offsets ending at
    len(input). `pooling` "sum" or "mean" (F.embedding_bag's `mode`; here `mode` is the threshold
    mode, as in `soft_threshold_embedding`: global, dimension, feature or feature_dim);
    `per_sample_weights` (the shape of `input`, sum only) scale the rows; lookups of `padding_idx`
    add nothing, count in no mean and get no gradient. An empty bag is zeros. `sparse=True` gives
    row-sparse gradients of `weight` and of per-row thresholds, holding the rows the lookups reach.
    Backends: "auto" (the C++ kernels on CPU, the GPU kernels on CUDA), "cpu", "reference" (the
    eager oracle, dense gradients only). Gradients are deterministic on CPU.
    """
    check_bag_mode(mode)
    gk = check_lookup(input, weight, threshold, mode, gk)
    check_pooling(pooling)
    padding_idx = padding_row(padding_idx, weight.shape[0])
    backend = resolve_backend(backend, weight.device)
    if backend == "reference":
        if sparse:
            raise ValueError("backend 'reference' gives dense gradients: sparse=True needs a kernel backend")
        return reference.soft_threshold_embedding_bag(input, weight, threshold, offsets, mode, gk, pooling,
                                                      per_sample_weights, include_last_offset, padding_idx)
    if backend == "triton" and weight.device.type != "cuda":
        raise ValueError("backend 'triton' needs CUDA tensors for bags: the GPU bag kernels do not run on the CPU")
    ids, bag_offsets, per_sample_weights = bag_inputs(input, offsets, per_sample_weights, include_last_offset, pooling)
    return SoftThresholdBagFunction.apply(ids, bag_offsets, per_sample_weights, weight, threshold, mode, gk, pooling,
                                          -1 if padding_idx is None else padding_idx, sparse)
