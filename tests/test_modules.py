"""PEPEmbedding: parameters, field offsets, the counting methods, training with any optimizer."""

import math

import pytest
import torch
from torch import nn

from utils import KERNEL_BACKENDS, MODES, backend_device, out_tol
from pep_kernels import PEPEmbedding, reference, soft_threshold_embedding, threshold_shape
from pep_kernels._validation import mode_layout

FIELD_DIMS = [3, 5, 4]


@pytest.mark.parametrize("mode", MODES)
def test_parameters_follow_the_reference_init(mode):
    torch.manual_seed(0)
    emb = PEPEmbedding(12, 6, threshold_mode=mode, threshold_init=-7.5, field_dims=FIELD_DIMS)
    assert emb.weight.shape == (12, 6)
    assert emb.threshold.shape == threshold_shape(mode, 12, 6, 3)
    assert (emb.threshold == -7.5).all()
    bound = math.sqrt(6 / (12 + 6))  # Xavier-uniform over (N, d)
    assert emb.weight.abs().max() <= bound and emb.weight.abs().max() > 0.8 * bound
    assert dict(emb.named_parameters()).keys() == {"weight", "threshold"}
    assert "12, 6, threshold_mode=" + repr(mode) in repr(emb) and "fields=3" in repr(emb)


@pytest.mark.parametrize("mode", MODES)
def test_threshold_slope_orders_the_dimensions(mode):
    """Dimension j starts at init + j * slope where the mode has a threshold per dimension; the
    other modes refuse a slope, naming it."""
    kwargs = dict(threshold_mode=mode, threshold_init=-7.5, field_dims=FIELD_DIMS)
    if not mode_layout(mode)[1]:  # no threshold per dimension
        with pytest.raises(ValueError, match=f"threshold_slope 0.5 needs a threshold per dimension.*not mode '{mode}'"):
            PEPEmbedding(12, 6, threshold_slope=0.5, **kwargs)
        return
    torch.manual_seed(0)
    sloped = PEPEmbedding(12, 6, threshold_slope=0.5, **kwargs)
    expected = (-7.5 + 0.5 * torch.arange(6.0)).expand(threshold_shape(mode, 12, 6, 3))
    assert torch.equal(sloped.threshold.detach(), expected)
    torch.manual_seed(0)
    assert torch.equal(sloped.weight, PEPEmbedding(12, 6, **kwargs).weight)  # the same draws for W


@pytest.mark.parametrize("backend", ["reference"] + KERNEL_BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_field_offsets_and_counting(backend, mode):
    device = backend_device(backend)
    torch.manual_seed(1)
    emb = PEPEmbedding(12, 6, threshold_mode=mode, threshold_init=-1.0, field_dims=FIELD_DIMS,
                       backend=backend, device=device)
    with torch.no_grad():
        emb.weight.mul_(4.0)  # Xavier values are below sigmoid(-1): scale so that some survive
    local = torch.tensor([[2, 0, 3], [0, 4, 1]], device=device)
    out = emb(local)
    table = emb.pruned_weight()
    global_ids = local + torch.tensor([0, 3, 8], device=device)
    torch.testing.assert_close(out, table[global_ids], rtol=1e-6, atol=1e-7)
    mask = emb.mask()
    assert mask.dtype == torch.bool and torch.equal(mask, table != 0)
    assert emb.nnz() == int(mask.sum()) and 0 < emb.nnz() < 72
    assert emb.sparsity() == pytest.approx(1 - emb.nnz() / 72)
    assert torch.equal(emb.dims_per_row(), mask.sum(1))


def test_drop_in_for_nn_embedding_when_nothing_is_pruned():
    torch.manual_seed(0)
    emb = PEPEmbedding(20, 8, threshold_init=-150.0)  # sigmoid(-150) == 0 in fp32: no pruning
    plain = nn.Embedding(20, 8)
    plain.weight.data.copy_(emb.weight.data)
    ids = torch.randint(0, 20, (4, 5))
    assert torch.equal(emb(ids), plain(ids))
    assert emb.nnz() == 160 and emb.sparsity() == 0.0


@pytest.mark.parametrize("backend", ["reference"] + KERNEL_BACKENDS)
@pytest.mark.parametrize("sparse", [False, True])
def test_trains_with_standard_optimizers(backend, sparse):
    device = backend_device(backend)
    torch.manual_seed(0)
    emb = PEPEmbedding(30, 4, threshold_init=-3.0, sparse=sparse, backend=backend, device=device)
    optimizer = (torch.optim.SparseAdam if sparse else torch.optim.Adam)(emb.parameters(), lr=0.05)
    ids = torch.randint(0, 30, (16, 3), device=device)
    target = torch.zeros(16, 3, 4, device=device)
    before = emb.nnz()
    for _ in range(20):
        optimizer.zero_grad()
        loss = (emb(ids) - target).pow(2).sum()
        loss.backward()
        optimizer.step()
    assert emb.nnz() < before  # pulling the outputs to zero raises thresholds and shrinks weights


def test_kernel_backends_agree_with_reference_module():
    torch.manual_seed(0)
    modules = {b: PEPEmbedding(40, 5, threshold_init=-1.0, field_dims=[10, 30], backend=b) for b in ["reference", "cpu", "triton"]}
    for m in modules.values():
        m.load_state_dict(modules["reference"].state_dict())
    modules["triton"].to(backend_device("triton"))
    ids = torch.randint(0, 10, (6, 2))
    outs = {b: m(ids.to(m.weight.device)) for b, m in modules.items()}
    for b in ("cpu", "triton"):
        torch.testing.assert_close(outs[b].cpu(), outs["reference"], rtol=1e-6, atol=4e-7)
        device = modules[b].weight.device
        assert torch.equal(soft_threshold_embedding((ids + torch.tensor([0, 10])).to(device), modules[b].weight,
                                                    modules[b].threshold, backend=b), outs[b])
    torch.testing.assert_close(modules["cpu"].pruned_weight(), reference.soft_threshold(modules["cpu"].weight, modules[
        "cpu"].threshold).detach(), **out_tol(1.0))
