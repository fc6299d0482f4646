"""Eager PEP in plain PyTorch: the oracle every kernel is tested against.

Written for clarity, not speed; it follows PEP_SPEC sections 1-2 line by line and lets autograd
derive the gradients. Half-precision weights are computed in float32 and rounded once, as the
kernels do.
"""

import torch
import torch.nn.functional as F

from ._validation import (PER_FIELD, PER_ROW, bag_inputs, check_bag_mode, check_bag_offsets, check_gk,
                          check_ids_in_range, check_lookup, check_pooling, mode_layout, padding_row, threshold_shape)

MODES = ("global", "dimension", "feature", "feature_dim", "field", "field_dim")


def soft_threshold_values(v, s, gk=1.0):
    """S(v, s) = sign(v) * relu(|v| - gk * sigmoid(s)), with s broadcast against v."""
    return torch.sign(v) * torch.relu(torch.abs(v) - gk * torch.sigmoid(s))


def soft_threshold_embedding(indices, weight, threshold, mode="feature_dim", gk=1.0, sparse=False):
    """Looks up `indices` in the soft-thresholded table: output `indices.shape + (d,)`.

    For field modes the last axis of `indices` is the field axis. With `sparse=True` the
    gradients of `weight` and of per-row thresholds are sparse, as `nn.Embedding(sparse=True)`.
    """
    gk = check_lookup(indices, weight, threshold, mode, gk)
    check_ids_in_range(indices, weight.shape[0])
    row_source, _ = mode_layout(mode)
    compute = torch.promote_types(weight.dtype, torch.float32)
    rows = F.embedding(indices, weight, sparse=sparse).to(compute)
    if row_source == PER_ROW:
        s = F.embedding(indices, threshold, sparse=sparse)  # (..., 1) or (..., d)
    else:
        s = threshold  # (1,) or (d,) broadcast; (F, 1) or (F, d) broadcast over the field axis
    return soft_threshold_values(rows, s.to(compute), gk).to(weight.dtype)


def field_of_rows(field_dims):
    """Field id of every table row when fields are laid out one after another."""
    field_dims = torch.as_tensor(field_dims, dtype=torch.int64)
    return torch.repeat_interleave(torch.arange(len(field_dims)), field_dims)


def soft_threshold(weight, threshold, mode="feature_dim", gk=1.0, field_dims=None):
    """The whole pruned table S(V, s) of shape (N, d), for counting and export."""
    row_source, _ = mode_layout(mode)
    num_fields = None
    if row_source == PER_FIELD:
        if field_dims is None:
            raise ValueError(f"mode {mode!r} needs field_dims to know the field of each row")
        if sum(field_dims) != weight.shape[0]:
            raise ValueError(f"sum(field_dims) = {sum(field_dims)} must equal the {weight.shape[0]} rows of weight")
        num_fields = len(field_dims)
    expected = threshold_shape(mode, weight.shape[0], weight.shape[1], num_fields)
    if tuple(threshold.shape) != expected:
        raise ValueError(f"threshold of mode {mode!r} must have shape {expected}, got {tuple(threshold.shape)}")
    gk = check_gk(gk)
    if row_source == PER_FIELD:
        threshold = threshold[field_of_rows(field_dims).to(threshold.device)]
    compute = torch.promote_types(weight.dtype, torch.float32)
    return soft_threshold_values(weight.to(compute), threshold.to(compute), gk).to(weight.dtype)


def row_optimizer_step(rule, param, state, rows, grads):
    """One step of a `pep_kernels.optim` SGD or Adagrad rule on the distinct `rows` of `param`
    with loss gradients `grads`, in place; `state` holds the rule's tensors by name (zeros at
    first). Adam's oracle is torch.optim.Adam itself (every row, every step: the faithful mode)."""
    kind = rule.kind
    p = param[rows]
    g = grads.add(p, alpha=rule.weight_decay)
    if kind == "sgd":
        param[rows] = p.add(g, alpha=-rule.lr)
    elif kind == "adagrad":
        total = state["sum"][rows].addcmul(g, g)
        state["sum"][rows] = total
        param[rows] = p.addcdiv(g, total.sqrt().add(rule.eps), value=-rule.lr)
    elif kind == "rowwise_adagrad":
        total = state["sum"][rows] + (g * g).mean(1)
        state["sum"][rows] = total
        param[rows] = p - (rule.lr / (total.sqrt() + rule.eps)).unsqueeze(1) * g
    else:
        raise ValueError(f"no eager oracle for {kind!r} here: use torch.optim.Adam")


def soft_threshold_embedding_bag(input, weight, threshold, offsets=None, mode="feature_dim", gk=1.0, pooling="mean",
                                 per_sample_weights=None, include_last_offset=False, padding_idx=None):
    """`nn.EmbeddingBag` on the soft-thresholded table: the whole table S(V, s), as the published
    code computes it every step, pooled by `F.embedding_bag` (sum or mean; `per_sample_weights`
    with sum; lookups of `padding_idx` add nothing and count in no mean). Input forms as
    `F.embedding_bag`'s; modes global, dimension, feature, feature_dim. (B, d)."""
    check_bag_mode(mode)
    gk = check_lookup(input, weight, threshold, mode, gk)
    check_pooling(pooling)
    padding_idx = padding_row(padding_idx, weight.shape[0])
    ids, bag_offsets, per_sample_weights = bag_inputs(input, offsets, per_sample_weights, include_last_offset, pooling)
    check_ids_in_range(ids, weight.shape[0])
    check_bag_offsets(bag_offsets, ids.numel())
    table = soft_threshold(weight, threshold, mode, gk)
    return F.embedding_bag(ids, table, bag_offsets, mode=pooling, per_sample_weights=per_sample_weights,
                           include_last_offset=True, padding_idx=padding_idx)
