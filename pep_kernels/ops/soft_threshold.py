"""The soft-threshold lookup and bag on GPU: Triton kernels, their launchers (the CUDA kernels of
the pep_kernels lookup, bag and masked ops, whose CPU kernels are C++), the ops' fake kernels, and
the autograd Functions of the lookup and the masked lookup. No host synchronisation: one forward
kernel; a sort and two kernels over chunks of the sorted lookups for the backward, with the fused
optimizer step; the step counter on the device (docs/design/gpu_path.md).
"""

import functools
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from .._validation import PER_FIELD, PER_ROW, mode_layout
from .indices import BAD_ID, BAD_OFFSET, NO_ERROR, SCHEDULE_EXHAUSTED
from . import optim_triton
from .optim_triton import (KIND_CODES, _adam_element, _adam_replay, _adam_tile_in_place, _fp32, _scalars, _segments,
                           _unfused_product)

_NO_ERROR, _BAD_ID, _BAD_OFFSET = tl.constexpr(NO_ERROR), tl.constexpr(BAD_ID), tl.constexpr(BAD_OFFSET)
_SCHEDULE_EXHAUSTED = tl.constexpr(SCHEDULE_EXHAUSTED)


def _load_library():
    """Loads the C++ library built by setup.py: the schemas of every op and their CPU kernels."""
    library = next(Path(__file__).resolve().parent.parent.glob("_C*.so"), None)
    if library is None:
        return False
    torch.ops.load_library(str(library))
    return True


HAS_CPU_KERNELS = _load_library()

# What the backward kernels do with each row's gradient.
_DENSE, _SPARSE, _FUSED = 0, 1, 2


# --- shared pieces of the kernels -----------------------------------------------------------------

@triton.jit
def _record_error(err_ptr, bad, kind, position, value, field, size):
    """Claims the error record (pep_kernels/ops/indices.py) for one lane of `bad` unless it holds an
    error already: a compare-and-swap from NO_ERROR (lanes that are not bad compare with -2, which
    never matches). Tiles without a bad lane skip it: no atomics on the common path."""
    if tl.sum(bad.to(tl.int32), axis=0) > 0:
        zero = tl.zeros_like(position)
        old = tl.atomic_cas(err_ptr + zero, tl.where(bad, _NO_ERROR, -2).to(tl.int64), zero + kind)
        won = bad & (old == _NO_ERROR)
        tl.store(err_ptr + 1 + zero, position, mask=won)
        tl.store(err_ptr + 2 + zero, value, mask=won)
        tl.store(err_ptr + 3 + zero, field, mask=won)
        tl.store(err_ptr + 4 + zero, size, mask=won)


@triton.jit
def _lookup_rows(ids_ptr, field_offsets_ptr, err_ptr, offs, live, num_fields, num_rows,
                 HAS_FIELDS: tl.constexpr, RECORD: tl.constexpr):
    """(row, ok) of each lookup: the global row (num_rows, past every row, for a bad id) and
    whether it is in range; a bad id is recorded."""
    raw = tl.load(ids_ptr + offs, mask=live, other=0).to(tl.int64)
    if HAS_FIELDS:
        field = offs % num_fields
        first = tl.load(field_offsets_ptr + field, mask=live, other=0)
        size = tl.load(field_offsets_ptr + field + 1, mask=live, other=0) - first
        row = first + raw
        ok = live & (raw >= 0) & (raw < size) & (row >= 0) & (row < num_rows)  # whatever the offsets say
    else:
        field = tl.zeros_like(offs) - 1
        size = tl.zeros_like(offs) + num_rows
        ok = live & (raw >= 0) & (raw < num_rows)
        row = raw
    if RECORD:
        _record_error(err_ptr, live & ~ok, _BAD_ID, offs, raw, field, size)
    return tl.where(ok, row, num_rows), ok


@triton.jit
def _threshold_rows(rows, positions, num_threshold_rows, ROW_SOURCE: tl.constexpr):
    """The threshold row of each lookup: 0 (shared), its table row, or its field (position % F)."""
    if ROW_SOURCE == 1:
        return rows
    elif ROW_SOURCE == 2:
        return positions % num_threshold_rows
    else:
        return rows * 0


@triton.jit
def _rows_tile(ptr, rows, cols, mask, stride, stride_col):
    return tl.load(ptr + rows[:, None] * stride + cols[None, :] * stride_col, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _caught_up(p, rows, cols, mask, row_mask, m_ptr, v_ptr, last_ptr, width, step, sched_ptr, sched_len, seg_ptr,
               eps, weight_decay, beta2, one_minus_beta1, one_minus_beta2, MOMENTS: tl.constexpr = True):
    """`fast` Adam: the tile p of rows `rows` (columns `cols` of a contiguous (., width) parameter)
    and its moments, caught up from each row's last step to `step` in registers; (p, m, v).
    Without MOMENTS only the rows that are behind read their moments (the forward needs p only)."""
    last_step = tl.load(last_ptr + rows, mask=row_mask, other=0)
    behind = mask & (last_step < step)[:, None]
    off = rows[:, None] * width + cols[None, :]
    m = tl.load(m_ptr + off, mask=mask if MOMENTS else behind, other=0.0)
    v = tl.load(v_ptr + off, mask=mask if MOMENTS else behind, other=0.0)
    first = tl.where(row_mask, last_step + 1, step + 1)
    return _adam_replay(p, m, v, sched_ptr, sched_len, seg_ptr, first, tl.zeros_like(first) + step, eps,
                        weight_decay, beta2, one_minus_beta1, one_minus_beta2)


@triton.jit
def _soft_threshold(w, t):
    a = tl.abs(w) - t
    r = tl.where(a <= 0, 0.0, a)  # written so that NaN propagates, as torch.relu does
    return tl.where(w < 0, -r, r)


@triton.jit
def _pruned_tile(w_ptr, s_ptr, row, srows, cols, mask, ok, wm_ptr, wv_ptr, wlast_ptr, sm_ptr, sv_ptr, slast_ptr,
                 sched_ptr, sched_len, seg_ptr, step, dim, gk, stride_w, stride_wd, stride_s, stride_sd, eps,
                 weight_decay, beta2, one_minus_beta1, one_minus_beta2, ROW_SOURCE: tl.constexpr,
                 PER_DIM: tl.constexpr, CATCH_UP: tl.constexpr):
    """S(W, s) of the looked-up rows (threshold rows `srows`), fp32; under `fast` Adam (CATCH_UP)
    W and a per-row s as they are after the steps they missed, up to `step` (nothing written)."""
    w = _rows_tile(w_ptr, row, cols, mask, stride_w, stride_wd)
    scols = cols if PER_DIM else cols * 0
    s = _rows_tile(s_ptr, srows, scols, mask, stride_s, stride_sd)
    if CATCH_UP:
        w, _, _ = _caught_up(w, row, cols, mask, ok, wm_ptr, wv_ptr, wlast_ptr, dim, step, sched_ptr, sched_len,
                             seg_ptr, eps, weight_decay, beta2, one_minus_beta1, one_minus_beta2, False)
        if ROW_SOURCE == 1:
            s, _, _ = _caught_up(s, row, scols, mask, ok, sm_ptr, sv_ptr, slast_ptr, dim if PER_DIM else 1, step,
                                 sched_ptr, sched_len, seg_ptr, eps, weight_decay, beta2, one_minus_beta1,
                                 one_minus_beta2, False)
    return _soft_threshold(w, gk * tl.sigmoid(s))


@triton.jit
def _segmented_sum(a, a_starts, b, b_starts):
    """Combine of a segmented inclusive scan: a run restarts where its first element starts it."""
    return tl.where(b_starts != 0, b, a + b), a_starts | b_starts


@triton.jit
def _apply_rule(p, m, v, g, mask, rows, row_mask, cols, width, state1_ptr, state2_ptr, last_ptr, sched_ptr,
                sched_len, u, lr, eps, weight_decay, beta2, one_minus_beta1, one_minus_beta2, KIND: tl.constexpr):
    """Optimizer step u on the tile p (rows `rows`, gradient g) where `mask`; writes the state and
    returns the new p. The element rules of csrc/optim_rows.inc (optim_triton.py)."""
    off = rows[:, None] * width + cols[None, :]
    if KIND == 0:  # SGD
        p = tl.fma(tl.fma(p, weight_decay, g), -lr, p)
    elif KIND == 1:  # Adagrad
        total = tl.load(state1_ptr + off, mask=mask, other=0.0)
        gg = tl.fma(p, weight_decay, g)
        total = tl.fma(gg, gg, total)
        p = p + tl.div_rn(-lr * gg, tl.sqrt_rn(total) + eps)
        tl.store(state1_ptr + off, total, mask=mask)
    elif KIND == 2:  # row-wise Adagrad: one accumulator per row, the mean of g^2 over the row
        gg = tl.fma(p, weight_decay, g)
        sq = tl.sum(tl.where(mask, _unfused_product(gg, gg), 0.0), axis=1)
        total = tl.load(state1_ptr + rows, mask=row_mask, other=0.0) + tl.div_rn(sq, tl.zeros_like(sq) + width)
        tl.store(state1_ptr + rows, total, mask=row_mask)
        p = p - _unfused_product(tl.div_rn(lr, tl.sqrt_rn(total) + eps)[:, None], gg)
    else:  # Adam (m, v caught up to step u - 1)
        at = tl.minimum(u, sched_len - 1)  # past the schedule nothing is stored (the mask), and nothing read past it
        p, m, v = _adam_element(p, m, v, g, -tl.load(sched_ptr + at), tl.load(sched_ptr + sched_len + at), eps,
                                weight_decay, beta2, one_minus_beta1, one_minus_beta2)
        tl.store(state1_ptr + off, m, mask=mask)
        tl.store(state2_ptr + off, v, mask=mask)
        tl.store(last_ptr + rows, tl.zeros_like(rows) + u, mask=row_mask)
    return p


@triton.jit
def _finish_step(counter_ptr, step_ptr):
    """The last program of the launch to get here increments the step counter (every program read
    it before) and resets the done-counter for the next launch."""
    done = tl.atomic_add(counter_ptr, 1)
    if done == tl.num_programs(0) - 1:
        tl.store(step_ptr, tl.load(step_ptr) + 1)
        tl.store(counter_ptr, 0)


@triton.jit
def _next_step(step_ptr, sched_len, err_ptr, NEEDS_SCHEDULE: tl.constexpr):
    """(u, ok): the step being applied, and (a (1,) mask) whether the Adam schedule covers it
    (recorded if not)."""
    u = tl.load(step_ptr) + 1
    at = tl.zeros((1,), tl.int64) + u
    if NEEDS_SCHEDULE:
        ok = at < sched_len
        _record_error(err_ptr, ~ok, _SCHEDULE_EXHAUSTED, at * 0 - 1, at, at * 0 - 1, at * 0 + sched_len)
    else:
        ok = at > 0
    return u, ok


@triton.jit
def _bag_of(bag_offsets_ptr, num_bags, search_steps, position):
    """The bag of each lookup: the last b with bag_offsets[b] <= position (a binary search of
    `search_steps` = ceil(log2(B + 1)) halvings; empty bags are stepped over)."""
    lo = tl.zeros_like(position)
    hi = lo + num_bags
    for _ in range(search_steps):
        mid = (lo + hi + 1) // 2
        below = tl.load(bag_offsets_ptr + mid, mask=mid <= num_bags, other=0) <= position
        lo = tl.where(below, mid, lo)
        hi = tl.where(below, hi, mid - 1)
    return tl.minimum(lo, num_bags - 1)


# --- the kernels --------------------------------------------------------------------------------------

@triton.jit
def _forward_kernel(
    ids_ptr, field_offsets_ptr, w_ptr, s_ptr, out_ptr, rows_ptr, err_ptr,
    wm_ptr, wv_ptr, wlast_ptr, sm_ptr, sv_ptr, slast_ptr, sched_ptr, seg_ptr, step_ptr,
    n, dim, num_fields, num_rows, num_threshold_rows, gk,
    stride_w, stride_wd, stride_s, stride_sd, sched_len, eps, weight_decay, beta2, one_minus_beta1, one_minus_beta2,
    ROW_SOURCE: tl.constexpr, PER_DIM: tl.constexpr, HAS_FIELDS: tl.constexpr, RECORD: tl.constexpr,
    MASKED: tl.constexpr, CATCH_UP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    live = offs < n
    row, ok = _lookup_rows(ids_ptr, field_offsets_ptr, err_ptr, offs, live, num_fields, num_rows, HAS_FIELDS, RECORD)
    tl.store(rows_ptr + offs, row.to(rows_ptr.dtype.element_ty), mask=live)
    cols = tl.arange(0, BLOCK_D)
    in_dim = (cols < dim)[None, :]
    mask = ok[:, None] & in_dim
    if MASKED:
        w = _rows_tile(w_ptr, row, cols, mask, stride_w, stride_wd)
        keep = tl.load(s_ptr + row[:, None] * stride_s + cols[None, :] * stride_sd, mask=mask, other=0)
        out = tl.where(keep != 0, w, 0.0)
    else:
        # a step past the schedule is reported by the backward; nothing is read past it here
        step = tl.minimum(tl.load(step_ptr), sched_len - 1) if CATCH_UP else 0
        out = _pruned_tile(w_ptr, s_ptr, row, _threshold_rows(row, offs, num_threshold_rows, ROW_SOURCE), cols, mask,
                           ok, wm_ptr, wv_ptr, wlast_ptr, sm_ptr, sv_ptr, slast_ptr, sched_ptr, sched_len, seg_ptr,
                           step, dim, gk, stride_w, stride_wd, stride_s, stride_sd, eps, weight_decay, beta2,
                           one_minus_beta1, one_minus_beta2, ROW_SOURCE, PER_DIM, CATCH_UP)
    tl.store(out_ptr + offs[:, None] * dim + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=live[:, None] & in_dim)


@triton.jit
def _bag_forward_kernel(
    ids_ptr, bag_offsets_ptr, psw_ptr, w_ptr, s_ptr, out_ptr, err_ptr,
    wm_ptr, wv_ptr, wlast_ptr, sm_ptr, sv_ptr, slast_ptr, sched_ptr, seg_ptr, step_ptr,
    n, num_bags, dim, num_rows, padding_idx, gk,
    stride_w, stride_wd, stride_s, stride_sd, sched_len, eps, weight_decay, beta2, one_minus_beta1, one_minus_beta2,
    ROW_SOURCE: tl.constexpr, PER_DIM: tl.constexpr, MEAN: tl.constexpr, HAS_PSW: tl.constexpr, RECORD: tl.constexpr,
    CATCH_UP: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Program b pools bag b: its lookups in tiles of BLOCK_L, soft-thresholded and summed in
    # registers; nothing of size (lookups, d) is written. A bag whose offsets are out of order
    # reads nothing and is recorded (deferred: raised by the caller later).
    bag = tl.program_id(0).to(tl.int64)
    start = tl.load(bag_offsets_ptr + bag)
    end = tl.load(bag_offsets_ptr + bag + 1)
    bad_start = (start < 0) | (start > n) | ((bag == 0) & (start != 0))
    bad_end = (end < start) | (end > n) | ((bag == num_bags - 1) & (end != n))
    if RECORD:
        at = tl.zeros((1,), tl.int64)
        bad = (at + (bad_start | bad_end).to(tl.int64)) != 0
        _record_error(err_ptr, bad, _BAD_OFFSET, at + bag + bad_end.to(tl.int64),
                      at + tl.where(bad_end, end, start), at - 1, at + n)
    ok_bag = ~(bad_start | bad_end)
    start = tl.where(ok_bag, start, 0)
    end = tl.where(ok_bag, end, 0)
    cols = tl.arange(0, BLOCK_D)
    in_dim = (cols < dim)[None, :]
    acc = tl.zeros((BLOCK_D,), tl.float32)
    count = tl.zeros((1,), tl.int64)
    step = tl.minimum(tl.load(step_ptr), sched_len - 1) if CATCH_UP else 0
    for k0 in range(start, end, BLOCK_L):
        offs = k0 + tl.arange(0, BLOCK_L).to(tl.int64)
        live = offs < end
        raw = tl.load(ids_ptr + offs, mask=live, other=0).to(tl.int64)
        in_range = (raw >= 0) & (raw < num_rows)
        if RECORD:
            _record_error(err_ptr, live & ~in_range, _BAD_ID, offs, raw, offs * 0 - 1, offs * 0 + num_rows)
        used = live & (raw != padding_idx)
        ok = used & in_range
        row = tl.where(ok, raw, 0)
        mask = ok[:, None] & in_dim
        value = _pruned_tile(w_ptr, s_ptr, row, _threshold_rows(row, offs, 1, ROW_SOURCE), cols, mask, ok, wm_ptr,
                             wv_ptr, wlast_ptr, sm_ptr, sv_ptr, slast_ptr, sched_ptr, sched_len, seg_ptr, step, dim, gk,
                             stride_w, stride_wd, stride_s, stride_sd, eps, weight_decay, beta2, one_minus_beta1,
                             one_minus_beta2, ROW_SOURCE, PER_DIM, CATCH_UP)
        if HAS_PSW:
            value = value * tl.load(psw_ptr + offs, mask=ok, other=0.0).to(tl.float32)[:, None]
        acc += tl.sum(tl.where(mask, value, 0.0), axis=0)
        count += tl.sum(used.to(tl.int64), axis=0)
    if MEAN:
        acc = tl.where(count > 0, tl.div_rn(acc, tl.maximum(count, 1).to(tl.float32)), 0.0)
    tl.store(out_ptr + bag * dim + cols, acc.to(out_ptr.dtype.element_ty), mask=cols < dim)


@triton.jit
def _backward_chunk_kernel(
    grad_ptr, sorted_ptr, order_ptr, w_ptr, s_ptr,
    gw_ptr, gs_ptr, sparse_rows_ptr, contrib_ptr, head_w_ptr, tail_w_ptr, head_s_ptr, tail_s_ptr,
    w1_ptr, w2_ptr, wlast_ptr, s1_ptr, s2_ptr, slast_ptr, sched_ptr, seg_ptr, step_ptr, err_ptr,
    bag_offsets_ptr, psw_ptr, counts_ptr, grad_psw_ptr,
    n, dim, num_rows, num_threshold_rows, gk, stride_g, stride_gd,
    stride_w, stride_wd, stride_s, stride_sd, sched_len, lr, eps, weight_decay, beta2, one_minus_beta1, one_minus_beta2,
    num_bags, search_steps, padding_idx,
    ROW_SOURCE: tl.constexpr, PER_DIM: tl.constexpr, MASKED: tl.constexpr, OUT: tl.constexpr, KIND: tl.constexpr,
    CATCH_UP: tl.constexpr, BAGS: tl.constexpr, HAS_PSW: tl.constexpr, HAS_COUNTS: tl.constexpr,
    PSW_GRAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Chunk c holds sorted lookups c*BLOCK_N .. c*BLOCK_N + BLOCK_N - 1. A run of one row that
    # starts and ends in the chunk is finished here; the part of a run that crosses the chunk's
    # first (head) or last (tail) boundary is left as a partial sum for the runs kernel. Bags
    # (BAGS: 1 sum, 2 mean): lookup k's upstream gradient is its bag's, times its per-sample
    # weight or 1 / the bag's count; the rows are the raw ids (out-of-range ones and padding_idx
    # take no part).
    chunk = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK_N)
    offs = chunk * BLOCK_N + lanes
    live = offs < n
    row = tl.load(sorted_ptr + offs, mask=live, other=num_rows).to(tl.int64)
    prev = tl.load(sorted_ptr + offs - 1, mask=live & (offs > 0), other=-1).to(tl.int64)
    after = tl.load(sorted_ptr + offs + 1, mask=offs + 1 < n, other=-1).to(tl.int64)
    ok = live & (row >= 0) & (row < num_rows) & (row != padding_idx)
    starts = row != prev
    ends = row != after
    first_start = tl.min(tl.where(starts & live, lanes, BLOCK_N), axis=0)
    last_lane = tl.minimum(n - chunk * BLOCK_N, BLOCK_N) - 1
    complete = ok & ends & (lanes >= first_start)
    head = ok & ends & (lanes < first_start)
    tail = ok & ~ends & (lanes == last_lane)
    position = tl.load(order_ptr + offs, mask=live, other=0).to(tl.int64)

    cols = tl.arange(0, BLOCK_D)
    in_dim = (cols < dim)[None, :]
    mask = ok[:, None] & in_dim
    if BAGS:
        bag = _bag_of(bag_offsets_ptr, num_bags, search_steps, position)
        g = _rows_tile(grad_ptr, bag, cols, mask, stride_g, stride_gd)
        if HAS_PSW:
            g = g * tl.load(psw_ptr + position, mask=ok, other=0.0).to(tl.float32)[:, None]
        elif BAGS == 2:
            if HAS_COUNTS:
                count = tl.load(counts_ptr + bag, mask=ok, other=1)
            else:
                count = tl.load(bag_offsets_ptr + bag + 1, mask=ok, other=1) - tl.load(bag_offsets_ptr + bag, mask=ok,
                                                                                      other=0)
            g = tl.div_rn(g, tl.maximum(count, 1).to(tl.float32)[:, None])
    else:
        g = _rows_tile(grad_ptr, position, cols, mask, stride_g, stride_gd)
    w = _rows_tile(w_ptr, row, cols, mask, stride_w, stride_wd)
    u, step_ok = _next_step(step_ptr, sched_len, err_ptr, OUT == 2 and KIND == 3)
    caught_up_to = tl.minimum(u - 1, sched_len - 1)
    wm = w
    wv = w
    if CATCH_UP:
        w, wm, wv = _caught_up(w, row, cols, mask, ok, w1_ptr, w2_ptr, wlast_ptr, dim, caught_up_to, sched_ptr, sched_len,
                               seg_ptr, eps, weight_decay, beta2, one_minus_beta1, one_minus_beta2)
    if MASKED:
        passes = tl.load(s_ptr + row[:, None] * stride_s + cols[None, :] * stride_sd, mask=mask, other=0) != 0
    else:
        scols = cols if PER_DIM else cols * 0
        s = _rows_tile(s_ptr, _threshold_rows(row, position, num_threshold_rows, ROW_SOURCE), scols, mask, stride_s,
                       stride_sd)
        sm = s
        sv = s
        if CATCH_UP and ROW_SOURCE == 1:
            s, sm, sv = _caught_up(s, row, scols, mask, ok, s1_ptr, s2_ptr, slast_ptr, dim if PER_DIM else 1,
                                   caught_up_to, sched_ptr, sched_len, seg_ptr, eps, weight_decay, beta2, one_minus_beta1,
                                   one_minus_beta2)
        y = tl.sigmoid(s)
        passes = tl.abs(w) - gk * y > 0
    restarts = tl.broadcast_to(starts[:, None], (BLOCK_N, BLOCK_D)).to(tl.int32)
    if not MASKED:  # G * sign(W) where the entry passes, from the W the forward read
        g_sign = tl.where(passes, tl.where(w < 0, -g, g), 0.0)
        if PSW_GRAD:  # d out / d per_sample_weight: the bag's gradient dotted with the looked-up row
            bag_g = _rows_tile(grad_ptr, bag, cols, mask, stride_g, stride_gd)
            pruned = _soft_threshold(w, gk * y)
            tl.store(grad_psw_ptr + position, tl.sum(tl.where(mask, bag_g * pruned, 0.0), axis=1), mask=live)

    # W: the run sums of G * [passes].
    gw, _ = tl.associative_scan((tl.where(passes, g, 0.0), restarts), 0, _segmented_sum)
    tl.store(head_w_ptr + chunk * dim + cols[None, :] + lanes[:, None] * 0, gw, mask=head[:, None] & in_dim)
    tl.store(tail_w_ptr + chunk * dim + cols[None, :] + lanes[:, None] * 0, gw, mask=tail[:, None] & in_dim)
    done = complete[:, None] & in_dim
    if OUT == 0:
        tl.store(gw_ptr + row[:, None] * dim + cols[None, :], gw, mask=done)
    elif OUT == 1:
        tl.store(gw_ptr + offs[:, None] * dim + cols[None, :], tl.where(done, gw, 0.0), mask=live[:, None] & in_dim)
        tl.store(sparse_rows_ptr + offs, tl.where(ok, row, 0), mask=live)
    else:
        step_done = done & step_ok[:, None]
        w = _apply_rule(w, wm, wv, gw, step_done, row, complete & step_ok, cols, dim, w1_ptr, w2_ptr, wlast_ptr,
                        sched_ptr, sched_len, u, lr, eps, weight_decay, beta2, one_minus_beta1, one_minus_beta2, KIND)
        tl.store(w_ptr + row[:, None] * dim + cols[None, :], w, mask=step_done)

    if not MASKED:
        if ROW_SOURCE == 1:  # per-row thresholds: the run sums of G * sign(W), per dim or per row
            s_cols = dim if PER_DIM else 1
            in_s = (cols < s_cols)[None, :]
            if PER_DIM:
                acc = g_sign
            else:
                acc = tl.broadcast_to(tl.sum(g_sign, axis=1)[:, None], (BLOCK_N, BLOCK_D))
            acc, _ = tl.associative_scan((acc, restarts), 0, _segmented_sum)
            tl.store(head_s_ptr + chunk * s_cols + cols[None, :] + lanes[:, None] * 0, acc, mask=head[:, None] & in_s)
            tl.store(tail_s_ptr + chunk * s_cols + cols[None, :] + lanes[:, None] * 0, acc, mask=tail[:, None] & in_s)
            ds = -(acc * gk) * (1.0 - y) * y
            done_s = complete[:, None] & in_s
            if OUT == 0:
                tl.store(gs_ptr + row[:, None] * s_cols + cols[None, :], ds, mask=done_s)
            elif OUT == 1:
                tl.store(gs_ptr + offs[:, None] * s_cols + cols[None, :], tl.where(done_s, ds, 0.0),
                         mask=live[:, None] & in_s)
            else:
                step_done_s = done_s & step_ok[:, None]
                s = _apply_rule(s, sm, sv, ds, step_done_s, row, complete & step_ok, cols, s_cols, s1_ptr, s2_ptr,
                                slast_ptr, sched_ptr, sched_len, u, lr, eps, weight_decay, beta2, one_minus_beta1,
                                one_minus_beta2, KIND)
                tl.store(s_ptr + row[:, None] * s_cols + cols[None, :], s, mask=step_done_s)
        else:  # shared thresholds: one term of their gradient per lookup, in the lookups' order
            term = -(g_sign * gk) * (1.0 - y) * y
            if PER_DIM:
                tl.store(contrib_ptr + position[:, None] * dim + cols[None, :], term, mask=live[:, None] & in_dim)
            else:
                tl.store(contrib_ptr + position, tl.sum(tl.where(in_dim, term, 0.0), axis=1), mask=live)


@triton.jit
def _backward_runs_kernel(
    sorted_ptr, w_ptr, s_ptr,
    gw_ptr, gs_ptr, head_w_ptr, tail_w_ptr, head_s_ptr, tail_s_ptr,
    w1_ptr, w2_ptr, wlast_ptr, s1_ptr, s2_ptr, slast_ptr, sched_ptr, seg_ptr, step_ptr, err_ptr, counter_ptr,
    n, num_chunks, dim, num_rows, gk,
    stride_w, stride_wd, stride_s, stride_sd, sched_len, lr, eps, weight_decay, beta2, one_minus_beta1, one_minus_beta2,
    padding_idx, ROW_SOURCE: tl.constexpr, PER_DIM: tl.constexpr, OUT: tl.constexpr, KIND: tl.constexpr, CATCH_UP: tl.constexpr,
    FINISH_STEP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Program c finishes the run that starts in chunk c and continues past it, if there is one:
    # its tail partial, then the partials of the chunks it runs through, then the head partial of
    # the chunk where it ends.
    chunk = tl.program_id(0).to(tl.int64)
    if chunk < num_chunks:
        last = tl.minimum(chunk * BLOCK_N + BLOCK_N, n) - 1
        row = tl.load(sorted_ptr + last).to(tl.int64)
        after = tl.load(sorted_ptr + last + 1, mask=last + 1 < n, other=-1).to(tl.int64)
        before = tl.load(sorted_ptr + chunk * BLOCK_N - 1, mask=chunk > 0, other=-1).to(tl.int64)
        if (row == after) & (row >= 0) & (row < num_rows) & (row != padding_idx) & (row != before):
            cols = tl.arange(0, BLOCK_D)
            in_dim = (cols < dim)[None, :]
            s_cols = dim if PER_DIM else 1
            in_s = (cols < s_cols)[None, :]
            acc_w = tl.load(tail_w_ptr + chunk * dim + cols[None, :], mask=in_dim, other=0.0)
            acc_s = tl.load(tail_s_ptr + chunk * s_cols + cols[None, :], mask=in_s, other=0.0) if ROW_SOURCE == 1 \
                else acc_w
            through = row == row
            c = chunk + 1
            while through:
                end = tl.minimum(c * BLOCK_N + BLOCK_N, n) - 1
                end_row = tl.load(sorted_ptr + end).to(tl.int64)
                beyond = tl.load(sorted_ptr + end + 1, mask=end + 1 < n, other=-1).to(tl.int64)
                through = (end_row == row) & (beyond == row)
                acc_w += tl.where(through, tl.load(tail_w_ptr + c * dim + cols[None, :], mask=in_dim, other=0.0),
                                  tl.load(head_w_ptr + c * dim + cols[None, :], mask=in_dim, other=0.0))
                if ROW_SOURCE == 1:
                    acc_s += tl.where(through, tl.load(tail_s_ptr + c * s_cols + cols[None, :], mask=in_s, other=0.0),
                                      tl.load(head_s_ptr + c * s_cols + cols[None, :], mask=in_s, other=0.0))
                c += 1
            rows = tl.zeros((1,), tl.int64) + row
            yes = tl.zeros((1,), tl.int1) == 0
            mask = yes[:, None] & in_dim
            if OUT == 0:
                tl.store(gw_ptr + rows[:, None] * dim + cols[None, :], acc_w, mask=mask)
            elif OUT == 1:
                tl.store(gw_ptr + last * dim + cols[None, :], acc_w, mask=mask)
            u, step_ok = _next_step(step_ptr, sched_len, err_ptr, OUT == 2 and KIND == 3)
            caught_up_to = tl.minimum(u - 1, sched_len - 1)
            w = _rows_tile(w_ptr, rows, cols, mask, stride_w, stride_wd)
            wm = w
            wv = w
            if CATCH_UP:
                w, wm, wv = _caught_up(w, rows, cols, mask, yes, w1_ptr, w2_ptr, wlast_ptr, dim, caught_up_to, sched_ptr,
                                       sched_len, seg_ptr, eps, weight_decay, beta2, one_minus_beta1, one_minus_beta2)
            if OUT == 2:
                step_mask = mask & step_ok[:, None]
                w = _apply_rule(w, wm, wv, acc_w, step_mask, rows, yes & step_ok, cols, dim, w1_ptr, w2_ptr,
                                wlast_ptr, sched_ptr, sched_len, u, lr, eps, weight_decay, beta2, one_minus_beta1,
                                one_minus_beta2, KIND)
                tl.store(w_ptr + rows[:, None] * dim + cols[None, :], w, mask=step_mask)
            if ROW_SOURCE == 1:
                scols = cols if PER_DIM else cols * 0
                s = _rows_tile(s_ptr, rows, scols, mask, stride_s, stride_sd)
                sm = s
                sv = s
                if CATCH_UP:
                    s, sm, sv = _caught_up(s, rows, scols, mask, yes, s1_ptr, s2_ptr, slast_ptr, s_cols, caught_up_to,
                                           sched_ptr, sched_len, seg_ptr, eps, weight_decay, beta2, one_minus_beta1,
                                           one_minus_beta2)
                y = tl.sigmoid(s)
                ds = -(acc_s * gk) * (1.0 - y) * y
                mask_s = yes[:, None] & in_s
                if OUT == 0:
                    tl.store(gs_ptr + rows[:, None] * s_cols + cols[None, :], ds, mask=mask_s)
                elif OUT == 1:
                    tl.store(gs_ptr + last * s_cols + cols[None, :], ds, mask=mask_s)
                else:
                    step_mask_s = mask_s & step_ok[:, None]
                    s = _apply_rule(s, sm, sv, ds, step_mask_s, rows, yes & step_ok, cols, s_cols, s1_ptr, s2_ptr,
                                    slast_ptr, sched_ptr, sched_len, u, lr, eps, weight_decay, beta2, one_minus_beta1,
                                    one_minus_beta2, KIND)
                    tl.store(s_ptr + rows[:, None] * s_cols + cols[None, :], s, mask=step_mask_s)
    if FINISH_STEP:
        _finish_step(counter_ptr, step_ptr)


@triton.jit
def _faithful_adam_kernel(
    grads_ptr, p_ptr, m_ptr, v_ptr, sched_ptr, step_ptr, err_ptr, counter_ptr,
    num_rows, cols, sched_len, eps, weight_decay, beta2, one_minus_beta1, one_minus_beta2,
    FINISH_STEP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # `faithful` Adam: every row takes the step, with its row gradient (zero where it was not
    # looked up): the published recipe's dense update.
    offs_r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    u, step_ok = _next_step(step_ptr, sched_len, err_ptr, True)
    mask_r = (offs_r < num_rows) & step_ok
    at = tl.minimum(u, sched_len - 1)
    neg_step_size = -tl.load(sched_ptr + at)
    bc2_sqrt = tl.load(sched_ptr + sched_len + at)
    for d0 in range(0, cols, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = mask_r[:, None] & (offs_d < cols)[None, :]
        off = offs_r[:, None] * cols + offs_d[None, :]
        g = tl.load(grads_ptr + off, mask=mask, other=0.0)
        _adam_tile_in_place(p_ptr, m_ptr, v_ptr, off, mask, g, neg_step_size, bc2_sqrt, eps, weight_decay, beta2,
                            one_minus_beta1, one_minus_beta2)
    if FINISH_STEP:
        _finish_step(counter_ptr, step_ptr)


# --- launchers: the CUDA kernels of the ops ------------------------------------------------------------

# Lookups per program (a power of 2): at most this many, and about 4K elements a tile. Also the
# backward's chunk of sorted lookups; the tests make it small so that runs cross chunks.
MAX_TILE_ROWS = 256


def _tile(dim):
    """(BLOCK_N, BLOCK_D): a tile of lookups that holds whole rows."""
    block_d = max(16, triton.next_power_of_2(dim))
    return max(1, min(MAX_TILE_ROWS, 4096 // block_d)), block_d


def rows_dtype(num_rows):
    """The dtype of the rows a forward returns: int32 when every row id and the past-the-end
    marker of a bad id fit (int32 keys sort faster), else int64."""
    return torch.int32 if num_rows < 2**31 - 1 else torch.int64


@functools.lru_cache(maxsize=None)
def _step_scratch(device):
    """(a 0-d int64 zero, the done-counter of `_finish_step`) of a device, made once: the kernels
    take pointers even where a launch does not use them."""
    return torch.zeros((), dtype=torch.int64, device=device), torch.zeros(1, dtype=torch.int32, device=device)


def _check_triton(weight):
    if weight.dtype == torch.float64:
        raise TypeError("the Triton kernels take float32, float16 or bfloat16 weights, got torch.float64")
    if weight.device.type == "cpu" and not isinstance(_forward_kernel, InterpretedFunction):
        raise ValueError(
            "the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set before importing "
            "pep_kernels, to run them slowly on the CPU for testing)"
        )


def _threshold_2d(threshold):
    """The threshold as (rows, 1 or d), whatever its mode's shape; no copy."""
    return threshold.reshape(1, -1) if threshold.dim() == 1 else threshold


class _Training:
    """What the kernels of a fused step take of a table's optimizer: the state of W and of a
    per-row threshold ([param, state1, state2, last_step], the ops' convention), Adam's
    schedule and segment table, the device step counter, and the rule's scalars."""

    def __init__(self, weight_state, threshold_state, schedule, step, kind, hparams):
        if kind not in (*KIND_CODES, "adam_dense"):
            raise ValueError(f"unknown row optimizer '{kind}'; expected sgd, adagrad, rowwise_adagrad, adam or adam_dense")
        self.kind, self.step = kind, step
        self.weight_state, self.threshold_state = list(weight_state), list(threshold_state)
        # Rules without a schedule get W in its place: the kernels take a pointer, and read none.
        self.schedule = schedule if kind in ("adam", "adam_dense") else self.weight_state[0]
        self.segments = _segments(hparams, step.device) if kind == "adam" else self.schedule
        self.scalars = [_fp32(hparams[0]), *_scalars(hparams)]  # lr, eps, weight_decay, beta2, 1 - beta1, 1 - beta2
        for state in (self.weight_state, self.threshold_state):
            if len(state) == 4 and (state[0].dtype != torch.float32 or not state[0].is_contiguous()):
                raise TypeError(f"the Triton row optimizers take contiguous float32 parameters, got {state[0].dtype}")

    def states(self):
        """The state pointers the kernels take: W's three, then the threshold's (W's again where
        the threshold has none)."""
        w = self.weight_state[1:]
        s = self.threshold_state[1:] if len(self.threshold_state) == 4 else w
        return [t if t.numel() else self.weight_state[0] for t in (*w, *s)]


def _forward(ids, weight, threshold, mode, gk, field_offsets, id_errors, training=None, masked=False):
    """(out, rows) of one forward kernel; `training` catches `fast` Adam rows up on the fly."""
    _check_triton(weight)
    row_source, per_dim = (PER_ROW, True) if masked else mode_layout(mode)
    ids = ids.reshape(-1).contiguous()
    n, (num_rows, dim) = ids.numel(), weight.shape
    s2 = _threshold_2d(threshold)
    out = torch.empty((n, dim), dtype=weight.dtype, device=weight.device)
    rows = torch.empty(n, dtype=rows_dtype(num_rows), device=weight.device)
    if n:
        zero_step, _ = _step_scratch(weight.device)
        catch_up = training is not None and training.kind == "adam"
        states = training.states() if catch_up else [weight] * 6
        schedule = training.schedule if catch_up else weight
        scalars = training.scalars[1:] if catch_up else [0.0] * 5
        block_n, block_d = _tile(dim)
        _forward_kernel[(triton.cdiv(n, block_n),)](
            ids, ids if field_offsets is None else field_offsets, weight, s2, out, rows,
            ids if id_errors is None else id_errors,
            *states, schedule, training.segments if catch_up else weight,
            training.step if catch_up else zero_step,
            n, dim, 1 if field_offsets is None else field_offsets.numel() - 1, num_rows, s2.shape[0], gk,
            weight.stride(0), weight.stride(1), s2.stride(0), s2.stride(1), schedule.shape[-1], *scalars,
            ROW_SOURCE=row_source, PER_DIM=per_dim, HAS_FIELDS=field_offsets is not None,
            RECORD=id_errors is not None, MASKED=masked, CATCH_UP=catch_up, BLOCK_N=block_n, BLOCK_D=block_d,
        )
    return out, rows


class _Bags:
    """What the backward kernels take of a bag lookup: the B + 1 offsets, the per-sample weights,
    sum or mean, padding_idx (-1: none), each bag's count of lookups where padding leaves some out
    of a mean, and where the per-sample weights' gradient goes."""

    def __init__(self, ids, bag_offsets, per_sample_weights, pooling, padding_idx, weights_grad=False):
        self.offsets, self.weights, self.padding_idx = bag_offsets.contiguous(), per_sample_weights, padding_idx
        self.mean = pooling == "mean"
        self.num_bags = bag_offsets.numel() - 1
        self.counts = None
        if self.mean and padding_idx >= 0:  # the offsets clamped: bad ones are the forward's to report
            used = torch.nn.functional.pad(torch.cumsum(ids != padding_idx, 0), (1, 0))
            ends = self.offsets.clamp(0, ids.numel())
            self.counts = used[ends[1:]] - used[ends[:-1]]
        # written for every lookup by the chunk kernel
        self.weights_grad = per_sample_weights.new_empty(ids.numel(), dtype=torch.float32) if weights_grad else None


def _backward(grad_out, rows, weight, threshold, mode, gk, out_kind, training=None, id_errors=None, masked=False,
              bags=None):
    """Sorts the rows and runs the chunk and runs kernels. Returns (gw, gs, sparse_rows, contrib):
    dense (N, .) or per-sorted-lookup (n, .) fp32 gradients, or nothing where the step was
    applied; the shared thresholds' per-lookup terms. `bags`: a `_Bags` (the rows are then the
    raw ids, the upstream gradient one row per bag)."""
    row_source, per_dim = (PER_ROW, True) if masked else mode_layout(mode)
    (num_rows, dim), n = weight.shape, rows.numel()
    if bags is not None and bags.num_bags == 0:
        n = 0  # no bag holds a lookup (offsets that say otherwise are the forward's to report)
    s2 = _threshold_2d(threshold)
    s_cols = dim if per_dim else 1
    device = weight.device
    per_row = row_source == PER_ROW and not masked
    f32 = dict(dtype=torch.float32, device=device)
    gw = gs = sparse_rows = contrib = None
    if out_kind == _DENSE:
        gw = torch.zeros((num_rows, dim), **f32)
        gs = torch.zeros((num_rows, s_cols), **f32) if per_row else None
    elif out_kind == _SPARSE:
        gw = torch.empty((n, dim), **f32)
        gs = torch.empty((n, s_cols), **f32) if per_row else None
        sparse_rows = torch.empty(n, dtype=torch.int64, device=device)
    if not per_row and not masked:
        contrib = torch.empty((n, s_cols), **f32)
    block_n, block_d = _tile(dim)
    num_chunks = triton.cdiv(n, block_n)
    zero_step, counter = _step_scratch(device)
    fused = out_kind == _FUSED
    catch_up = fused and training.kind == "adam"
    finish = training is not None and training.kind != "adam_dense"
    if n or finish:
        sorted_rows, order = torch.sort(rows, stable=True)
        partials = torch.empty((4, max(num_chunks, 1), dim), **f32)
        states = training.states() if fused else [weight] * 6
        schedule = training.schedule if training is not None else weight
        scalars = training.scalars if training is not None else [0.0] * 6
        step = training.step if training is not None else zero_step
        segments = training.segments if catch_up else weight
        errors = rows if id_errors is None else id_errors
        pointers = [weight if t is None else t for t in (gw, gs)]
        kind_code = KIND_CODES.get(training.kind, 0) if fused else 0
        common = dict(ROW_SOURCE=row_source, PER_DIM=per_dim, OUT=out_kind, KIND=kind_code, CATCH_UP=catch_up,
                      BLOCK_N=block_n, BLOCK_D=block_d)
        if n:
            bag_tensors = [rows] * 4 if bags is None else [
                t if t is not None else rows for t in (bags.offsets, bags.weights, bags.counts, bags.weights_grad)]
            _backward_chunk_kernel[(num_chunks,)](
                grad_out, sorted_rows, order, weight, s2, *pointers,
                sorted_rows if sparse_rows is None else sparse_rows, weight if contrib is None else contrib,
                partials[0], partials[1], partials[2], partials[3], *states, schedule, segments, step, errors,
                *bag_tensors, n, dim, num_rows, s2.shape[0], gk, grad_out.stride(0), grad_out.stride(1),
                weight.stride(0), weight.stride(1), s2.stride(0), s2.stride(1), schedule.shape[-1], *scalars,
                0 if bags is None else bags.num_bags, 0 if bags is None else bags.num_bags.bit_length(),
                -1 if bags is None else bags.padding_idx, MASKED=masked,
                BAGS=0 if bags is None else 1 + bags.mean, HAS_PSW=bags is not None and bags.weights is not None,
                HAS_COUNTS=bags is not None and bags.counts is not None,
                PSW_GRAD=bags is not None and bags.weights_grad is not None, **common,
            )
        if n or (fused and finish):
            _backward_runs_kernel[(max(num_chunks, 1),)](
                sorted_rows, weight, s2, *pointers, partials[0], partials[1], partials[2], partials[3], *states,
                schedule, segments, step, errors, counter, n, num_chunks, dim, num_rows, gk, weight.stride(0),
                weight.stride(1), s2.stride(0), s2.stride(1), schedule.shape[-1], *scalars,
                -1 if bags is None else bags.padding_idx, FINISH_STEP=fused and finish, **common,
            )
    return gw, gs, sparse_rows, contrib


def _shared_gradient(contrib, threshold):
    """A shared threshold's gradient: its per-lookup terms summed over the lookups (of each field)."""
    s2 = _threshold_2d(threshold)
    return contrib.view(-1, s2.shape[0], contrib.shape[1]).sum(0).view(threshold.shape).to(threshold.dtype)


def triton_forward(ids, weight, threshold, threshold_mode, gk, field_offsets=None, id_errors=None):
    """CUDA kernel of pep_kernels::soft_threshold_forward."""
    return _forward(ids, weight, threshold, threshold_mode, gk, field_offsets, id_errors)


def triton_backward(grad_out, rows, weight, threshold, threshold_mode, gk, sparse):
    """CUDA kernel of pep_kernels::soft_threshold_backward: dense gradients, or with `sparse` one
    entry per lookup in sorted order (the row's gradient at the last lookup of each row, zeros at
    the others: uncoalesced, as nn.Embedding(sparse=True) makes them; knowing the number of
    distinct rows would take a host sync)."""
    _check_triton(weight)
    grad_out = grad_out.reshape(-1, weight.shape[1])
    gw, gs, sparse_rows, contrib = _backward(grad_out, rows, weight, threshold, threshold_mode, gk,
                                             _SPARSE if sparse else _DENSE)
    if contrib is not None:
        gs = _shared_gradient(contrib, threshold)
    elif not sparse:
        gs = gs.view(threshold.shape)
    sparse_rows = sparse_rows if sparse else rows.new_empty(0, dtype=torch.int64)
    return gw.to(weight.dtype), gs.to(threshold.dtype), sparse_rows


def triton_train_forward(ids, weight_state, threshold_state, schedule, step, threshold_mode, gk, field_offsets, kind,
                         hparams, id_errors=None):
    """CUDA kernel of pep_kernels::soft_threshold_train_forward: a `fast` Adam table's rows are
    read caught up to `step` in registers (the state is not written: the backward step catches
    them up again before it updates them)."""
    training = _Training(weight_state, threshold_state, schedule, step, kind, hparams)
    return _forward(ids, weight_state[0], threshold_state[0], threshold_mode, gk, field_offsets, id_errors, training)


def triton_backward_step(grad_out, rows, weight_state, threshold_state, schedule, step, threshold_mode, gk, kind,
                         hparams, id_errors=None):
    """CUDA kernel of pep_kernels::soft_threshold_backward_step."""
    return _step(grad_out.reshape(-1, weight_state[0].shape[1]), rows, weight_state, threshold_state, schedule, step, threshold_mode, gk, kind, hparams,
                 id_errors)


def _step(grad_out, rows, weight_state, threshold_state, schedule, step, mode, gk, kind, hparams, id_errors,
          bags=None):
    """The backward with the optimizer step fused in: the chunk and runs kernels apply it (`faithful`
    Adam: they make the dense gradients, then every row steps); returns a shared threshold's gradient."""
    weight, threshold = weight_state[0], threshold_state[0]
    _check_triton(weight)
    training = _Training(weight_state, threshold_state, schedule, step, kind, hparams)
    dense = kind == "adam_dense"
    gw, gs, _, contrib = _backward(grad_out, rows, weight, threshold, mode, gk, _DENSE if dense else _FUSED,
                                   training, id_errors, bags=bags)
    if dense:  # `faithful` Adam: every row steps, W then a per-row threshold (which ends the step)
        _, counter = _step_scratch(weight.device)
        params = [(weight_state, gw)] + ([(threshold_state, gs)] if gs is not None else [])
        for k, (state, grads) in enumerate(params):
            param = state[0]
            block_r, block_d = _tile(param.shape[1])
            _faithful_adam_kernel[(triton.cdiv(param.shape[0], block_r),)](
                grads, param, state[1], state[2], training.schedule, step,
                step if id_errors is None else id_errors, counter, param.shape[0], param.shape[1],
                training.schedule.shape[1], *training.scalars[1:], FINISH_STEP=k == len(params) - 1,
                BLOCK_R=block_r, BLOCK_D=min(block_d, 128),
            )
    if contrib is not None:
        return _shared_gradient(contrib, threshold)
    return threshold.new_empty(0)


def triton_masked_forward(ids, weight, keep, field_offsets=None, id_errors=None):
    """CUDA kernel of pep_kernels::masked_embedding_forward."""
    return _forward(ids, weight, keep, "feature_dim", 0.0, field_offsets, id_errors, masked=True)


def triton_masked_backward(grad_out, rows, keep):
    """CUDA kernel of pep_kernels::masked_embedding_backward: the dense gradient of W."""
    grad_out = grad_out.reshape(-1, keep.shape[1])
    # keep stands in for W: a masked backward reads no weight, only the table's shape
    gw, _, _, _ = _backward(grad_out, rows, keep, keep, "feature_dim", 0.0, _DENSE, masked=True)
    return gw.to(grad_out.dtype)


def _bag_forward(ids, bag_offsets, per_sample_weights, weight, threshold, mode, gk, pooling, padding_idx, id_errors,
                 training=None):
    """(B, d): one program per bag (`_bag_forward_kernel`)."""
    _check_triton(weight)
    row_source, per_dim = mode_layout(mode)
    if row_source == PER_FIELD:
        raise ValueError(f"threshold mode {mode!r} does not apply to a bag (a bag has no field axis)")
    ids = ids.reshape(-1).contiguous()
    bag_offsets = bag_offsets.contiguous()
    num_bags, (num_rows, dim) = bag_offsets.numel() - 1, weight.shape
    s2 = _threshold_2d(threshold)
    out = torch.empty((num_bags, dim), dtype=weight.dtype, device=weight.device)
    if num_bags > 0:
        zero_step, _ = _step_scratch(weight.device)
        catch_up = training is not None and training.kind == "adam"
        states = training.states() if catch_up else [weight] * 6
        schedule = training.schedule if catch_up else weight
        block_l, block_d = _tile(dim)
        _bag_forward_kernel[(num_bags,)](
            ids, bag_offsets, ids if per_sample_weights is None else per_sample_weights, weight, s2, out,
            ids if id_errors is None else id_errors, *states, schedule, training.segments if catch_up else weight,
            training.step if catch_up else zero_step, ids.numel(), num_bags, dim, num_rows, padding_idx, gk,
            weight.stride(0), weight.stride(1), s2.stride(0), s2.stride(1), schedule.shape[-1],
            *(training.scalars[1:] if catch_up else [0.0] * 5), ROW_SOURCE=row_source, PER_DIM=per_dim,
            MEAN=pooling == "mean", HAS_PSW=per_sample_weights is not None, RECORD=id_errors is not None,
            CATCH_UP=catch_up, BLOCK_L=min(block_l, 64), BLOCK_D=block_d,
        )
    return out


def triton_bag_forward(ids, bag_offsets, per_sample_weights, weight, threshold, threshold_mode, gk, pooling,
                       padding_idx, id_errors=None):
    """CUDA kernel of pep_kernels::soft_threshold_bag_forward."""
    return _bag_forward(ids, bag_offsets, per_sample_weights, weight, threshold, threshold_mode, gk, pooling,
                        padding_idx, id_errors)


def triton_bag_train_forward(ids, bag_offsets, per_sample_weights, weight_state, threshold_state, schedule, step,
                             threshold_mode, gk, pooling, padding_idx, kind, hparams, id_errors=None):
    """CUDA kernel of pep_kernels::soft_threshold_bag_train_forward (rows caught up in registers,
    as triton_train_forward)."""
    training = _Training(weight_state, threshold_state, schedule, step, kind, hparams)
    return _bag_forward(ids, bag_offsets, per_sample_weights, weight_state[0], threshold_state[0], threshold_mode,
                        gk, pooling, padding_idx, id_errors, training)


def triton_bag_backward(grad_out, ids, bag_offsets, per_sample_weights, weight, threshold, threshold_mode, gk,
                        pooling, padding_idx, sparse):
    """CUDA kernel of pep_kernels::soft_threshold_bag_backward: the lookup's backward with one
    upstream gradient row per bag; sparse gradients one entry per lookup, as triton_backward's."""
    _check_triton(weight)
    ids = ids.reshape(-1).contiguous()
    bags = _Bags(ids, bag_offsets, per_sample_weights, pooling, padding_idx,
                 weights_grad=per_sample_weights is not None)
    gw, gs, sparse_rows, contrib = _backward(grad_out, ids, weight, threshold, threshold_mode, gk,
                                             _SPARSE if sparse else _DENSE, bags=bags)
    if contrib is not None:
        gs = _shared_gradient(contrib, threshold)
    elif not sparse:
        gs = gs.view(threshold.shape)
    sparse_rows = sparse_rows if sparse else ids.new_empty(0, dtype=torch.int64)
    weights_grad = weight.new_empty(0) if bags.weights_grad is None else bags.weights_grad.to(per_sample_weights.dtype)
    return gw.to(weight.dtype), gs.to(threshold.dtype), sparse_rows, weights_grad


def triton_bag_backward_step(grad_out, ids, bag_offsets, per_sample_weights, weight_state, threshold_state, schedule,
                             step, threshold_mode, gk, pooling, padding_idx, kind, hparams, id_errors=None):
    """CUDA kernel of pep_kernels::soft_threshold_bag_backward_step."""
    ids = ids.reshape(-1).contiguous()
    bags = _Bags(ids, bag_offsets, per_sample_weights, pooling, padding_idx)
    return _step(grad_out, ids, weight_state, threshold_state, schedule, step, threshold_mode, gk, kind, hparams,
                 id_errors, bags)


def triton_count_nonzero(weight, threshold, threshold_mode, gk, field_offsets):
    """CUDA kernel of pep_kernels::soft_threshold_count_nonzero: the table thresholded by the
    forward kernel in blocks (what its lookups return), counted."""
    row_source, per_dim = mode_layout(threshold_mode)
    num_rows, dim = weight.shape
    step = max(1, (1 << 22) // dim)
    total = torch.zeros((), dtype=torch.int64, device=weight.device)
    for start in range(0, num_rows, step):
        end = min(start + step, num_rows)
        total += torch.count_nonzero(_forward(torch.arange(start, end, device=weight.device), weight,
                                              expand_threshold(threshold, row_source, start, end, field_offsets),
                                              "feature_dim" if per_dim else "feature", gk, None, None)[0])
    return total


def expand_threshold(threshold, row_source, start, end, field_offsets):
    """The threshold rows of table rows start..end-1, (end - start, 1 or d): a slice (per-row), a
    gather (per-field) or an expanded view (shared)."""
    if row_source == PER_ROW:
        return threshold[start:end]
    if row_source == PER_FIELD:
        rows = torch.arange(start, end, device=threshold.device)
        return threshold[torch.searchsorted(field_offsets[1:].to(threshold.device), rows, right=True)]
    return _threshold_2d(threshold).expand(end - start, -1)


TRITON_OPS = {
    "soft_threshold_bag_forward": triton_bag_forward,
    "soft_threshold_bag_train_forward": triton_bag_train_forward,
    "soft_threshold_bag_backward": triton_bag_backward,
    "soft_threshold_bag_backward_step": triton_bag_backward_step,
    "row_optimizer_step": optim_triton.row_optimizer_step,
    "row_optimizer_catch_up": optim_triton.row_optimizer_catch_up,
    "soft_threshold_forward": triton_forward,
    "soft_threshold_backward": triton_backward,
    "soft_threshold_train_forward": triton_train_forward,
    "soft_threshold_backward_step": triton_backward_step,
    "soft_threshold_count_nonzero": triton_count_nonzero,
    "masked_embedding_forward": triton_masked_forward,
    "masked_embedding_backward": triton_masked_backward,
}


class _TritonKernels:
    """The Triton launchers under the ops' names, called directly: what `backend="triton"` runs,
    also on CPU tensors in Triton's interpreter (the dispatcher would pick the C++ kernels there)."""

    def __getattr__(self, name):
        return TRITON_OPS[name]


TRITON_KERNELS = _TritonKernels()


def kernels(backend):
    """The lookup ops for a backend: the dispatcher's (C++ on CPU, Triton on CUDA), or with
    "triton" the Triton launchers themselves."""
    if backend == "triton":
        return TRITON_KERNELS
    if not HAS_CPU_KERNELS:
        raise RuntimeError(
            "the pep_kernels C++ extension is not built: install the package with "
            "`pip install --no-build-isolation -e .` (or pick backend='reference')"
        )
    return torch.ops.pep_kernels


if HAS_CPU_KERNELS:
    for _name, _kernel in TRITON_OPS.items():
        torch.library.register_kernel(f"pep_kernels::{_name}", "cuda", _kernel)

    @torch.library.register_fake("pep_kernels::soft_threshold_forward")
    def _(ids, weight, threshold, threshold_mode, gk, field_offsets, id_errors):
        return weight.new_empty((ids.numel(), weight.shape[1])), ids.new_empty(ids.numel(), dtype=rows_dtype(weight.shape[0]))

    @torch.library.register_fake("pep_kernels::soft_threshold_train_forward")
    def _(ids, weight_state, threshold_state, schedule, step, threshold_mode, gk, field_offsets, kind, hparams, id_errors):
        weight = weight_state[0]
        return weight.new_empty((ids.numel(), weight.shape[1])), ids.new_empty(ids.numel(), dtype=rows_dtype(weight.shape[0]))

    @torch.library.register_fake("pep_kernels::soft_threshold_backward")
    def _(grad_out, rows, weight, threshold, threshold_mode, gk, sparse):
        per_row = mode_layout(threshold_mode)[0] == PER_ROW
        if not sparse:
            return weight.new_empty(weight.shape), threshold.new_empty(threshold.shape), rows.new_empty(0, dtype=torch.int64)
        # CPU: the distinct rows (coalesced); CUDA: one entry per lookup (no host sync)
        num = torch.library.get_ctx().new_dynamic_size() if rows.device.type == "cpu" else rows.numel()
        grad_s = threshold.new_empty((num, threshold.shape[1])) if per_row else threshold.new_empty(threshold.shape)
        return weight.new_empty((num, weight.shape[1])), grad_s, rows.new_empty(num, dtype=torch.int64)

    @torch.library.register_fake("pep_kernels::soft_threshold_backward_step")
    def _(grad_out, rows, weight_state, threshold_state, schedule, step, threshold_mode, gk, kind, hparams, id_errors):
        threshold = threshold_state[0]
        return threshold.new_empty(0) if mode_layout(threshold_mode)[0] == PER_ROW else threshold.new_empty(threshold.shape)

    @torch.library.register_fake("pep_kernels::soft_threshold_count_nonzero")
    def _(weight, threshold, threshold_mode, gk, field_offsets):
        return weight.new_empty((), dtype=torch.int64)

    @torch.library.register_fake("pep_kernels::masked_embedding_forward")
    def _(ids, weight, keep, field_offsets, id_errors):
        return weight.new_empty((ids.numel(), weight.shape[1])), ids.new_empty(ids.numel(), dtype=rows_dtype(weight.shape[0]))

    @torch.library.register_fake("pep_kernels::masked_embedding_backward")
    def _(grad_out, rows, keep):
        return grad_out.new_empty(keep.shape)


def _sparse_grad(values, rows, num_rows, backend):
    """The row-sparse gradient the backward op returned: coalesced from the C++ kernel, one entry
    per lookup from the Triton kernel."""
    coalesced = backend != "triton" and values.device.type == "cpu"
    return torch.sparse_coo_tensor(rows.unsqueeze(0), values, (num_rows,) + tuple(values.shape[1:]),
                                   is_coalesced=coalesced, check_invariants=False)


class SoftThresholdEmbeddingFunction(torch.autograd.Function):
    """Lookup + soft threshold with the backward of PEP_SPEC section 2."""

    @staticmethod
    def forward(ctx, indices, weight, threshold, mode, gk, sparse, field_offsets, id_errors, backend):
        out, rows = kernels(backend).soft_threshold_forward(indices.reshape(-1), weight, threshold, mode, gk,
                                                             field_offsets, id_errors)
        ctx.save_for_backward(rows, weight, threshold)
        ctx.config = (mode, gk, sparse, backend)
        return out.view(indices.shape + (weight.shape[1],))

    @staticmethod
    def backward(ctx, grad_out):
        rows, weight, threshold = ctx.saved_tensors
        mode, gk, sparse, backend = ctx.config
        grad_w, grad_s, grad_rows = kernels(backend).soft_threshold_backward(
            grad_out.reshape(-1, weight.shape[1]), rows, weight, threshold, mode, gk, sparse)
        if sparse:
            grad_w = _sparse_grad(grad_w, grad_rows, weight.shape[0], backend)
            if mode_layout(mode)[0] == PER_ROW:
                grad_s = _sparse_grad(grad_s, grad_rows, threshold.shape[0], backend)
        return None, grad_w, grad_s, None, None, None, None, None, None


class MaskedEmbeddingFunction(torch.autograd.Function):
    """Lookup of a table under a fixed mask (the retrain): W[r] * keep[r], gradient G * keep[r]."""

    @staticmethod
    def forward(ctx, indices, weight, keep, field_offsets, id_errors, backend):
        out, rows = kernels(backend).masked_embedding_forward(indices.reshape(-1), weight, keep, field_offsets,
                                                               id_errors)
        ctx.save_for_backward(rows, keep)
        ctx.backend = backend
        return out.view(indices.shape + (weight.shape[1],))

    @staticmethod
    def backward(ctx, grad_out):
        rows, keep = ctx.saved_tensors
        grad_w = kernels(ctx.backend).masked_embedding_backward(grad_out.reshape(-1, keep.shape[1]), rows, keep)
        return None, grad_w, None, None, None, None
