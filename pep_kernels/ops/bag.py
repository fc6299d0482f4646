"""The soft-thresholded EmbeddingBag: fake kernels of the C++ bag ops (csrc/soft_threshold_bag_cpu.cpp,
schemas in csrc/ops.cpp) and the autograd Functions over them, the pooled lookup and the one whose
backward steps the table's fused row optimizer.

Op contract (the CPU kernels here; GPU kernels register for the same names): `ids` flat int32 or
int64; `bag_offsets` int64 (B + 1,), from 0 to ids.numel() and non-decreasing (nn.EmbeddingBag's
include_last_offset form); `per_sample_weights` (n,) or None (sum only); `pooling` "sum" or
"mean"; `padding_idx` -1 for none, else a row whose lookups add nothing, count in no mean and get
no gradient. The ops check all of it (ValueError naming the first bad offset, IndexError naming
a bad id) before any row is read.
"""

import torch

from .._validation import PER_ROW, mode_layout
from .soft_threshold import HAS_CPU_KERNELS, _sparse_grad, kernels

if HAS_CPU_KERNELS:

    @torch.library.register_fake("pep_kernels::soft_threshold_bag_forward")
    def _(ids, bag_offsets, per_sample_weights, weight, threshold, threshold_mode, gk, pooling, padding_idx, id_errors):
        return weight.new_empty((bag_offsets.shape[0] - 1, weight.shape[1]))

    @torch.library.register_fake("pep_kernels::soft_threshold_bag_train_forward")
    def _(ids, bag_offsets, per_sample_weights, weight_state, threshold_state, schedule, step, threshold_mode, gk,
          pooling, padding_idx, kind, hparams, id_errors):
        return weight_state[0].new_empty((bag_offsets.shape[0] - 1, weight_state[0].shape[1]))

    @torch.library.register_fake("pep_kernels::soft_threshold_bag_backward")
    def _(grad_out, ids, bag_offsets, per_sample_weights, weight, threshold, threshold_mode, gk, pooling, padding_idx,
          sparse):
        grad_weights = weight.new_empty(0 if per_sample_weights is None else ids.shape[0])
        no_rows = ids.new_empty(0, dtype=torch.int64)
        if not sparse:
            return weight.new_empty(weight.shape), threshold.new_empty(threshold.shape), no_rows, grad_weights
        # CPU: the distinct rows (coalesced); CUDA: one entry per lookup (no host sync)
        num_rows = torch.library.get_ctx().new_dynamic_size() if ids.device.type == "cpu" else ids.numel()
        per_row = mode_layout(threshold_mode)[0] == PER_ROW
        grad_s = threshold.new_empty((num_rows, threshold.shape[1]) if per_row else threshold.shape)
        return (weight.new_empty((num_rows, weight.shape[1])), grad_s, ids.new_empty(num_rows, dtype=torch.int64),
                grad_weights)

    @torch.library.register_fake("pep_kernels::soft_threshold_bag_backward_step")
    def _(grad_out, ids, bag_offsets, per_sample_weights, weight_state, threshold_state, schedule, step, threshold_mode,
          gk, pooling, padding_idx, kind, hparams, id_errors):
        threshold = threshold_state[0]
        return threshold.new_empty(0) if mode_layout(threshold_mode)[0] == PER_ROW else threshold.new_empty(threshold.shape)


class SoftThresholdBagFunction(torch.autograd.Function):
    """Bags of soft-thresholded rows, pooled (PEP_SPEC sections 1-2, pooled as nn.EmbeddingBag):
    gradients of W and the thresholds (row-sparse with `sparse`) and of the per-sample weights."""

    @staticmethod
    def forward(ctx, ids, bag_offsets, per_sample_weights, weight, threshold, mode, gk, pooling, padding_idx, sparse,
                id_errors, backend):
        out = kernels(backend).soft_threshold_bag_forward(ids, bag_offsets, per_sample_weights, weight, threshold,
                                                          mode, gk, pooling, padding_idx, id_errors)
        ctx.save_for_backward(ids, bag_offsets, per_sample_weights, weight, threshold)
        ctx.config = (mode, gk, pooling, padding_idx, sparse, backend)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        ids, bag_offsets, per_sample_weights, weight, threshold = ctx.saved_tensors
        mode, gk, pooling, padding_idx, sparse, backend = ctx.config
        grad_w, grad_s, rows, grad_weights = kernels(backend).soft_threshold_bag_backward(
            grad_out, ids, bag_offsets, per_sample_weights, weight, threshold, mode, gk, pooling, padding_idx, sparse)
        if sparse:
            grad_w = _sparse_grad(grad_w, rows, weight.shape[0], backend)
            if mode_layout(mode)[0] == PER_ROW:
                grad_s = _sparse_grad(grad_s, rows, threshold.shape[0], backend)
        grad_weights = grad_weights if ctx.needs_input_grad[2] else None
        return None, None, grad_weights, grad_w, grad_s, None, None, None, None, None, None, None


class FusedBagStepFunction(torch.autograd.Function):
    """Bags of a table with a fused row optimizer: the backward steps it (`table.bag_backward_step`)
    instead of returning gradients of W and of per-row thresholds."""

    @staticmethod
    def forward(ctx, ids, bag_offsets, per_sample_weights, weight, threshold, table, backend, id_errors):
        out = table.bag_train_forward(ids, bag_offsets, per_sample_weights, backend, id_errors)
        ctx.save_for_backward(ids, bag_offsets, per_sample_weights)
        ctx.table, ctx.backend, ctx.steps = table, backend, table.known_steps()
        return out

    @staticmethod
    def backward(ctx, grad_out):
        table = ctx.table
        # The backward reads the rows as they are now and applies the next step: another step
        # since this lookup's forward would make both wrong.
        steps = table.known_steps()
        if ctx.steps is not None and steps is not None and steps != ctx.steps:
            raise RuntimeError("a table with a fused optimizer was stepped between this lookup's forward and "
                               "backward: look it up once per backward (concatenate the bags of several lookups)")
        ids, bag_offsets, per_sample_weights = ctx.saved_tensors
        grad_weights = None
        if ctx.needs_input_grad[2]:  # from the rows before the step moves them
            # `fast` Adam's Triton forward catches rows up in registers only; this gradient reads
            # them from memory (a host sync on the GPU, on this path alone).
            table.catch_up(ids.to(torch.int64), ctx.backend)
            grad_weights = kernels(ctx.backend).soft_threshold_bag_backward(
                grad_out, ids, bag_offsets, per_sample_weights, table.weight.detach(), table.threshold.detach(),
                table.threshold_mode, table.gk, table.mode, table.padding_row, True)[3]
        grad_s = table.bag_backward_step(grad_out, ids, bag_offsets, per_sample_weights, ctx.backend)
        return None, None, grad_weights, None, grad_s, None, None, None
