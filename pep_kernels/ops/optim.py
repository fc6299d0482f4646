"""The lookup of a table that trains itself (`FusedStepFunction`): its forward reads the rows as
the table's row optimizer has them, its backward applies the optimizer's step to the looked-up
rows instead of returning gradients for W and per-row thresholds. Also the fake kernels of the
row optimizer ops (C++ on CPU, csrc/optim_cpu.cpp; Triton on CUDA, optim_triton.py).
"""

import torch

from .soft_threshold import HAS_CPU_KERNELS

if HAS_CPU_KERNELS:

    @torch.library.register_fake("pep_kernels::row_optimizer_step")
    def _(state, rows, grads, schedule, kind, hparams, step):
        return None

    @torch.library.register_fake("pep_kernels::row_optimizer_catch_up")
    def _(state, rows, schedule, hparams, to_step):
        return None


class FusedStepFunction(torch.autograd.Function):
    """A lookup of `table` (a `PEPEmbedding` with an optimizer) whose backward steps the table's
    optimizer (`table.backward_step`); the threshold input carries the gradient of a shared
    threshold, for an ordinary optimizer."""

    @staticmethod
    def forward(ctx, indices, weight, threshold, table, backend, id_errors):
        out, rows = table.train_forward(indices.reshape(-1), backend, id_errors)
        ctx.rows, ctx.table, ctx.backend = rows, table, backend
        ctx.steps = table.known_steps()
        return out.view(indices.shape + (weight.shape[1],))

    @staticmethod
    def backward(ctx, grad_out):
        # The backward reads the rows as they are now and applies the next step: another step
        # since this lookup's forward would make both wrong.
        steps = ctx.table.known_steps()
        if ctx.steps is not None and steps is not None and steps != ctx.steps:
            raise RuntimeError("a table with a fused optimizer was stepped between this lookup's forward and "
                               "backward: look it up once per backward (concatenate the ids of several lookups)")
        grad_s = ctx.table.backward_step(grad_out.reshape(-1, ctx.table.embedding_dim), ctx.rows, ctx.backend)
        return None, None, grad_s, None, None, None
