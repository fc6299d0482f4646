"""torch.library registration: opcheck, torch.compile(fullgraph=True) and torch.export."""

import pytest
import torch

from utils import GRAD_TOL, HAS_CUDA, MODES, make_lookup, out_tol
from pep_kernels import PEPEmbedding, soft_threshold_embedding

ops = torch.ops.pep_kernels


def backward_args(mode, device="cpu"):
    ids, weight, threshold = make_lookup(mode, num_rows=6, dim=5, device=device)
    flat = ids.reshape(-1)
    return torch.randn(flat.numel(), 5, device=device), flat, weight, threshold


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if HAS_CUDA else []))
@pytest.mark.parametrize("mode", MODES)
def test_opcheck_lookup_ops(mode, device):
    """The C++ kernels on CPU tensors; on a GPU machine also the Triton kernels registered for CUDA."""
    grad, ids, weight, threshold = backward_args(mode, device)
    column_major = weight.t().contiguous().t()  # the fakes must match outputs whatever the input strides
    offsets = torch.tensor([0, 2, 4, 6], device=device)  # 3 fields of 2 rows: ids below must be < 2
    local = ids % 2
    record = torch.full((5,), -1, dtype=torch.int64, device=device)
    for w in (weight, column_major):
        torch.library.opcheck(ops.soft_threshold_forward.default, (ids, w, threshold, mode, 0.9, None, None))
        torch.library.opcheck(ops.soft_threshold_forward.default, (local, w, threshold, mode, 0.9, offsets, record))
        rows = ops.soft_threshold_forward(ids, w, threshold, mode, 0.9, None, None)[1]
        for sparse in (False, True):
            torch.library.opcheck(ops.soft_threshold_backward.default, (grad, rows, w, threshold, mode, 0.9, sparse))
    keep = weight > 0
    torch.library.opcheck(ops.masked_embedding_forward.default, (local, weight, keep, offsets, record))
    rows = ops.masked_embedding_forward(ids, weight, keep, None, None)[1]
    torch.library.opcheck(ops.masked_embedding_backward.default, (grad, rows, keep))


def test_opcheck_id_ops():
    torch.library.opcheck(ops.checked_ids.default, (torch.tensor([[3, 0], [1, 1]]), 4))
    torch.library.opcheck(ops.offset_field_ids.default, (torch.tensor([[2, 0], [1, 4]]), torch.tensor([3, 5])))


def compiled_parity(backend, mode, device):
    ids, weight, threshold = make_lookup(mode, num_rows=9, dim=6, device=device)

    def loss(w, s):
        out = soft_threshold_embedding(ids, w, s, mode=mode, gk=0.8, backend=backend)
        return out, (out * out).sum()

    torch._dynamo.reset()
    results = []
    for fn in (loss, torch.compile(loss, fullgraph=True)):  # backward through AOTAutograd's graph
        w, s = weight.clone().requires_grad_(True), threshold.clone().requires_grad_(True)
        out, value = fn(w, s)
        results.append((out, torch.autograd.grad(value, (w, s))))
    (eager_out, eager_grads), (comp_out, comp_grads) = results
    torch.testing.assert_close(comp_out, eager_out, **out_tol(0.8))
    torch.testing.assert_close(comp_grads, eager_grads, **GRAD_TOL)


@pytest.mark.compile
@pytest.mark.parametrize("mode", ["feature_dim", "field"])
def test_compile_fullgraph_cpu(mode):
    compiled_parity("cpu", mode, "cpu")


@pytest.mark.gpu
@pytest.mark.compile
@pytest.mark.parametrize("mode", ["global", "feature_dim", "field_dim"])
def test_compile_fullgraph_triton(mode):
    compiled_parity("auto", mode, "cuda")  # the Triton kernels, registered for CUDA, through the dispatcher


def test_export_module_cpu():
    torch.manual_seed(0)
    emb = PEPEmbedding(12, 4, threshold_init=-1.0, field_dims=[5, 7], backend="cpu")
    ids = torch.tensor([[1, 6], [4, 0]])
    program = torch.export.export(emb, (ids,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "pep_kernels.soft_threshold_forward.default" in targets
    torch.testing.assert_close(program.module()(ids), emb(ids), rtol=0, atol=0)
    with pytest.raises(IndexError, match="id 9 in field 1"):
        program.module()(torch.tensor([[0, 9], [1, 1]]))
