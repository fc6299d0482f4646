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


def check_lookup(indices, weight, threshold, mode, gk):
    """Validates everything about a lookup except the id values; returns gk as a float."""
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


# A bag pools lookups of one feature: no field axis, so no field modes.
BAG_MODES = tuple(mode for mode, (row_source, _) in MODES.items() if row_source != PER_FIELD)
POOLINGS = ("sum", "mean")


def check_bag_mode(mode):
    """ValueError unless `mode` is a threshold mode a bag can use (global, dimension, feature, feature_dim)."""
    if mode_layout(mode)[0] == PER_FIELD:
        raise ValueError(f"threshold mode {mode!r} does not apply to a bag (a bag has no field axis); "
                         f"expected {', '.join(BAG_MODES[:-1])} or {BAG_MODES[-1]}")


def check_pooling(pooling, name="pooling"):
    if pooling not in POOLINGS:
        raise ValueError(f"unknown {name} {pooling!r}; expected 'sum' or 'mean' (max pooling has no PEP kernel)")


def padding_row(padding_idx, num_embeddings):
    """nn.EmbeddingBag's `padding_idx` as a row (a negative one counts from the end), or None."""
    if padding_idx is None:
        return None
    if isinstance(padding_idx, bool) or not isinstance(padding_idx, int):
        raise TypeError(f"padding_idx must be an int or None, got {type(padding_idx).__name__}")
    if not -num_embeddings <= padding_idx < num_embeddings:
        raise ValueError(f"padding_idx must be within num_embeddings ({-num_embeddings}..{num_embeddings - 1}), "
                         f"got {padding_idx}")
    return padding_idx % num_embeddings


def bag_inputs(input, offsets, per_sample_weights, include_last_offset, pooling):
    """nn.EmbeddingBag's input forms as the bag ops take them: (ids (n,), bag_offsets int64
    (B + 1,), per_sample_weights (n,) or None). 2-D input (B, L) is B bags of L ids (offsets must
    be None; include_last_offset does not apply, as in torch); 1-D input needs offsets, the start of
    each of B bags, or with include_last_offset B + 1 offsets whose last is the number of ids. The
    offsets' values are checked by the ops (`check_bag_offsets`)."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if input.dim() == 2:
        if offsets is not None:
            raise ValueError("offsets must be None when input is 2-D (B, L): each row is a bag")
        bag_offsets = torch.arange(input.shape[0] + 1, device=input.device) * input.shape[1]
    elif input.dim() == 1:
        if offsets is None:
            raise ValueError("1-D input needs offsets: the start of each bag (B,), or B + 1 offsets with "
                             "include_last_offset=True")
        if not isinstance(offsets, torch.Tensor):
            raise TypeError(f"offsets must be a torch.Tensor, got {type(offsets).__name__}")
        if offsets.dtype not in INDEX_DTYPES:
            raise TypeError(f"offsets must be int32 or int64, got {offsets.dtype}")
        if offsets.dim() != 1:
            raise ValueError(f"offsets must be 1-D, got shape {tuple(offsets.shape)}")
        if include_last_offset:
            if offsets.numel() == 0:
                raise ValueError("include_last_offset=True needs B + 1 offsets (at least one), got none")
            bag_offsets = offsets.long()
        else:
            bag_offsets = torch.cat([offsets.long(), offsets.new_full((1,), input.numel(), dtype=torch.int64)])
    else:
        raise ValueError(f"input must be 1-D (with offsets) or 2-D (B, L), got shape {tuple(input.shape)}")
    if per_sample_weights is not None:
        if pooling != "sum":
            raise ValueError(f"per_sample_weights need pooling 'sum', got {pooling!r}")
        if not isinstance(per_sample_weights, torch.Tensor):
            raise TypeError(f"per_sample_weights must be a torch.Tensor, got {type(per_sample_weights).__name__}")
        if per_sample_weights.shape != input.shape:
            raise ValueError(f"per_sample_weights must have the shape of input {tuple(input.shape)}, "
                             f"got {tuple(per_sample_weights.shape)}")
        per_sample_weights = per_sample_weights.reshape(-1)
    return input.reshape(-1), bag_offsets, per_sample_weights


def check_bag_offsets(bag_offsets, num_ids):
    """The C++ ops' check of B + 1 bag offsets, for the paths without them (the eager reference,
    serving from a store): ValueError naming the first offset that is not where a bag can start
    (one host sync)."""
    bad = torch.empty_like(bag_offsets, dtype=torch.bool)
    bad[0] = bag_offsets[0] != 0
    bad[1:] = (bag_offsets[1:] > num_ids) | (bag_offsets[1:] < bag_offsets[:-1])
    bad[-1] |= bag_offsets[-1] != num_ids
    if not bool(bad.any()):
        return
    i = int(bad.nonzero()[0, 0])
    value, last = int(bag_offsets[i]), bag_offsets.numel() - 1
    if i == 0 and value != 0:
        raise ValueError(f"bag offsets must start at 0, got offsets[0] = {value}")
    if i > 0 and value > num_ids:
        raise ValueError(f"bag offsets must be at most the number of ids {num_ids}, got offsets[{i}] = {value}")
    if i > 0 and value < int(bag_offsets[i - 1]):
        raise ValueError(f"bag offsets must be non-decreasing, got offsets[{i}] = {value} after "
                         f"offsets[{i - 1}] = {int(bag_offsets[i - 1])}")
    raise ValueError(f"the last bag offset must be the number of ids {num_ids}, got offsets[{last}] = {value}")
