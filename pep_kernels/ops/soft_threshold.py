"""The soft-threshold embedding lookup: Triton kernels, their launchers, the C++ CPU op's fake
kernels, and the autograd Function both backends share.

    out[n, :] = sign(W[ids[n]]) * relu(|W[ids[n]]| - gk * sigmoid(s[...]))      (PEP_SPEC 1-2)

Every kernel makes one pass over the gathered rows: it reads each looked-up row of W and the
thresholds it uses, never the whole table. Backward accumulates W-row gradients and per-row
threshold gradients at their destination row, either with atomics (default, fast, order of
float additions not fixed) or, with `deterministic=True`, by sorting the ids and letting one
program own each distinct row (fixed order, bitwise repeatable). Gradients of shared thresholds
(global, dimension, field modes) are written per lookup and reduced with torch sums, which are
deterministic in both paths.

Backend contract (`triton_forward`/`triton_backward` here, `cpu_forward`/`cpu_backward` in
csrc/): ids are flat int32/int64, checked to be in range before Triton sees them (the C++ ops
check themselves); `threshold` has the mode's shape. The backward returns (grad_weight,
grad_threshold, rows): dense gradients and an empty `rows`, or with `sparse=True` the gradients
of the distinct looked-up `rows` (sorted) for W and, in per-row modes, for the threshold.
"""

from pathlib import Path

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton
from triton.runtime.interpreter import InterpretedFunction

from .._validation import PER_FIELD, PER_ROW, mode_layout
from .indices import checked_ids


def _load_cpu_kernels():
    """Loads the C++ library built by setup.py (it registers the pep_kernels::cpu_* ops)."""
    library = next(Path(__file__).resolve().parent.parent.glob("_C*.so"), None)
    if library is None:
        return False
    torch.ops.load_library(str(library))
    return True


HAS_CPU_KERNELS = _load_cpu_kernels()


# ROW_SOURCE in the kernels takes the values of _validation: 0 SHARED, 1 PER_ROW, 2 PER_FIELD.
@triton.jit
def _threshold_rows(rows, offs_n, num_fields, ROW_SOURCE: tl.constexpr):
    if ROW_SOURCE == 1:
        return rows
    elif ROW_SOURCE == 2:
        return offs_n % num_fields
    else:
        return rows * 0


@triton.jit
def _gate(s_ptr, srows, offs_d, mask, stride_s, stride_sd, PER_DIM: tl.constexpr):
    """sigmoid(s) for each (lookup, dim) of the tile, in fp32."""
    if PER_DIM:
        cols = offs_d
    else:
        cols = offs_d * 0
    s = tl.load(s_ptr + srows[:, None] * stride_s + cols[None, :] * stride_sd, mask=mask, other=0.0)
    return tl.sigmoid(s.to(tl.float32))


@triton.jit
def _fwd_kernel(
    ids_ptr, w_ptr, s_ptr, out_ptr,
    n_lookups, dim, num_fields, gk,
    stride_w, stride_wd, stride_s, stride_sd,
    ROW_SOURCE: tl.constexpr, PER_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_lookups
    rows = tl.load(ids_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)
    srows = _threshold_rows(rows, offs_n, num_fields, ROW_SOURCE)
    for d0 in range(0, dim, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = mask_n[:, None] & (offs_d < dim)[None, :]
        w = tl.load(w_ptr + rows[:, None] * stride_w + offs_d[None, :] * stride_wd, mask=mask, other=0.0)
        w = w.to(tl.float32)
        t = gk * _gate(s_ptr, srows, offs_d, mask, stride_s, stride_sd, PER_DIM)
        a = tl.abs(w) - t
        r = tl.where(a <= 0, 0.0, a)  # written so that NaN propagates, as torch.relu does
        out = tl.where(w < 0, -r, r)
        tl.store(out_ptr + offs_n[:, None] * dim + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_atomic_kernel(
    grad_ptr, ids_ptr, dst_ptr, w_ptr, s_ptr, gw_ptr, gs_ptr, contrib_ptr,
    n_lookups, dim, num_fields, gk,
    stride_w, stride_wd, stride_s, stride_sd,
    ROW_SOURCE: tl.constexpr, PER_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_lookups
    rows = tl.load(ids_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)
    dst = tl.load(dst_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)
    srows = _threshold_rows(rows, offs_n, num_fields, ROW_SOURCE)
    row_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = mask_n[:, None] & (offs_d < dim)[None, :]
        w = tl.load(w_ptr + rows[:, None] * stride_w + offs_d[None, :] * stride_wd, mask=mask, other=0.0)
        w = w.to(tl.float32)
        y = _gate(s_ptr, srows, offs_d, mask, stride_s, stride_sd, PER_DIM)
        g = tl.load(grad_ptr + offs_n[:, None] * dim + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        keep = (tl.abs(w) - gk * y) > 0
        tl.atomic_add(gw_ptr + dst[:, None] * dim + offs_d[None, :], tl.where(keep, g, 0.0), mask=mask)
        g_sign = tl.where(keep, tl.where(w < 0, -g, g), 0.0)  # G * sign(W) where the entry passes
        if ROW_SOURCE == 1:
            ds = -(g_sign * gk) * (1.0 - y) * y
            if PER_DIM:
                tl.atomic_add(gs_ptr + dst[:, None] * dim + offs_d[None, :], ds, mask=mask)
            else:
                row_sum += tl.sum(ds, axis=1)
        else:
            tl.store(contrib_ptr + offs_n[:, None] * dim + offs_d[None, :], g_sign, mask=mask)
    if ROW_SOURCE == 1 and not PER_DIM:
        tl.atomic_add(gs_ptr + dst, row_sum, mask=mask_n)


@triton.jit
def _bwd_segment_kernel(
    grad_ptr, perm_ptr, seg_start_ptr, seg_row_ptr, seg_dst_ptr, w_ptr, s_ptr, gw_ptr, gs_ptr, contrib_ptr,
    dim, num_fields, gk,
    stride_w, stride_wd, stride_s, stride_sd,
    ROW_SOURCE: tl.constexpr, PER_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per distinct row: it sums that row's lookups in sorted order, so the result
    # does not depend on scheduling.
    seg = tl.program_id(0)
    start = tl.load(seg_start_ptr + seg)
    end = tl.load(seg_start_ptr + seg + 1)
    row = tl.load(seg_row_ptr + seg).to(tl.int64)
    dst = tl.load(seg_dst_ptr + seg).to(tl.int64)
    row_sum = 0.0
    for d0 in range(0, dim, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < dim
        mask = mask_d[None, :]
        w = tl.load(w_ptr + row * stride_w + offs_d * stride_wd, mask=mask_d, other=0.0).to(tl.float32)
        acc_w = tl.zeros((BLOCK_D,), dtype=tl.float32)
        acc_s = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for k in range(start, end):
            n = tl.load(perm_ptr + k).to(tl.int64)
            srow = _threshold_rows(row + tl.zeros((1,), tl.int64), n + tl.zeros((1,), tl.int64), num_fields, ROW_SOURCE)
            y = tl.reshape(_gate(s_ptr, srow, offs_d, mask, stride_s, stride_sd, PER_DIM), (BLOCK_D,))
            g = tl.load(grad_ptr + n * dim + offs_d, mask=mask_d, other=0.0).to(tl.float32)
            keep = (tl.abs(w) - gk * y) > 0
            acc_w += tl.where(keep, g, 0.0)
            g_sign = tl.where(keep, tl.where(w < 0, -g, g), 0.0)
            if ROW_SOURCE == 1:
                acc_s += g_sign
            else:
                tl.store(contrib_ptr + n * dim + offs_d, g_sign, mask=mask_d)
        tl.store(gw_ptr + dst * dim + offs_d, acc_w, mask=mask_d)
        if ROW_SOURCE == 1:
            srow = row + tl.zeros((1,), tl.int64)
            y = tl.reshape(_gate(s_ptr, srow, offs_d, mask, stride_s, stride_sd, PER_DIM), (BLOCK_D,))
            ds = -(acc_s * gk) * (1.0 - y) * y
            if PER_DIM:
                tl.store(gs_ptr + dst * dim + offs_d, ds, mask=mask_d)
            else:
                row_sum += tl.sum(tl.where(mask_d, ds, 0.0), axis=0)
    if ROW_SOURCE == 1 and not PER_DIM:
        tl.store(gs_ptr + dst, row_sum)


def _blocks(dim):
    """Tile of about 4K elements: whole rows up to d = 128, column chunks beyond."""
    block_d = min(max(triton.next_power_of_2(dim), 16), 128)
    return max(1, min(256, 4096 // block_d)), block_d


def _threshold_2d(threshold):
    """The threshold as (rows, 1 or d), whatever its mode's shape; no copy."""
    return threshold.reshape(1, -1) if threshold.dim() == 1 else threshold


def _check_triton_inputs(weight):
    if weight.dtype == torch.float64:
        raise TypeError("the Triton backend takes float32, float16 or bfloat16 weights, got torch.float64")
    if weight.device.type == "cpu" and not isinstance(_fwd_kernel, InterpretedFunction):
        raise ValueError(
            "the Triton backend needs CUDA tensors (or TRITON_INTERPRET=1 set before importing "
            "pep_kernels, to run its kernels slowly on the CPU for testing)"
        )


@triton_op("pep_kernels::triton_forward", mutates_args=())
def triton_forward(ids: torch.Tensor, weight: torch.Tensor, threshold: torch.Tensor, mode: str, gk: float) -> torch.Tensor:
    row_source, per_dim = mode_layout(mode)
    n, dim = ids.numel(), weight.shape[1]
    s2 = _threshold_2d(threshold)
    out = torch.empty((n, dim), dtype=weight.dtype, device=weight.device)
    if n:
        block_n, block_d = _blocks(dim)
        wrap_triton(_fwd_kernel)[(triton.cdiv(n, block_n),)](
            ids, weight, s2, out, n, dim, s2.shape[0], gk,
            weight.stride(0), weight.stride(1), s2.stride(0), s2.stride(1),
            ROW_SOURCE=row_source, PER_DIM=per_dim, BLOCK_N=block_n, BLOCK_D=block_d,
        )
    return out


def _reduce_shared(contrib, threshold, row_source, per_dim, gk):
    """Gradient of a shared threshold from the per-lookup terms G * sign(W) * [|W| > t]."""
    dim = contrib.shape[1]
    if row_source == PER_FIELD:
        per_field = contrib.view(-1, threshold.shape[0], dim).sum(0)
        total = per_field if per_dim else per_field.sum(1, keepdim=True)
    else:
        total = contrib.sum(0) if per_dim else contrib.sum().reshape(1)
    y = torch.sigmoid(threshold.float())
    return (-(total * gk) * (1.0 - y) * y).to(threshold.dtype)


def _gradient_buffers(weight, s2, num_dst, num_lookups, row_source):
    """fp32 accumulators: W rows, per-row threshold rows, per-lookup shared-threshold terms."""
    gw = torch.zeros((num_dst, weight.shape[1]), dtype=torch.float32, device=weight.device)
    gs = gw.new_zeros((num_dst, s2.shape[1])) if row_source == PER_ROW else gw.new_empty(0)
    contrib = gw.new_zeros((num_lookups, weight.shape[1])) if row_source != PER_ROW else gw.new_empty(0)
    return gw, gs, contrib


@triton_op("pep_kernels::triton_backward_atomic", mutates_args=())
def triton_backward_atomic(
    grad_out: torch.Tensor, ids: torch.Tensor, dst: torch.Tensor, num_dst: int,
    weight: torch.Tensor, threshold: torch.Tensor, mode: str, gk: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Adds lookup n's gradient into row dst[n] of (num_dst, .) fp32 buffers, with atomics."""
    row_source, per_dim = mode_layout(mode)
    n, dim = ids.numel(), weight.shape[1]
    s2 = _threshold_2d(threshold)
    gw, gs, contrib = _gradient_buffers(weight, s2, num_dst, n, row_source)
    if n:
        block_n, block_d = _blocks(dim)
        wrap_triton(_bwd_atomic_kernel)[(triton.cdiv(n, block_n),)](
            grad_out, ids, dst, weight, s2, gw, gs, contrib,
            n, dim, s2.shape[0], gk, weight.stride(0), weight.stride(1), s2.stride(0), s2.stride(1),
            ROW_SOURCE=row_source, PER_DIM=per_dim, BLOCK_N=block_n, BLOCK_D=block_d,
        )
    return gw, gs, contrib


@triton_op("pep_kernels::triton_backward_segments", mutates_args=())
def triton_backward_segments(
    grad_out: torch.Tensor, order: torch.Tensor, seg_start: torch.Tensor, seg_rows: torch.Tensor,
    seg_dst: torch.Tensor, num_dst: int, weight: torch.Tensor, threshold: torch.Tensor, mode: str, gk: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Deterministic: segment u (lookups order[seg_start[u]:seg_start[u+1]], all of row
    seg_rows[u]) is summed in order by one program into row seg_dst[u]."""
    row_source, per_dim = mode_layout(mode)
    dim = weight.shape[1]
    s2 = _threshold_2d(threshold)
    gw, gs, contrib = _gradient_buffers(weight, s2, num_dst, order.numel(), row_source)
    if seg_rows.numel():
        wrap_triton(_bwd_segment_kernel)[(seg_rows.numel(),)](
            grad_out, order, seg_start, seg_rows, seg_dst, weight, s2, gw, gs, contrib,
            dim, s2.shape[0], gk, weight.stride(0), weight.stride(1), s2.stride(0), s2.stride(1),
            ROW_SOURCE=row_source, PER_DIM=per_dim, BLOCK_D=_blocks(dim)[1],
        )
    return gw, gs, contrib


def triton_backward(grad_out, ids, weight, threshold, mode, gk, sparse, deterministic, distinct=None):
    """(grad_weight, grad_threshold, rows) as the C++ cpu_backward op returns them; `distinct`,
    the (rows, inverse) of `ids` if the caller has them (`distinct_ids`), saves their
    deduplication in a sparse, non-deterministic backward.

    The data-dependent steps (sorting, distinct rows) stay outside the Triton ops, so every op
    has static output shapes and traces under fake tensors."""
    row_source, per_dim = mode_layout(mode)
    grad_out = grad_out.contiguous()
    rows = ids.new_empty(0, dtype=torch.int64)
    if deterministic:
        sorted_ids, order = torch.sort(ids, stable=True)
        seg_rows, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
        seg_start = torch.nn.functional.pad(torch.cumsum(counts, 0), (1, 0))
        num_dst = seg_rows.numel() if sparse else weight.shape[0]
        seg_dst = torch.arange(num_dst, device=ids.device) if sparse else seg_rows
        gw, gs, contrib = torch.ops.pep_kernels.triton_backward_segments(
            grad_out, order, seg_start, seg_rows, seg_dst, num_dst, weight, threshold, mode, gk)
        if sparse:
            rows = seg_rows.to(torch.int64)
    else:
        if sparse:
            rows, dst = torch.unique(ids, return_inverse=True) if distinct is None else distinct
            num_dst = rows.numel()
        else:
            dst, num_dst = ids, weight.shape[0]
        gw, gs, contrib = torch.ops.pep_kernels.triton_backward_atomic(
            grad_out, ids, dst, num_dst, weight, threshold, mode, gk)
        rows = rows.to(torch.int64)
    if row_source == PER_ROW:
        grad_s = gs.to(threshold.dtype)
        grad_s = grad_s if sparse else grad_s.view(threshold.shape)
    else:
        grad_s = _reduce_shared(contrib, _threshold_2d(threshold), row_source, per_dim, gk)
        grad_s = grad_s.view(threshold.shape)
    return gw.to(weight.dtype), grad_s, rows


if HAS_CPU_KERNELS:

    @torch.library.register_fake("pep_kernels::cpu_forward")
    def _(ids, weight, threshold, mode, gk):
        return weight.new_empty((ids.numel(), weight.shape[1]))

    @torch.library.register_fake("pep_kernels::cpu_backward")
    def _(grad_out, ids, weight, threshold, mode, gk, sparse):
        row_source, _ = mode_layout(mode)
        if not sparse:
            return weight.new_empty(weight.shape), threshold.new_empty(threshold.shape), ids.new_empty(0, dtype=torch.int64)
        num_rows = torch.library.get_ctx().new_dynamic_size()
        grad_s = threshold.new_empty((num_rows, threshold.shape[1])) if row_source == PER_ROW else threshold.new_empty(threshold.shape)
        return weight.new_empty((num_rows, weight.shape[1])), grad_s, ids.new_empty(num_rows, dtype=torch.int64)


def _cpu_ops():
    if not HAS_CPU_KERNELS:
        raise RuntimeError(
            "the pep_kernels C++ extension is not built: install the package with "
            "`pip install --no-build-isolation -e .` (or pick backend='reference')"
        )
    ops = torch.ops.pep_kernels
    # The C++ backward sorts by row and owns each row in one task: always deterministic.
    return ops.cpu_forward, lambda *args, deterministic: ops.cpu_backward(*args)


def _triton_ops():
    return torch.ops.pep_kernels.triton_forward, triton_backward


def _sparse_grad(values, rows, num_rows):
    return torch.sparse_coo_tensor(
        rows.unsqueeze(0), values, (num_rows,) + tuple(values.shape[1:]), is_coalesced=True,
        check_invariants=False,
    )


class SoftThresholdEmbeddingFunction(torch.autograd.Function):
    """Lookup + soft threshold with the backward of PEP_SPEC section 2, on a kernel backend."""

    @staticmethod
    def forward(ctx, indices, weight, threshold, mode, gk, sparse, deterministic, backend):
        if backend == "triton":
            _check_triton_inputs(weight)
            forward, backward = _triton_ops()
            ids = checked_ids(indices, weight.shape[0])
        else:
            forward, backward = _cpu_ops()
            ids = indices.reshape(-1)
        out = forward(ids, weight, threshold, mode, gk)
        ctx.save_for_backward(ids, weight, threshold)
        ctx.backward_op = backward
        ctx.config = (mode, gk, sparse, deterministic)
        return out.view(indices.shape + (weight.shape[1],))

    @staticmethod
    def backward(ctx, grad_out):
        ids, weight, threshold = ctx.saved_tensors
        mode, gk, sparse, deterministic = ctx.config
        grad_w, grad_s, rows = ctx.backward_op(
            grad_out.reshape(-1, weight.shape[1]), ids, weight, threshold, mode, gk, sparse,
            deterministic=deterministic,
        )
        if sparse:
            grad_w = _sparse_grad(grad_w, rows, weight.shape[0])
            if mode_layout(mode)[0] == PER_ROW:
                grad_s = _sparse_grad(grad_s, rows, threshold.shape[0])
        return None, grad_w, grad_s, None, None, None, None, None
