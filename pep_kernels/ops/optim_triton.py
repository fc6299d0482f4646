"""Row-sparse optimizers of table parameters on GPU: the element rules as Triton functions (which
the fused backward of ops/soft_threshold.py applies too) and the CUDA kernels of the ops
`row_optimizer_step` and `row_optimizer_catch_up`.

Same contract as the C++ CPU ops (csrc/optim.h, csrc/optim_cpu.cpp): `state = [param, state1,
state2, last_step]`, `hparams = [lr, eps, weight_decay, beta1, beta2]`, steps count from 1 and
`schedule` is `Adam.schedule` (rows: lr / (1 - beta1^u), sqrt(1 - beta2^u), and the running sum
of their product in two parts). The element rules are those of csrc/optim_rows.inc in the same
operation order and roundings, in fp32: fused multiply-adds where the C++ calls std::fma,
correctly rounded division and square root (`tl.div_rn`, `tl.sqrt_rn`; Triton's `/` and
`tl.sqrt` may be approximate on a GPU), and no other product fused into a sum (the C++ is built
with -ffp-contract=off). The ops equal the C++ ops bit for bit in Triton's interpreter. The
sm_90 PTX keeps those roundings (div.rn, sqrt.rn, no flush to zero, no product left for ptxas to
contract), so a GPU should match as well. The ops check their arguments as the C++ ops do (which
reads the rows back: they are not on a training step's path).
"""

import functools
import math

import numpy as np
import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

_SGD = tl.constexpr(0)
_ADAGRAD = tl.constexpr(1)
_ROWWISE_ADAGRAD = tl.constexpr(2)
_ADAM = tl.constexpr(3)
# Kernel KIND of each rule ("adam_dense" has its own kernel).
KIND_CODES = {"sgd": 0, "adagrad": 1, "rowwise_adagrad": 2, "adam": 3}
_KINDS = (*KIND_CODES, "adam_dense")


@triton.jit
def _unfused_product(a, b):
    """a * b rounded on its own. A plain product feeding a sum would be fused into an fma (one
    rounding) by the GPU compiler; an fma with a zero addend rounds the product alone."""
    return tl.fma(a, b, 0.0)


@triton.jit
def _adam_element(p, m, v, g, neg_step_size, bc2_sqrt, eps, weight_decay, beta2, one_minus_beta1,
                  one_minus_beta2):
    """torch.optim.Adam's step on a tile (adam_element in csrc/optim_rows.inc); returns p, m, v."""
    gg = tl.fma(p, weight_decay, g)
    m = tl.fma(one_minus_beta1, gg - m, m)
    v = tl.fma(one_minus_beta2 * gg, gg, v * beta2)
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p + tl.div_rn(neg_step_size * m, denom)
    return p, m, v


@triton.jit
def _adam_tile_in_place(p_ptr, m_ptr, v_ptr, off, mask, g, neg_step_size, bc2_sqrt, eps, weight_decay, beta2,
                        one_minus_beta1, one_minus_beta2):
    """Adam's step on the tile of p, m and v at `off`, in memory, with the loss gradient `g`."""
    p = tl.load(p_ptr + off, mask=mask, other=0.0)
    m = tl.load(m_ptr + off, mask=mask, other=0.0)
    v = tl.load(v_ptr + off, mask=mask, other=0.0)
    p, m, v = _adam_element(p, m, v, g, neg_step_size, bc2_sqrt, eps, weight_decay, beta2, one_minus_beta1,
                            one_minus_beta2)
    tl.store(p_ptr + off, p, mask=mask)
    tl.store(m_ptr + off, m, mask=mask)
    tl.store(v_ptr + off, v, mask=mask)


# `fast` Adam's catch-up, as csrc/optim_rows.inc: skipped steps are replayed exactly in gaps of
# up to _EXACT_GAP steps and before step _EXACT_BEFORE; the rest in closed-form segments of up to
# _SEGMENT_STEPS steps.
_EXACT_GAP = tl.constexpr(4)
_EXACT_BEFORE = tl.constexpr(64)
_SEGMENT_STEPS = tl.constexpr(256)


def _segment_rows(beta1, beta2):
    """The rows of `_segment_table`, in double by repeated multiplication as csrc/optim_cpu.cpp
    computes them."""
    rows = [[0.0] * (_SEGMENT_STEPS.value + 1) for _ in range(9)]
    beta1_l, momentum_sum, momentum_moment, beta2_l = 1.0, 0.0, 0.0, [1.0]
    for length in range(1, _SEGMENT_STEPS.value + 1):
        beta1_l *= beta1
        momentum_sum += beta1_l
        momentum_moment += length * beta1_l
        beta2_l.append(beta2_l[-1] * beta2)
        centroid = math.floor(momentum_moment / momentum_sum + 0.5) if momentum_sum > 0 else 1
        beta2_c, beta2_mid = beta2_l[centroid], beta2_l[(length + 1) // 2]
        column = (beta1_l, momentum_sum, centroid, beta2_c, 1 - beta2_c, beta2_mid, 1 - beta2_mid,
                  beta2_l[length], 1 - beta2_l[length])
        for row, value in zip(rows, column):
            row[length] = value
    return rows


@functools.lru_cache(maxsize=16)
def _segment_table(beta1, beta2, device):
    """(9, _SEGMENT_STEPS + 1) float32, index L: the SegmentPowers of csrc/optim_rows.h (beta1^L,
    sum_{i=1..L} beta1^i, the momentum's centroid c, beta2^c, 1 - beta2^c, beta2^h and 1 - beta2^h
    at the midpoint h = (L + 1) / 2, beta2^L, 1 - beta2^L). Made once per betas and device: a copy
    to the GPU at every step would cost more than the step's kernels. Only the eager entry points
    below call this; the ops take the table as an input, so no cached tensor enters a trace."""
    rows = _segment_rows(beta1, beta2)
    return torch.tensor(rows, dtype=torch.float64).to(device=device, dtype=torch.float32)


def _segments(hparams, device):
    return _segment_table(float(hparams[3]), float(hparams[4]), torch.device(device))


@triton.jit
def _segment_power(seg_ptr, k, length):
    """Row k of the segment table at each row's length, as a column."""
    return tl.load(seg_ptr + k * (_SEGMENT_STEPS + 1) + length)[:, None]


@triton.jit
def _adam_segment(p, m, v, sched_ptr, sched_len, seg_ptr, u0, length, eps, weight_decay):
    """adam_segment of csrc/optim_rows.inc on each row r of a tile: steps u0[r] .. u0[r] +
    length[r] - 1 in closed form; returns p, m, v."""
    last = u0 + length - 1
    mid = u0 + (length + 1) // 2 - 1
    c = u0[:, None] + _segment_power(seg_ptr, 2, length).to(tl.int64) - 1  # a column, as the powers
    hi, lo = sched_ptr + 2 * sched_len, sched_ptr + 3 * sched_len
    total = (tl.load(hi + last) - tl.load(hi + u0 - 1)) + (tl.load(lo + last) - tl.load(lo + u0 - 1))
    rate_sum = (weight_decay * total)[:, None]
    inv_bc2_c = tl.div_rn(1.0, tl.load(sched_ptr + sched_len + c))
    momentum = _unfused_product(tl.load(sched_ptr + c), _segment_power(seg_ptr, 1, length))
    half_rate_c = _unfused_product(0.5 * rate_sum, inv_bc2_c)
    eps_bc2_mid = eps * tl.load(sched_ptr + sched_len + mid)[:, None]

    g = p * weight_decay
    second = _unfused_product(_segment_power(seg_ptr, 3, length), v) + _unfused_product(
        _segment_power(seg_ptr, 4, length), _unfused_product(g, g))
    inv_denom = tl.div_rn(1.0, _unfused_product(tl.sqrt_rn(second), inv_bc2_c) + eps)
    q = p - _unfused_product(_unfused_product(m - g, momentum), inv_denom)
    g_mid = _unfused_product(q * tl.exp(-half_rate_c * inv_denom), weight_decay)
    g2_mid = g_mid * g_mid
    second_mid = _unfused_product(_segment_power(seg_ptr, 5, length), v) + _unfused_product(
        _segment_power(seg_ptr, 6, length), g2_mid)
    p_end = q * tl.exp(-tl.div_rn(rate_sum, tl.sqrt_rn(second_mid) + eps_bc2_mid))
    m = _unfused_product(p_end, weight_decay) + _unfused_product(_segment_power(seg_ptr, 0, length), m - g)
    v = _unfused_product(_segment_power(seg_ptr, 7, length), v) + _unfused_product(
        _segment_power(seg_ptr, 8, length), g2_mid)
    return p_end, m, v


@triton.jit
def _adam_replay(p, m, v, sched_ptr, sched_len, seg_ptr, first, last, eps, weight_decay, beta2, one_minus_beta1,
                 one_minus_beta2):
    """Steps first[r]..last[r] with a zero loss gradient on each row r of a (rows, cols) tile
    (none where first[r] > last[r]), as adam_replay in csrc/optim_rows.inc; returns p, m, v."""
    early = tl.minimum(tl.maximum(first - 1, _EXACT_BEFORE - 1), last)
    exact_last = tl.where(last - first + 1 <= _EXACT_GAP, last, early)
    for u in range(tl.min(first, axis=0), tl.max(exact_last, axis=0) + 1):
        neg_step_size = -tl.load(sched_ptr + u)
        bc2_sqrt = tl.load(sched_ptr + sched_len + u)
        p_u, m_u, v_u = _adam_element(p, m, v, 0.0, neg_step_size, bc2_sqrt, eps, weight_decay, beta2,
                                      one_minus_beta1, one_minus_beta2)
        active = ((first <= u) & (u <= exact_last))[:, None]
        p = tl.where(active, p_u, p)
        m = tl.where(active, m_u, m)
        v = tl.where(active, v_u, v)
    # Segments of _SEGMENT_STEPS steps and a shorter last one; rows done early idle.
    rest = tl.where(last > exact_last, last - exact_last, 0)
    segments = (rest + _SEGMENT_STEPS - 1) // _SEGMENT_STEPS
    u0 = exact_last + 1
    for _ in range(0, tl.max(segments, axis=0)):
        active = u0 <= last
        length = tl.minimum(last - u0 + 1, _SEGMENT_STEPS)
        safe_u0 = tl.where(active, u0, 1)
        safe_length = tl.where(active, length, 1)
        p_k, m_k, v_k = _adam_segment(p, m, v, sched_ptr, sched_len, seg_ptr, safe_u0, safe_length, eps,
                                      weight_decay)
        p = tl.where(active[:, None], p_k, p)
        m = tl.where(active[:, None], m_k, m)
        v = tl.where(active[:, None], v_k, v)
        u0 = tl.where(active, u0 + length, u0)
    return p, m, v


@triton.jit
def _rowwise_adagrad_rows(rows, offs_r, mask_r, grads_ptr, p_ptr, sum_ptr, cols, lr, eps, weight_decay,
                          BLOCK_D: tl.constexpr):
    # The mean of g^2 is summed column by column, in the C++'s order, so that it rounds the same.
    sq = tl.zeros(offs_r.shape, dtype=tl.float32)
    for j in range(0, cols):
        p = tl.load(p_ptr + rows * cols + j, mask=mask_r, other=0.0)
        g = tl.load(grads_ptr + offs_r * cols + j, mask=mask_r, other=0.0)
        gg = tl.fma(p, weight_decay, g)
        sq = sq + _unfused_product(gg, gg)
    total = tl.load(sum_ptr + rows, mask=mask_r, other=0.0)
    total = total + tl.div_rn(sq, tl.full(offs_r.shape, cols, tl.float32))
    tl.store(sum_ptr + rows, total, mask=mask_r)
    rate = tl.div_rn(lr, tl.sqrt_rn(total) + eps)[:, None]
    for d0 in range(0, cols, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = mask_r[:, None] & (offs_d < cols)[None, :]
        p_off = rows[:, None] * cols + offs_d[None, :]
        p = tl.load(p_ptr + p_off, mask=mask, other=0.0)
        g = tl.load(grads_ptr + offs_r[:, None] * cols + offs_d[None, :], mask=mask, other=0.0)
        p = p - _unfused_product(rate, tl.fma(p, weight_decay, g))
        tl.store(p_ptr + p_off, p, mask=mask)


@triton.jit
def _apply_rows_kernel(
    rows_ptr, grads_ptr, p_ptr, s1_ptr, s2_ptr, last_ptr, sched_ptr, seg_ptr,
    n_rows, cols, sched_len, step, lr, eps, weight_decay, beta2, one_minus_beta1, one_minus_beta2,
    KIND: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Row rows[i] takes step `step` with gradient grads[i]; rows are distinct, so no two
    # programs touch one row.
    offs_r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < n_rows
    rows = tl.load(rows_ptr + offs_r, mask=mask_r, other=0)
    if KIND == _ROWWISE_ADAGRAD:
        _rowwise_adagrad_rows(rows, offs_r, mask_r, grads_ptr, p_ptr, s1_ptr, cols, lr, eps, weight_decay,
                              BLOCK_D)
    else:
        if KIND == _ADAM:
            # Steps last_step + 1 .. step - 1 were skipped (padding rows replay none).
            first = tl.where(mask_r, tl.load(last_ptr + rows, mask=mask_r, other=0) + 1, step)
            last = tl.zeros_like(first) + (step - 1)
            neg_step_size = -tl.load(sched_ptr + step)
            bc2_sqrt = tl.load(sched_ptr + sched_len + step)
        for d0 in range(0, cols, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask = mask_r[:, None] & (offs_d < cols)[None, :]
            p_off = rows[:, None] * cols + offs_d[None, :]
            p = tl.load(p_ptr + p_off, mask=mask, other=0.0)
            g = tl.load(grads_ptr + offs_r[:, None] * cols + offs_d[None, :], mask=mask, other=0.0)
            if KIND == _SGD:
                p = tl.fma(tl.fma(p, weight_decay, g), -lr, p)
            elif KIND == _ADAGRAD:
                total = tl.load(s1_ptr + p_off, mask=mask, other=0.0)
                gg = tl.fma(p, weight_decay, g)
                total = tl.fma(gg, gg, total)
                p = p + tl.div_rn(-lr * gg, tl.sqrt_rn(total) + eps)
                tl.store(s1_ptr + p_off, total, mask=mask)
            else:  # _ADAM
                m = tl.load(s1_ptr + p_off, mask=mask, other=0.0)
                v = tl.load(s2_ptr + p_off, mask=mask, other=0.0)
                p, m, v = _adam_replay(p, m, v, sched_ptr, sched_len, seg_ptr, first, last, eps, weight_decay, beta2,
                                       one_minus_beta1, one_minus_beta2)
                p, m, v = _adam_element(p, m, v, g, neg_step_size, bc2_sqrt, eps, weight_decay, beta2,
                                        one_minus_beta1, one_minus_beta2)
                tl.store(s1_ptr + p_off, m, mask=mask)
                tl.store(s2_ptr + p_off, v, mask=mask)
            tl.store(p_ptr + p_off, p, mask=mask)
        if KIND == _ADAM:
            tl.store(last_ptr + rows, tl.zeros_like(rows) + step, mask=mask_r)


@triton.jit
def _catch_up_kernel(
    rows_ptr, p_ptr, m_ptr, v_ptr, last_ptr, sched_ptr, seg_ptr,
    n_rows, cols, sched_len, to_step, eps, weight_decay, beta2, one_minus_beta1, one_minus_beta2,
    HAS_ROWS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Rows rows[i] (distinct), or row i without rows, replay steps last_step + 1 .. to_step.
    offs_r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < n_rows
    if HAS_ROWS:
        rows = tl.load(rows_ptr + offs_r, mask=mask_r, other=0)
    else:
        rows = offs_r
    last_step = tl.load(last_ptr + rows, mask=mask_r, other=0)
    behind = mask_r & (last_step < to_step)
    first = tl.where(behind, last_step + 1, to_step + 1)
    last = tl.zeros_like(first) + to_step
    for d0 in range(0, cols, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = behind[:, None] & (offs_d < cols)[None, :]
        off = rows[:, None] * cols + offs_d[None, :]
        p = tl.load(p_ptr + off, mask=mask, other=0.0)
        m = tl.load(m_ptr + off, mask=mask, other=0.0)
        v = tl.load(v_ptr + off, mask=mask, other=0.0)
        p, m, v = _adam_replay(p, m, v, sched_ptr, sched_len, seg_ptr, first, last, eps, weight_decay, beta2,
                               one_minus_beta1, one_minus_beta2)
        tl.store(p_ptr + off, p, mask=mask)
        tl.store(m_ptr + off, m, mask=mask)
        tl.store(v_ptr + off, v, mask=mask)
    tl.store(last_ptr + rows, last, mask=behind)


@triton.jit
def _dense_adam_kernel(
    grad_index_ptr, grads_ptr, p_ptr, m_ptr, v_ptr, sched_ptr,
    num_rows, cols, sched_len, step, eps, weight_decay, beta2, one_minus_beta1, one_minus_beta2,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Every row takes step `step`: row r with gradient grads[grad_index[r]], or a zero loss
    # gradient where grad_index[r] < 0.
    offs_r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < num_rows
    grad_index = tl.load(grad_index_ptr + offs_r, mask=mask_r, other=-1)
    has_grad = (grad_index >= 0)[:, None]
    neg_step_size = -tl.load(sched_ptr + step)
    bc2_sqrt = tl.load(sched_ptr + sched_len + step)
    for d0 in range(0, cols, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = mask_r[:, None] & (offs_d < cols)[None, :]
        off = offs_r[:, None] * cols + offs_d[None, :]
        g = tl.load(grads_ptr + grad_index[:, None] * cols + offs_d[None, :], mask=mask & has_grad, other=0.0)
        _adam_tile_in_place(p_ptr, m_ptr, v_ptr, off, mask, g, neg_step_size, bc2_sqrt, eps, weight_decay, beta2,
                            one_minus_beta1, one_minus_beta2)


def _tile(cols):
    """(BLOCK_R, BLOCK_D): tiles of about 1K elements, whole rows up to 128 columns."""
    block_d = min(max(triton.next_power_of_2(cols), 16), 128)
    return max(1, 1024 // block_d), block_d


def _fp32(x):
    """x rounded to float32 as the C++ casts it (numpy: a tenth of a torch scalar's cost, per launch)."""
    return float(np.float32(x))


def _scalars(hparams):
    """eps, weight_decay, beta2, 1 - beta1, 1 - beta2 as the C++ casts them to float (the
    differences taken in double first)."""
    _, eps, weight_decay, beta1, beta2 = hparams
    return [_fp32(x) for x in (eps, weight_decay, beta2, 1 - beta1, 1 - beta2)]


def _launch_row_optimizer_step(state, rows, grads, schedule, segments, kind, hparams, step):
    """Applies step `step` to the sorted distinct `rows` (inputs checked by row_optimizer_step;
    `segments` is `_segment_table`, used by kind "adam")."""
    param, state1, state2, last_step = state
    num_rows, cols = param.shape
    n = rows.numel()
    block_r, block_d = _tile(cols)
    scalars = _scalars(hparams)
    sched_len = schedule.shape[1] if schedule.dim() == 2 else 0
    if kind == "adam_dense":
        grad_index = torch.full((num_rows,), -1, dtype=torch.int64, device=param.device)
        grad_index[rows] = torch.arange(n, device=param.device)
        _dense_adam_kernel[(triton.cdiv(num_rows, block_r),)](
            grad_index, grads, param, state1, state2, schedule,
            num_rows, cols, sched_len, step, *scalars, BLOCK_R=block_r, BLOCK_D=block_d,
        )
    elif n:
        _apply_rows_kernel[(triton.cdiv(n, block_r),)](
            rows, grads, param, state1, state2, last_step, schedule, segments,
            n, cols, sched_len, step, _fp32(hparams[0]), *scalars,
            KIND=KIND_CODES[kind], BLOCK_R=block_r, BLOCK_D=block_d,
        )


def _launch_catch_up(state, rows, schedule, segments, hparams, to_step):
    """Adam: brings the distinct `rows` (all rows when None) up to step `to_step` (inputs checked
    by row_optimizer_catch_up)."""
    param, exp_avg, exp_avg_sq, last_step = state
    num_rows, cols = param.shape
    n = num_rows if rows is None else rows.numel()
    if n:
        block_r, block_d = _tile(cols)
        _catch_up_kernel[(triton.cdiv(n, block_r),)](
            rows, param, exp_avg, exp_avg_sq, last_step, schedule, segments,
            n, cols, schedule.shape[1], to_step, *_scalars(hparams),
            HAS_ROWS=rows is not None, BLOCK_R=block_r, BLOCK_D=block_d,
        )


def _checked_param(state):
    """state[0], if it is a float32 parameter the kernels can run on."""
    if len(state) == 0:
        raise ValueError("optimizer state must not be empty")
    param = state[0]
    if param.dtype != torch.float32:
        raise TypeError(f"the Triton row optimizers take float32 parameters, got {param.dtype}")
    if param.device.type != "cuda" and not isinstance(_apply_rows_kernel, InterpretedFunction):
        raise ValueError(
            "the Triton row optimizers need CUDA tensors (or TRITON_INTERPRET=1 set before importing "
            "pep_kernels, to run their kernels slowly on the CPU for testing)"
        )
    return param


def _check_rows(rows, param):
    """Int64 ids on the parameter's device, each in [0, rows of param)."""
    if rows.dtype != torch.int64:
        raise TypeError(f"rows must be int64, got {rows.dtype}")
    if rows.device != param.device:
        raise ValueError(f"rows must be on the parameter's device {param.device}, got {rows.device}")
    if rows.numel():
        lo, hi = (int(x) for x in torch.aminmax(rows))
        if lo < 0 or hi >= param.shape[0]:
            raise IndexError(f"row {lo if lo < 0 else hi} is out of range for a parameter of {param.shape[0]} rows")


def _check_state_tensor(t, param, shape, dtype, name):
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"optimizer state {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise TypeError(f"optimizer state {name} must be {dtype}, got {t.dtype}")
    if not t.is_contiguous() or t.device != param.device:
        raise ValueError(f"optimizer state {name} must be contiguous and on the parameter's device")


def _check_state(state, schedule, kind, hparams, step):
    """The checks of optim_args in csrc/optim_cpu.cpp: the state tensors `kind` uses, hparams,
    step and, for Adam, a schedule covering `step`."""
    if len(state) != 4:
        raise ValueError(f"optimizer state must be [param, state1, state2, last_step], got {len(state)} tensors")
    if len(hparams) != 5:
        raise ValueError(f"hparams must be [lr, eps, weight_decay, beta1, beta2], got {len(hparams)} values")
    if step < 1:
        raise ValueError(f"the optimizer step counts from 1, got {step}")
    for value in hparams[:3]:
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"lr, eps and weight_decay must be finite and >= 0, got {value}")
    if not all(0 <= beta < 1 for beta in hparams[3:]):
        raise ValueError(f"betas must be in [0, 1), got {hparams[3]} and {hparams[4]}")
    param = state[0]
    if param.dim() != 2 or not param.is_contiguous():
        raise ValueError(f"a row optimizer needs a contiguous 2-D parameter, got shape {tuple(param.shape)}")
    rows, cols = param.shape
    if kind == "adagrad":
        _check_state_tensor(state[1], param, (rows, cols), param.dtype, "sum")
    elif kind == "rowwise_adagrad":
        _check_state_tensor(state[1], param, (rows,), param.dtype, "sum")
    elif kind in ("adam", "adam_dense"):
        _check_state_tensor(state[1], param, (rows, cols), param.dtype, "exp_avg")
        _check_state_tensor(state[2], param, (rows, cols), param.dtype, "exp_avg_sq")
        if kind == "adam":
            _check_state_tensor(state[3], param, (rows,), torch.int64, "last_step")
        if not (schedule.dim() == 2 and schedule.shape[0] == 4 and schedule.shape[1] > step
                and schedule.dtype == param.dtype and schedule.is_contiguous() and schedule.device == param.device):
            raise ValueError(
                f"Adam needs a contiguous {param.dtype} schedule of shape (4, > {step}) (Adam.schedule) on the parameter's "
                f"device, got {schedule.dtype} of shape {tuple(schedule.shape)} on {schedule.device}"
            )


def row_optimizer_step(state, rows, grads, schedule, kind, hparams, step):
    """CUDA kernel of pep_kernels::row_optimizer_step: applies step `step` to the sorted distinct
    `rows` of `state[0]` with their loss gradients `grads` (rows, cols); kind `adam_dense` also
    updates every other row, with a zero loss gradient."""
    if kind not in _KINDS:
        raise ValueError(f"unknown row optimizer '{kind}'; expected sgd, adagrad, rowwise_adagrad, adam or adam_dense")
    param = _checked_param(state)
    _check_rows(rows, param)
    n = rows.numel()
    if rows.dim() != 1 or grads.dim() != 2 or tuple(grads.shape) != (n, param.shape[-1]):
        raise ValueError(
            f"grads must have shape ({n}, {param.shape[-1]}) for {n} rows, got {tuple(grads.shape)}")
    # Two updates of one row would race, as in the C++ op.
    if n > 1 and not bool((rows[1:] > rows[:-1]).all()):
        raise ValueError("rows must be sorted and distinct (coalesce the gradient first)")
    _check_state(state, schedule, kind, hparams, step)
    segments = _segments(hparams, rows.device) if kind == "adam" else schedule.new_empty(0)
    _launch_row_optimizer_step(list(state), rows.contiguous(), grads.to(device=param.device, dtype=param.dtype)
                               .contiguous(), schedule, segments, kind, [float(h) for h in hparams], step)


def row_optimizer_catch_up(state, rows, schedule, hparams, to_step):
    """CUDA kernel of pep_kernels::row_optimizer_catch_up: Adam ("adam") replays the skipped steps
    of `rows` (any ids, duplicates allowed; all rows when None) up to `to_step`, in each parameter
    of `state` ([param, exp_avg, exp_avg_sq, last_step] per parameter, all with the same rows)."""
    if len(state) == 0 or len(state) % 4:
        raise ValueError(f"optimizer state must be [param, state1, state2, last_step] for each parameter, got "
                         f"{len(state)} tensors")
    params = [_checked_param(state[k:k + 4]) for k in range(0, len(state), 4)]
    for other in params[1:]:
        if other.dim() != 2 or other.shape[0] != params[0].shape[0]:
            raise ValueError(f"the parameters caught up together must have the same rows and dtype: "
                             f"{tuple(params[0].shape)} {params[0].dtype} and {tuple(other.shape)} {other.dtype}")
    if to_step < 1:
        return  # nothing has been applied yet
    if rows is not None:
        _check_rows(rows, params[0])
        # Distinct ids: one program owns each row, so duplicates cannot replay a row twice.
        rows = torch.unique(rows)
    for k in range(0, len(state), 4):
        _check_state(state[k:k + 4], schedule, "adam", hparams, to_step)
    segments = _segments(hparams, state[0].device)
    for k in range(0, len(state), 4):
        _launch_catch_up(list(state[k:k + 4]), rows, schedule, segments, [float(h) for h in hparams], to_step)
