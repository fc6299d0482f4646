"""Threshold modes and the input checks shared by every backend.

A mode says which threshold element an entry (row i, dim j) of a lookup in field f uses
(PEP_SPEC section 1). Kernels see it as two facts: where the threshold row comes from
(`SHARED`: the single row 0, `PER_ROW`: the looked-up row, `PER_FIELD`: the lookup's field)
and whether the threshold has one column per dimension.
"""

import math

import torch

SHARED, PER_ROW, PER_FIELD = 0, 1, 2

# mode -> (row source, one threshold per dimension)
MODES = {
    "global": (SHARED, False),
    "dimension": (SHARED, True),
    "feature": (PER_ROW, False),
    "feature_dim": (PER_ROW, True),
    "field": (PER_FIELD, False),
    "field_dim": (PER_FIELD, True),
}

INDEX_DTYPES = (torch.int32, torch.int64)
WEIGHT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def mode_layout(mode):
    """(row source, per-dimension) of a mode name; ValueError for an unknown name."""
    try:
        return MODES[mode]
    except (KeyError, TypeError):
        raise ValueError(f"unknown threshold mode {mode!r}; expected one of {sorted(MODES)}") from None


def threshold_shape(mode, num_embeddings, embedding_dim, num_fields=None):
    """Shape of the learnable threshold `s` for a mode (PEP_SPEC section 1 table)."""
    row_source, per_dim = mode_layout(mode)
    if row_source == PER_FIELD and num_fields is None:
        raise ValueError(f"threshold mode {mode!r} needs the number of fields")
    cols = embedding_dim if per_dim else 1
    if row_source == SHARED:
        return (cols,)
    return (num_embeddings if row_source == PER_ROW else num_fields, cols)


def initial_thresholds(mode, shape, threshold_init, threshold_slope=0.0, device=None, dtype=None):
    """The thresholds' start: `threshold_init`, plus `threshold_slope * j` on dimension j where the
    mode has a threshold per dimension. A positive slope orders the dimensions (lower ones are
    pruned last in every row), so the kept dimensions line up across rows."""
    start = torch.full(shape, float(threshold_init), device=device, dtype=dtype)
    if threshold_slope:
        if not mode_layout(mode)[1]:
            raise ValueError(f"threshold_slope {threshold_slope} needs a threshold per dimension (modes "
                             f"{sorted(m for m, (_, per_dim) in MODES.items() if per_dim)}), not mode {mode!r}")
        start += float(threshold_slope) * torch.arange(shape[-1], device=device, dtype=start.dtype)
    return start


def check_field_dims(field_dims, num_rows):
    """`field_dims` as a list of ints, if they are positive and sum to the table's rows."""
    field_dims = [int(f) for f in field_dims]
    if not field_dims or min(field_dims) < 1:
        raise ValueError(f"field_dims must be a non-empty list of positive sizes, got {field_dims}")
    if sum(field_dims) != num_rows:
        raise ValueError(f"sum(field_dims) = {sum(field_dims)} must equal num_embeddings = {num_rows}")
    return field_dims


def check_gk(gk):
    if isinstance(gk, bool) or not isinstance(gk, (int, float)):
        raise TypeError(f"gk must be a Python float, got {type(gk).__name__}")
    if not math.isfinite(gk) or gk < 0:
        raise ValueError(f"gk must be a finite number >= 0, got {gk}")
    return float(gk)


def check_lookup(indices, weight, threshold, mode, gk, field_offsets=None):
    """Validates everything about a lookup except the id values (and the values of
    `field_offsets`, which would take a host read on GPU); returns gk as a float."""
    row_source, _ = mode_layout(mode)
    for name, t in (("indices", indices), ("weight", weight), ("threshold", threshold)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if indices.dtype not in INDEX_DTYPES:
        raise TypeError(f"indices must be int32 or int64, got {indices.dtype}")
    if weight.dtype not in WEIGHT_DTYPES:
        raise TypeError(f"weight must be float32, float64, float16 or bfloat16, got {weight.dtype}")
    half = weight.dtype in (torch.float16, torch.bfloat16)
    if threshold.dtype != weight.dtype and not (half and threshold.dtype == torch.float32):
        raise TypeError(
            f"threshold dtype must match weight dtype {weight.dtype}"
            f"{' (or be float32)' if half else ''}, got {threshold.dtype}"
        )
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (num_embeddings, embedding_dim), got shape {tuple(weight.shape)}")
    devices = {t.device for t in (indices, weight, threshold)}
    if len(devices) > 1:
        raise ValueError(
            f"indices, weight and threshold must be on one device, got {indices.device}, "
            f"{weight.device} and {threshold.device}"
        )
    check_ids_shape(indices, field_offsets)
    if field_offsets is not None and field_offsets.device != weight.device:
        raise ValueError(f"field_offsets must be on the table's device {weight.device}, got {field_offsets.device}")
    num_fields = None
    if row_source == PER_FIELD:
        if indices.dim() == 0:
            raise ValueError(f"mode {mode!r} needs indices whose last axis is the field axis, got a scalar")
        num_fields = indices.shape[-1]
    expected = threshold_shape(mode, weight.shape[0], weight.shape[1], num_fields)
    if tuple(threshold.shape) != expected:
        extra = f" (the last axis of indices has {num_fields} fields)" if num_fields is not None else ""
        raise ValueError(
            f"threshold of mode {mode!r} must have shape {expected} for a "
            f"{tuple(weight.shape)} table{extra}, got {tuple(threshold.shape)}"
        )
    return check_gk(gk)


def check_ids_shape(indices, field_offsets=None):
    """TypeError unless `indices` is an int32/int64 tensor; with `field_offsets` ((F + 1,) int64:
    0, then the cumulative field sizes) ValueError unless its last axis holds one id per field."""
    if not isinstance(indices, torch.Tensor) or indices.dtype not in INDEX_DTYPES:
        raise TypeError(f"indices must be an int32 or int64 tensor, got {getattr(indices, 'dtype', type(indices).__name__)}")
    if field_offsets is None:
        return
    if not isinstance(field_offsets, torch.Tensor) or field_offsets.dtype != torch.int64 or field_offsets.dim() != 1:
        raise TypeError(f"field_offsets must be a 1-D int64 tensor (0, then the cumulative field sizes), got "
                        f"{field_offsets!r}")
    if indices.dim() == 0 or indices.shape[-1] != field_offsets.numel() - 1:
        raise ValueError(f"ids must have shape (..., {field_offsets.numel() - 1}) (one id per field), got "
                         f"{tuple(indices.shape)}")


def check_ids_in_range(indices, num_embeddings):
    """IndexError naming an offending id (the smallest or largest); one host sync (the price of a clear error)."""
    if indices.numel() == 0:
        return
    check_id_bounds(*torch.stack(torch.aminmax(indices)).tolist(), num_embeddings)


def check_id_bounds(lo, hi, num_embeddings):
    """IndexError naming `lo` or `hi`, the smallest and largest id, if either is out of range."""
    if lo < 0 or hi >= num_embeddings:
        bad = lo if lo < 0 else hi
        raise IndexError(
            f"index {bad} is out of range for a table of {num_embeddings} rows "
            f"(valid ids are 0..{num_embeddings - 1})"
        )
