"""Row-sparse optimizer steps on table parameters, and the lookup whose backward applies one
(`FusedStepFunction`): C++ ops on CPU (csrc/optim_cpu.cpp), Triton on GPU (optim_triton.py).

State convention of every op: `state = [param, state1, state2, last_step]`, unused entries empty
tensors (see `pep_kernels.optim` for the rules and csrc/optim.h for the contract). Steps count
from 1; `schedule` is Adam's per-step factors, `Adam.schedule`.
"""

import torch

from .._validation import PER_ROW, mode_layout
from .soft_threshold import HAS_CPU_KERNELS, _cpu_ops, _triton_ops

if HAS_CPU_KERNELS:

    @torch.library.register_fake("pep_kernels::cpu_backward_step")
    def _(grad_out, ids, weight_state, threshold_state, schedule, mode, gk, kind, hparams, step):
        threshold = threshold_state[0]
        return threshold.new_empty(0) if mode_layout(mode)[0] == PER_ROW else threshold.new_empty(threshold.shape)

    @torch.library.register_fake("pep_kernels::row_optimizer_step")
    def _(state, rows, grads, schedule, kind, hparams, step):
        return None

    @torch.library.register_fake("pep_kernels::row_optimizer_catch_up")
    def _(state, rows, schedule, hparams, to_step):
        return None

    @torch.library.register_fake("pep_kernels::cpu_count_nonzero")
    def _(weight, threshold, mode, gk, field_offsets):
        return weight.new_empty((), dtype=torch.int64)


def _triton():
    from . import optim_triton  # noqa: PLC0415 - Triton optimizer kernels are needed on GPU only

    return optim_triton


def row_optimizer_step(state, rows, grads, schedule, kind, hparams, step, backend):
    """Applies step `step` to the sorted distinct `rows` of `state[0]` with gradients `grads`
    (kind `adam_dense` also updates every other row, with a zero loss gradient); backend
    "triton" or "cpu"."""
    if backend == "triton":
        _triton().row_optimizer_step(state, rows, grads, schedule, kind, hparams, step)
    else:
        torch.ops.pep_kernels.row_optimizer_step(state, rows, grads, schedule, kind, hparams, step)


def row_optimizer_catch_up(state, rows, schedule, hparams, to_step, backend, distinct=False):
    """Adam `fast`: replays the skipped steps of `rows` (any ids; all rows when None) up to `to_step`.
    `state` is [param, exp_avg, exp_avg_sq, last_step] of one or more parameters with the same rows.
    `distinct`: the rows are distinct and in range (`distinct_ids`) and the state is a table's own,
    so the Triton path skips its checks and their host syncs."""
    if backend == "triton":
        if distinct:
            _triton().catch_up_rows(state, rows, schedule, hparams, to_step)
        else:
            _triton().row_optimizer_catch_up(state, rows, schedule, hparams, to_step)
    else:
        torch.ops.pep_kernels.row_optimizer_catch_up(state, rows, schedule, hparams, to_step)


def backward_step(grad_out, ids, weight_state, threshold_state, schedule, mode, gk, kind, hparams, step, backend,
                  distinct=None):
    """The lookup's backward with the optimizer step applied to the looked-up rows; returns the
    gradient of a shared threshold, or None for per-row thresholds (updated here).

    On CPU one kernel does both for the row-sparse rules; Triton and `adam_dense` take the
    coalesced row gradients of the backward, then the optimizer kernel. On Triton, `distinct` is
    `distinct_ids(ids)`: the rows come checked, so the optimizer kernels launch without a sync."""
    per_row = mode_layout(mode)[0] == PER_ROW
    if kind == "adam_dense" or backend == "triton":
        weight, threshold = weight_state[0], threshold_state[0]
        if backend == "triton":
            grad_w, grad_s, rows = _triton_ops()[1](grad_out, ids, weight, threshold, mode, gk, True,
                                                    deterministic=False, distinct=distinct)
            apply_rows = _triton().apply_rows
        else:
            grad_w, grad_s, rows = _cpu_ops()[1](grad_out, ids, weight, threshold, mode, gk, True, deterministic=False)
            apply_rows = torch.ops.pep_kernels.row_optimizer_step
        apply_rows(weight_state, rows, grad_w, schedule, kind, hparams, step)
        if not per_row:
            return grad_s
        apply_rows(threshold_state, rows, grad_s, schedule, kind, hparams, step)
        return None
    grad_s = torch.ops.pep_kernels.cpu_backward_step(
        grad_out, ids, weight_state, threshold_state, schedule, mode, gk, kind, hparams, step)
    return None if per_row else grad_s


class FusedStepFunction(torch.autograd.Function):
    """A lookup whose backward steps the table's row optimizer (`table.backward_step`) instead of
    returning gradients for W and per-row thresholds. On Triton, `distinct` is
    `distinct_ids(ids)`, made once per step by the table."""

    @staticmethod
    def forward(ctx, indices, weight, threshold, table, backend, distinct):
        ids = indices.reshape(-1)
        forward = _triton_ops()[0] if backend == "triton" else _cpu_ops()[0]
        out = forward(ids, weight, threshold, table.threshold_mode, table.gk)
        ctx.ids, ctx.distinct, ctx.table, ctx.backend = ids, distinct, table, backend
        ctx.step = table.optimizer_steps()
        return out.view(indices.shape + (weight.shape[1],))

    @staticmethod
    def backward(ctx, grad_out):
        # The backward reads the rows as they are now and applies the next step: another step
        # since this lookup's forward would make both wrong.
        if ctx.table.optimizer_steps() != ctx.step:
            raise RuntimeError("a table with a fused optimizer was stepped between this lookup's forward and "
                               "backward: look it up once per backward (concatenate the ids of several lookups)")
        grad_s = ctx.table.backward_step(grad_out.reshape(-1, ctx.table.embedding_dim), ctx.ids, ctx.backend,
                                         ctx.distinct)
        return None, None, grad_s, None, None, None
