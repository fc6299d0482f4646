"""The oracle itself: gradients by finite differences, and agreement with PEP_SPEC formulas."""

import pytest
import torch

from utils import FIELD_MODES, MODES, make_lookup, out_tol
from pep_kernels import reference, threshold_shape


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_float64(mode):
    ids, weight, threshold = make_lookup(mode, num_rows=5, dim=3, batch=4, dtype=torch.float64)
    weight.requires_grad_(True)
    threshold.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda w, s: reference.soft_threshold_embedding(ids, w, s, mode, 0.8), (weight, threshold)
    )


@pytest.mark.parametrize("mode", MODES)
def test_gradients_follow_the_spec_formula(mode):
    """dL/dV = G [|V| > t];  dL/ds_k = -gk sig(s_k)(1 - sig(s_k)) sum_{uses of s_k} G sign(V) [|V| > t]."""
    gk = 0.9
    ids, weight, threshold = make_lookup(mode, num_rows=6, dim=4, batch=5, dtype=torch.float64)
    w, s = weight.clone().requires_grad_(True), threshold.clone().requires_grad_(True)
    out = reference.soft_threshold_embedding(ids, w, s, mode, gk)
    upstream = torch.randn(out.shape, dtype=torch.float64)
    gw, gs = torch.autograd.grad(out, (w, s), upstream)

    num_fields = ids.shape[-1]
    expected_gw, expected_gs = torch.zeros_like(weight), torch.zeros_like(threshold)
    s2 = threshold.reshape(1, -1) if threshold.dim() == 1 else threshold
    es2 = expected_gs.view_as(s2)
    for n, row in enumerate(ids.reshape(-1).tolist()):
        for j in range(weight.shape[1]):
            srow = {"global": 0, "dimension": 0, "feature": row, "feature_dim": row}.get(mode, n % num_fields)
            scol = j if s2.shape[1] > 1 else 0
            y = torch.sigmoid(s2[srow, scol])
            v, g = weight[row, j], upstream.reshape(-1, weight.shape[1])[n, j]
            keep = float(abs(v) > gk * y)
            expected_gw[row, j] += g * keep
            es2[srow, scol] += -gk * y * (1 - y) * g * torch.sign(v) * keep
    torch.testing.assert_close(gw, expected_gw)
    torch.testing.assert_close(gs, expected_gs)


@pytest.mark.parametrize("mode", MODES)
def test_whole_table_agrees_with_lookup(mode):
    # torch's sigmoid may differ in the last bit between its vectorised and scalar paths.
    torch.manual_seed(0)
    field_dims = [2, 3, 4]
    weight = torch.randn(9, 5)
    num_fields = 3 if mode in FIELD_MODES else None
    threshold = torch.rand(threshold_shape(mode, 9, 5, num_fields)) * 2 - 1.5
    table = reference.soft_threshold(weight, threshold, mode, 1.1, field_dims)
    # Look up every row once, each in its own field.
    if mode in FIELD_MODES:
        local = [torch.arange(f) for f in field_dims]
        for field, rows in enumerate(local):
            ids = torch.zeros(len(rows), 3, dtype=torch.int64)
            ids[:, field] = rows + sum(field_dims[:field])
            looked_up = reference.soft_threshold_embedding(ids, weight, threshold, mode, 1.1)[:, field]
            torch.testing.assert_close(looked_up, table[ids[:, field]], **out_tol(1.1))
    else:
        looked_up = reference.soft_threshold_embedding(torch.arange(9), weight, threshold, mode, 1.1)
        torch.testing.assert_close(looked_up, table, **out_tol(1.1))
    assert 0 < int((table == 0).sum()) < table.numel()


def test_dimension_mode_is_not_misrouted_when_d_equals_num_fields():
    # The reference code picks the field branch when s.shape[0] == num_fields; we go by name.
    ids = torch.tensor([[0, 1, 2], [3, 4, 5]])
    weight = torch.rand(6, 3) * 0.9 + 0.05  # |w| in (0.05, 0.95)
    threshold = torch.tensor([-5.0, 0.0, 5.0])  # t = 0.007, 0.5, 0.993  # dimension: one threshold per column
    out = reference.soft_threshold_embedding(ids, weight, threshold, "dimension")
    expected = reference.soft_threshold_values(weight[ids], threshold)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert (out[..., 2] == 0).all() and (out[..., 0] != 0).all()


def test_sparse_reference_gradients_equal_dense():
    ids, weight, threshold = make_lookup("feature_dim", num_rows=6, dim=4, batch=5)
    grads = []
    for sparse in (False, True):
        w, s = weight.clone().requires_grad_(True), threshold.clone().requires_grad_(True)
        out = reference.soft_threshold_embedding(ids, w, s, "feature_dim", 1.0, sparse)
        gw, gs = torch.autograd.grad(out.sum(), (w, s))
        grads.append((gw.to_dense(), gs.to_dense()))
    torch.testing.assert_close(grads[0], grads[1])
