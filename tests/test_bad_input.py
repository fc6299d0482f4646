"""Bad input gets a clear exception on every backend, never a crash or silent garbage."""

import os
import subprocess
import sys

import pytest
import torch

from utils import backend_device, make_lookup
from pep_kernels import PEPEmbedding, soft_threshold_embedding

BACKENDS = ["reference", "cpu", "triton"]


def lookup(backend, ids, weight, threshold, mode="feature_dim", **kwargs):
    return soft_threshold_embedding(ids, weight, threshold, mode=mode, backend=backend, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [-1, 7, 2**40])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_out_of_range_ids_raise_index_error(backend, bad, index_dtype):
    if index_dtype == torch.int32 and bad == 2**40:
        bad = 2**31 - 1
    ids, weight, threshold = make_lookup("feature_dim", num_rows=7, dim=3, device=backend_device(backend))
    ids = ids.to(index_dtype)
    ids[1, 2] = bad
    with pytest.raises(IndexError, match=rf"index {bad} is out of range .*valid ids are 0\.\.6"):
        lookup(backend, ids, weight, threshold)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_never_sees_bad_ids(backend):
    # The C++ backward op checks again for C++ callers; from Python the forward already raised.
    ids, weight, threshold = make_lookup("feature", num_rows=4, dim=3, device=backend_device(backend))
    weight.requires_grad_(True)
    out = lookup(backend, ids, weight, threshold, mode="feature")
    out.sum().backward()
    assert weight.grad.shape == weight.shape


def test_cpu_backward_op_checks_rows():
    ids, weight, threshold = make_lookup("feature_dim", num_rows=4, dim=3)
    rows = ids.reshape(-1).clone()
    rows[3] = 4
    with pytest.raises(IndexError, match="index 4 is out of range"):
        torch.ops.pep_kernels.soft_threshold_backward(torch.ones(rows.numel(), 3), rows, weight, threshold,
                                                      "feature_dim", 1.0, False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "mode, shape, message",
    [
        ("global", (2,), r"mode 'global' must have shape \(1,\)"),
        ("dimension", (4,), r"mode 'dimension' must have shape \(3,\)"),
        ("feature", (5, 3), r"mode 'feature' must have shape \(5, 1\)"),
        ("feature_dim", (5, 1), r"mode 'feature_dim' must have shape \(5, 3\)"),
        ("field", (2, 1), r"mode 'field' must have shape \(4, 1\) .*4 fields"),
        ("field_dim", (4, 1), r"mode 'field_dim' must have shape \(4, 3\)"),
    ],
)
def test_threshold_shape_must_fit_mode(backend, mode, shape, message):
    device = backend_device(backend)
    ids = torch.zeros(2, 4, dtype=torch.int64, device=device)
    with pytest.raises(ValueError, match=message):
        lookup(backend, ids, torch.zeros(5, 3, device=device), torch.zeros(shape, device=device), mode=mode)


@pytest.mark.parametrize("backend", BACKENDS)
def test_wrong_dtypes_raise_type_error(backend):
    ids, weight, threshold = make_lookup("feature_dim", num_rows=4, dim=3, device=backend_device(backend))
    with pytest.raises(TypeError, match="indices must be int32 or int64, got torch.float32"):
        lookup(backend, ids.float(), weight, threshold)
    with pytest.raises(TypeError, match="weight must be float32, float64, float16 or bfloat16, got torch.int64"):
        lookup(backend, ids, weight.long(), threshold)
    with pytest.raises(TypeError, match="threshold dtype must match weight dtype torch.float32, got torch.float64"):
        lookup(backend, ids, weight, threshold.double())


def test_backend_specific_dtype_limits():
    ids, weight, threshold = make_lookup("feature_dim", num_rows=4, dim=3)
    with pytest.raises(TypeError, match="CPU kernel takes float32 or float64 weights, got Half"):
        lookup("cpu", ids, weight.half(), threshold.half())
    with pytest.raises(TypeError, match="Triton kernels take float32, float16 or bfloat16 weights, got torch.float64"):
        lookup("triton", ids, weight.double(), threshold.double())


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_devices_raise_value_error(backend):
    ids, weight, threshold = make_lookup("feature_dim", num_rows=4, dim=3)
    with pytest.raises(ValueError, match="must be on one device, got cpu, meta and cpu"):
        lookup(backend, ids, weight.to("meta"), threshold)


@pytest.mark.parametrize("backend", BACKENDS)
def test_other_bad_arguments(backend):
    ids, weight, threshold = make_lookup("feature_dim", num_rows=4, dim=3, device=backend_device(backend))
    with pytest.raises(ValueError, match="unknown threshold mode 'row'"):
        lookup(backend, ids, weight, threshold, mode="row")
    with pytest.raises(ValueError, match="gk must be a finite number >= 0, got -1.0"):
        lookup(backend, ids, weight, threshold, gk=-1.0)
    with pytest.raises(TypeError, match="gk must be a Python float, got Tensor"):
        lookup(backend, ids, weight, threshold, gk=torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"weight must be 2-D .* got shape \(12,\)"):
        lookup(backend, ids, weight.reshape(-1), threshold)
    with pytest.raises(ValueError, match="mode 'field' needs indices whose last axis is the field axis"):
        lookup(backend, ids[0, 0], weight, torch.zeros(1, 1, device=weight.device), mode="field")


def test_unknown_backend_and_device_mismatch():
    ids, weight, threshold = make_lookup("feature_dim", num_rows=4, dim=3)
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        lookup("cuda", ids, weight, threshold)
    with pytest.raises(ValueError, match="backend 'cpu' needs CPU tensors, got tensors on meta"):
        lookup("cpu", ids.to("meta"), weight.to("meta"), threshold.to("meta"))


def test_module_rejects_bad_configuration_and_field_ids():
    with pytest.raises(ValueError, match="num_embeddings must be a positive int, got 0"):
        PEPEmbedding(0, 4)
    with pytest.raises(ValueError, match="threshold_mode 'field' needs field_dims"):
        PEPEmbedding(10, 4, threshold_mode="field")
    with pytest.raises(ValueError, match=r"sum\(field_dims\) = 9 must equal num_embeddings = 10"):
        PEPEmbedding(10, 4, field_dims=[4, 5])
    with pytest.raises(ValueError, match="unknown threshold mode 'rows'"):
        PEPEmbedding(10, 4, threshold_mode="rows")
    emb = PEPEmbedding(9, 4, field_dims=[4, 5])
    with pytest.raises(IndexError, match=r"id 4 in field 0 is out of range: that field has 4 values \(valid local ids are 0\.\.3\)"):
        emb(torch.tensor([[1, 2], [4, 0]]))
    with pytest.raises(IndexError, match="id -1 in field 1 is out of range"):
        emb(torch.tensor([[1, -1]]))
    with pytest.raises(ValueError, match=r"ids must have shape \(\.\.\., 2\) \(one id per field\), got \(2, 3\)"):
        emb(torch.zeros(2, 3, dtype=torch.int64))


def test_triton_on_cpu_without_interpreter_says_what_to_do():
    code = (
        "import torch\n"
        "from pep_kernels import soft_threshold_embedding as f\n"
        "f(torch.tensor([0]), torch.zeros(2, 3), torch.zeros(2, 3), backend='triton')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "ValueError: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1" in result.stderr
