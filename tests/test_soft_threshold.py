"""Kernel backends against the eager reference: values and both gradients."""

import pytest
import torch

from utils import (FIELD_MODES, GRAD_TOL, KERNEL_BACKENDS, MODES, ODD_DIMS, PER_ROW_MODES, backend_device, dense,
    leaves, make_lookup, out_tol)
from pep_kernels import reference, soft_threshold_embedding
from pep_kernels.ops import soft_threshold as soft_threshold_ops


def run(backend, ids, weight, threshold, mode, gk=1.0, sparse=False, grad_seed=1):
    """Output and the gradients (as the op returns them) for a fixed random upstream gradient."""
    w, s = leaves(weight, threshold)
    if backend == "reference":
        out = reference.soft_threshold_embedding(ids, w, s, mode, gk, sparse)
    else:
        out = soft_threshold_embedding(ids, w, s, mode=mode, gk=gk, sparse=sparse, backend=backend)
    gen = torch.Generator().manual_seed(grad_seed)
    upstream = torch.randn(out.shape, generator=gen).to(out.device, out.dtype)
    gw, gs = torch.autograd.grad(out, (w, s), upstream)
    return out.detach(), gw, gs


def check_against_reference(backend, ids, weight, threshold, mode, gk=1.0, sparse=False):
    out, gw, gs = run(backend, ids, weight, threshold, mode, gk, sparse)
    ref_out, ref_gw, ref_gs = run("reference", ids.cpu(), weight.cpu(), threshold.cpu(), mode, gk)
    torch.testing.assert_close(out.cpu(), ref_out, **out_tol(gk))
    torch.testing.assert_close(dense(gw).cpu(), ref_gw, **GRAD_TOL)
    torch.testing.assert_close(dense(gs).cpu(), ref_gs, **GRAD_TOL)
    return out, gw, gs


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dim", ODD_DIMS)
@pytest.mark.parametrize("mode", MODES)
def test_matches_reference(backend, mode, dim):
    device = backend_device(backend)
    ids, weight, threshold = make_lookup(mode, num_rows=11, dim=dim, device=device)
    out, _, _ = check_against_reference(backend, ids, weight, threshold, mode)
    pruned = (out == 0).float().mean().item()
    assert 0 < pruned < 1, f"inputs should prune part of the entries, pruned {pruned:.2f}"


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_sparse_gradients(backend, mode, sparse):
    ids, weight, threshold = make_lookup(mode, num_rows=7, dim=17, batch=10, device=backend_device(backend))
    _, gw, gs = check_against_reference(backend, ids, weight, threshold, mode, gk=0.7, sparse=sparse)
    assert gw.is_sparse == sparse
    assert gs.is_sparse == (sparse and mode in PER_ROW_MODES)
    if sparse:
        rows = gw._indices()[0].cpu()
        if backend == "cpu":  # coalesced: exactly the looked-up rows, sorted
            assert gw.is_coalesced() and torch.equal(rows, torch.unique(ids.cpu()))
        else:  # one entry per lookup, in sorted order (no host sync to count the distinct rows)
            assert torch.equal(rows, ids.cpu().reshape(-1).sort().values)
            assert torch.equal(gw.coalesce().indices()[0].cpu(), torch.unique(ids.cpu()))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_backward_is_bitwise_repeatable(backend, mode):
    # Heavy duplicates: 120 lookups over 3 rows, summed in a fixed order.
    ids, weight, threshold = make_lookup(mode, num_rows=3, dim=24, batch=40, device=backend_device(backend))
    first = run(backend, ids, weight, threshold, mode)
    second = run(backend, ids, weight, threshold, mode)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("tile_rows", [1, 2, 4])
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_triton_runs_that_cross_chunks(monkeypatch, mode, sparse, tile_rows):
    """Chunks of 1, 2 and 4 sorted lookups: a hot row's run spans many chunks (finished by the
    runs kernel from the partial sums), others start or end inside one."""
    monkeypatch.setattr(soft_threshold_ops, "MAX_TILE_ROWS", tile_rows)
    ids, weight, threshold = make_lookup(mode, num_rows=6, dim=3, batch=9, device=backend_device("triton"))
    ids[:5] = 2  # 15 of 27 lookups on one row
    check_against_reference("triton", ids, weight, threshold, mode, gk=0.8, sparse=sparse)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_heavy_duplicates_and_single_row_table(backend, mode):
    ids, weight, threshold = make_lookup(mode, num_rows=1, dim=33, batch=30, device=backend_device(backend))
    assert ids.unique().numel() == 1
    check_against_reference(backend, ids, weight, threshold, mode, gk=1.3)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_empty_batch(backend, mode, sparse):
    ids, weight, threshold = make_lookup(mode, num_rows=5, dim=3, device=backend_device(backend))
    ids = ids[:0]
    out, gw, gs = run(backend, ids, weight, threshold, mode, sparse=sparse)
    assert out.shape == (0, 3, 3)
    assert not dense(gw).any() and not dense(gs).any()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("mode", ["feature_dim", "field"])
def test_large_table_few_lookups(backend, mode):
    ids, weight, threshold = make_lookup(mode, num_rows=200_000, dim=3, batch=4, device=backend_device(backend))
    check_against_reference(backend, ids, weight, threshold, mode, sparse=True)


@pytest.mark.parametrize("mode", ["feature", "global"])
def test_cpu_groups_duplicates_of_ids_past_two_radix_passes(mode):
    """The CPU backward groups equal ids by a radix sort of 11 bits a pass: ids past 2**22 take a
    third pass. Duplicates at both ends of the id range, and ids that differ only in high bits."""
    rows = 2**22 + 2**12
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(rows, 1, generator=gen)
    threshold = torch.full((rows, 1) if mode == "feature" else (1,), -2.0)
    ids = torch.tensor([rows - 1, 0, 2**22, 2**11, rows - 1, 0, 2**22 + 1, 2**11, 1, 2**22, 2**22 + 2**11])
    # Dense gradients: a row split over two segments would be written twice, and lose a term.
    check_against_reference("cpu", ids, weight, threshold, mode)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("mode", ["dimension", "feature_dim"])
def test_int32_ids_and_any_leading_shape(backend, mode):
    ids, weight, threshold = make_lookup(mode, num_rows=9, dim=5, device=backend_device(backend),
                                         index_dtype=torch.int32)
    for shaped in (ids.reshape(-1), ids.reshape(2, 2, 6), ids.reshape(-1)[0]):
        out, _, _ = check_against_reference(backend, shaped, weight, threshold, mode)
        assert out.shape == shaped.shape + (5,)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_non_contiguous_inputs(backend, mode):
    ids, weight, threshold = make_lookup(mode, num_rows=6, dim=4, batch=6, device=backend_device(backend))
    weight_t = weight.t().contiguous().t()  # same values, column-major
    threshold_t = threshold.t().contiguous().t() if threshold.dim() == 2 else threshold
    ids_t = ids.t().contiguous().t()
    assert not weight_t.is_contiguous() and not ids_t.is_contiguous()
    check_against_reference(backend, ids_t, weight_t, threshold_t, mode)
    if mode not in FIELD_MODES:
        check_against_reference(backend, ids[:, ::2], weight, threshold, mode)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("mode", ["global", "feature_dim", "field_dim"])
def test_gk_zero_switches_threshold_off(backend, mode):
    ids, weight, threshold = make_lookup(mode, num_rows=8, dim=6, device=backend_device(backend))
    out, _, gs = check_against_reference(backend, ids, weight, threshold, mode, gk=0.0)
    assert torch.equal(out, weight[ids])
    assert not gs.any()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_extreme_thresholds_no_nan(backend):
    # -150 underflows sigmoid to exactly 0 in fp32 (no pruning); +10 prunes every |w| < 0.9999.
    ids, weight, threshold = make_lookup("feature_dim", num_rows=4, dim=8, device=backend_device(backend))
    weight = weight.clamp(-0.99, 0.99)
    for value, all_zero in ((-150.0, False), (10.0, True)):
        out, gw, gs = check_against_reference(backend, ids, weight, threshold.fill_(value), "feature_dim")
        assert torch.isfinite(out).all() and torch.isfinite(gw).all() and torch.isfinite(gs).all()
        assert bool((out == 0).all()) == all_zero


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("threshold_dtype", ["same", torch.float32])
@pytest.mark.parametrize("mode", ["dimension", "feature_dim", "field"])
def test_triton_half_precision(mode, dtype, threshold_dtype):
    # Half weights are computed in fp32 and rounded once; tolerance: one half-precision ulp.
    ids, weight, threshold = make_lookup(mode, num_rows=10, dim=17, device=backend_device("triton"), dtype=dtype,
                                         threshold_dtype=dtype if threshold_dtype == "same" else threshold_dtype)
    out, gw, gs = run("triton", ids, weight, threshold, mode)
    ref_out, ref_gw, ref_gs = run("reference", ids.cpu(), weight.float().cpu(), threshold.float().cpu(), mode)
    assert out.dtype == dtype and gw.dtype == dtype and gs.dtype == threshold.dtype
    tol = dict(rtol=torch.finfo(dtype).eps, atol=torch.finfo(dtype).eps)
    torch.testing.assert_close(out.cpu().float(), ref_out, **tol)
    # fp32 accumulation: the only rounding is the final cast of each sum (the upstream gradient
    # is also rounded to half before the kernel sees it, so compare against that).
    torch.testing.assert_close(gw.cpu().float(), ref_gw, rtol=2 * torch.finfo(dtype).eps, atol=2 * torch.finfo(dtype).eps)
    torch.testing.assert_close(gs.cpu().float(), ref_gs, rtol=4 * torch.finfo(dtype).eps, atol=4 * torch.finfo(dtype).eps)
