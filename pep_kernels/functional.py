"""The functional API: validates inputs, checks ids, and calls the lookup ops (the dispatcher runs
the C++ kernel for CPU tensors and the Triton kernel for CUDA tensors)."""

import torch

from . import reference
from ._validation import (bag_inputs, check_bag_mode, check_bag_offsets, check_gk, check_ids_in_range, check_lookup,
                          check_pooling, padding_row)
from .ops.bag import SoftThresholdBagFunction
from .ops.indices import BOUNDS_CHECKS, DeferredIdErrors, check_field_ids, offset_field_ids
from .ops.soft_threshold import SoftThresholdEmbeddingFunction, kernels

BACKENDS = ("auto", "triton", "cpu", "reference")

# The deferred id checks of functional calls that bring none of their own, one per device.
_FUNCTIONAL_ID_ERRORS = {}


def resolve_backend(backend, device):
    """The backend, checked: "auto" (the dispatcher picks C++ for CPU tensors, Triton for CUDA
    tensors), "triton" (the Triton kernels, also on CPU tensors under TRITON_INTERPRET=1, for
    testing), "cpu" (the C++ kernels, CPU tensors only) or "reference" (eager PyTorch)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend 'cpu' needs CPU tensors, got tensors on {device}")
    return backend


def resolve_bounds_check(bounds_check, device):
    """"strict" or "deferred"; None picks "strict" on CPU (where checking costs no sync) and
    "deferred" on GPU."""
    if bounds_check is None:
        return "strict" if device.type == "cpu" else "deferred"
    if bounds_check not in BOUNDS_CHECKS:
        raise ValueError(f"unknown bounds_check {bounds_check!r}; expected one of {BOUNDS_CHECKS}")
    return bounds_check


def prepare_id_check(indices, num_rows, field_offsets, backend, bounds_check, id_errors, bag_offsets=None):
    """Checks the ids (and a bag lookup's offsets) now ("strict": raises before any kernel runs;
    on a GPU one host sync), or returns the `DeferredIdErrors` the kernels record into
    ("deferred": polled first, so that an error of an earlier call is raised now if its record
    has reached the host). The C++ kernels check ids themselves and raise at once: nothing to do
    or to defer for them."""
    device = indices.device
    bounds_check = resolve_bounds_check(bounds_check, device)
    if device.type == "cpu" and backend != "triton":
        return None
    if bounds_check == "strict":
        if field_offsets is not None:
            check_field_ids(indices, field_offsets.diff())
        else:
            check_ids_in_range(indices, num_rows)
        if bag_offsets is not None:
            check_bag_offsets(bag_offsets, indices.numel())
        return None
    id_errors = id_errors or functional_id_errors(device)
    id_errors.poll()
    return id_errors


def functional_id_errors(device):
    """The `DeferredIdErrors` of functional calls on `device` that bring none of their own."""
    if device not in _FUNCTIONAL_ID_ERRORS:
        _FUNCTIONAL_ID_ERRORS[device] = DeferredIdErrors(device)
    return _FUNCTIONAL_ID_ERRORS[device]


def soft_threshold_embedding(
    indices: torch.Tensor, weight: torch.Tensor, threshold: torch.Tensor, *, mode: str = "feature_dim",
    gk: float = 1.0, sparse: bool = False, backend: str = "auto", field_offsets: torch.Tensor | None = None,
    bounds_check: str | None = None, id_errors: DeferredIdErrors | None = None,
) -> torch.Tensor:
    """Soft-thresholded embedding lookup (PEP, PEP_SPEC sections 1-2):

        out = sign(W[indices]) * relu(|W[indices]| - gk * sigmoid(s[...]))

    Args:
        indices: int32 or int64 ids of any shape. For the field modes (and with `field_offsets`)
            the last axis is the field axis.
        weight: the table W, (N, d): float32 or float64 (float16/bfloat16 on GPU).
        threshold: the learnable s, of its mode's shape (`threshold_shape`).
        mode: global, dimension, feature, feature_dim, field or field_dim (PEP_SPEC's table).
        gk: the threshold's scale, a finite float >= 0 (0: no pruning).
        sparse: row-sparse gradients of `weight` and of per-row thresholds, as
            `nn.Embedding(sparse=True)`: coalesced on CPU; on GPU one entry per lookup
            (uncoalesced: coalescing needs the number of distinct rows on the host).
        backend: "auto" (the dispatcher: C++ for CPU tensors, Triton for CUDA tensors),
            "triton" (the Triton kernels, also on CPU tensors under TRITON_INTERPRET=1), "cpu" or
            "reference" (eager PyTorch).
        field_offsets: (F + 1,) int64, 0 then the cumulative field sizes: `indices` are then
            per-field local ids (..., F), offset and checked per field by the kernels.
        bounds_check: "strict" raises before any kernel runs (on GPU a host sync); "deferred"
            lets the GPU kernels mask and record a bad id in `id_errors`, and the IndexError comes
            from a later call once the record has reached the host, or from `id_errors.wait()`.
            None: strict on CPU, deferred on GPU. The C++ kernels raise at once either way.
        id_errors: where deferred checks record (default: one per device for functional calls).

    Returns:
        `indices.shape + (d,)`, the weight's dtype. The backward is deterministic on every backend.

    Raises:
        IndexError: an id out of range (naming it, its field and the valid range).
        ValueError: a threshold shape that does not fit the mode, mixed devices, bad `gk`, an
            unknown mode or backend.
        TypeError: ids, weights or thresholds of the wrong dtype.

    Example:
        >>> weight = torch.randn(100, 16, requires_grad=True)
        >>> threshold = torch.full((100, 16), -4.0, requires_grad=True)
        >>> out = soft_threshold_embedding(torch.tensor([[3, 7], [7, 99]]), weight, threshold)
        >>> out.shape
        torch.Size([2, 2, 16])
    """
    gk = check_lookup(indices, weight, threshold, mode, gk, field_offsets)
    backend = resolve_backend(backend, weight.device)
    if backend == "reference":
        if field_offsets is not None:
            indices = offset_field_ids(indices, field_offsets.diff())
        return reference.soft_threshold_embedding(indices, weight, threshold, mode, gk, sparse)
    errors = prepare_id_check(indices, weight.shape[0], field_offsets, backend, bounds_check, id_errors)
    out = SoftThresholdEmbeddingFunction.apply(indices, weight, threshold, mode, gk, sparse, field_offsets,
                                               None if errors is None else errors.record, backend)
    if errors is not None:
        errors.after_launch()
    return out


@torch.no_grad()
def soft_threshold_rows(weight, threshold_rows, gk=1.0):
    """S(W, s) row by row, (R, d): row i of `weight` (R, d) thresholded by row i of
    `threshold_rows` (R, 1 or d; any strides, so an expanded shared or per-field threshold costs
    no copy), computed by the lookup kernels themselves (C++ on CPU, Triton on GPU).

    So a pruned table is what its lookups return, bit for bit, and it does not depend on how the
    rows are split into blocks or on the CPU's vector width (torch's vectorised sigmoid rounds
    the tail of a tensor differently from its body, and AVX-512 from AVX2). Half-precision tables
    are computed in float32 on CPU and rounded once, as the lookups do.
    """
    gk = check_gk(gk)
    if weight.dim() != 2 or threshold_rows.dim() != 2 or threshold_rows.shape[0] != weight.shape[0] \
            or threshold_rows.shape[1] not in (1, weight.shape[1]):
        raise ValueError(f"threshold_rows must be (R, 1) or (R, d) for weight (R, d) = {tuple(weight.shape)}, got "
                         f"{tuple(threshold_rows.shape)}")
    mode = "feature_dim" if threshold_rows.shape[1] == weight.shape[1] else "feature"
    ids = torch.arange(weight.shape[0], device=weight.device)
    if not weight.is_cuda:  # the C++ kernels take float32 and float64
        compute = torch.promote_types(weight.dtype, torch.float32)
        weight, threshold_rows, dtype = weight.to(compute), threshold_rows.to(compute), weight.dtype
    else:
        dtype = weight.dtype
    out, _ = kernels("auto").soft_threshold_forward(ids, weight, threshold_rows, mode, gk, None, None)
    return out.to(dtype)


def soft_threshold_embedding_bag(
    input, weight, threshold, offsets=None, *, mode="feature_dim", gk=1.0, pooling="mean", per_sample_weights=None,
    include_last_offset=False, padding_idx=None, sparse=False, backend="auto", bounds_check=None, id_errors=None,
):
    """`F.embedding_bag` of the soft-thresholded table (PEP): (B, d), each bag's soft-thresholded
    rows pooled in the same pass, with no (lookups, d) intermediate.

    Input forms as `F.embedding_bag`'s: 2-D `input` (B, L) is B bags of L ids; 1-D `input` with
    `offsets`, the start of each bag (B,), or with `include_last_offset` B + 1 offsets ending at
    len(input). `pooling` "sum" or "mean" (F.embedding_bag's `mode`; here `mode` is the threshold
    mode, as in `soft_threshold_embedding`: global, dimension, feature or feature_dim);
    `per_sample_weights` (the shape of `input`, sum only) scale the rows; lookups of `padding_idx`
    add nothing, count in no mean and get no gradient. An empty bag is zeros. `sparse=True` gives
    row-sparse gradients of `weight` and of per-row thresholds, holding the rows the lookups reach
    (as `soft_threshold_embedding`'s: coalesced on CPU, one entry per lookup on GPU). Backends and
    `bounds_check` as `soft_threshold_embedding`'s (a deferred check also covers the offsets).
    Gradients are deterministic on every backend.
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
    ids, bag_offsets, per_sample_weights = bag_inputs(input, offsets, per_sample_weights, include_last_offset, pooling)
    errors = prepare_id_check(ids, weight.shape[0], None, backend, bounds_check, id_errors, bag_offsets)
    # Always a record, also where nothing reads it (the checks ran already, or the C++ kernel raises
    # itself): torch 2.13's inductor fails on a one-output op whose optional mutable argument is None.
    record = (errors or id_errors or functional_id_errors(weight.device)).record
    out = SoftThresholdBagFunction.apply(ids, bag_offsets, per_sample_weights, weight, threshold, mode, gk, pooling,
                                         -1 if padding_idx is None else padding_idx, sparse, record, backend)
    if errors is not None:
        errors.after_launch()
    return out
