"""Helpers shared by the tests: device facts, the modes and shapes every kernel is tested on,
tolerances, and builders of lookups and oracle training runs. Import it as `from utils import ...`
(tests/ is on sys.path under pytest); conftest.py only configures pytest."""

import torch

from pep_kernels import reference, threshold_shape

HAS_CUDA = torch.cuda.is_available()
# Kernel backends and the device their tests run on.
KERNEL_BACKENDS = ["cpu", "triton"]


def backend_device(backend):
    return "cuda" if backend == "triton" and HAS_CUDA else "cpu"


MODES = ("global", "dimension", "feature", "feature_dim", "field", "field_dim")
FIELD_MODES = ("field", "field_dim")
PER_ROW_MODES = ("feature", "feature_dim")
ODD_DIMS = (1, 3, 17, 24, 33, 128)

# fp32 tolerances. Outputs differ from the reference only through the last bit of sigmoid, so
# by at most a few ulps of the threshold (<= gk): atol = 4 * eps * gk. Gradients are sums of at
# most ~100 O(1) terms added in another order: error <= 100 * 2**-24 * O(1) ~ 6e-6.
EPS32 = torch.finfo(torch.float32).eps
GRAD_TOL = dict(rtol=1e-5, atol=1e-5)


def out_tol(gk):
    return dict(rtol=1e-6, atol=4 * EPS32 * max(gk, 1.0))


def make_lookup(mode, num_rows, dim, batch=8, fields=3, device="cpu", dtype=torch.float32, seed=0,
                index_dtype=torch.int64, threshold_dtype=None):
    """A table, thresholds spread so that a good share of entries is pruned, and ids with
    duplicates. Field modes get ids of shape (batch, fields)."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(num_rows, dim, generator=gen).to(device=device, dtype=dtype)
    num_fields = fields if mode in FIELD_MODES else None
    shape = threshold_shape(mode, num_rows, dim, num_fields)
    threshold = (torch.rand(shape, generator=gen) * 2 - 1.5).to(device=device, dtype=threshold_dtype or dtype)
    ids = torch.randint(0, num_rows, (batch, fields), generator=gen).to(device=device, dtype=index_dtype)
    return ids, weight, threshold


def leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def dense(grad):
    return grad.to_dense() if grad is not None and grad.is_sparse else grad


def train_with_row_oracle(fused, eager, rule, batches, loss_of):
    """Trains `fused` (a PEPEmbedding with an SGD/Adagrad rule, per-field ids) on `batches` and
    mirrors every step on copies of `eager`'s tables with `reference.row_optimizer_step` on the
    reference's gradients; shared thresholds take a plain SGD step of 0.1 on both sides.
    Returns the oracle's (weight, threshold)."""
    per_row = fused.threshold_mode in PER_ROW_MODES
    weight, threshold = eager.weight.detach().clone(), eager.threshold.detach().clone()
    states = {name: {k: torch.zeros(shape, dtype=p.dtype) for k, shape in rule.state_shapes(p).items()}
              for name, p in (("weight", weight), ("threshold", threshold))}
    offsets = torch.tensor([0] + eager.field_dims.tolist()[:-1]).cumsum(0)
    for ids, target in batches:
        w, s = weight.clone().requires_grad_(True), threshold.clone().requires_grad_(True)
        loss_of(reference.soft_threshold_embedding(ids + offsets, w, s, fused.threshold_mode), target).backward()
        touched = torch.unique(ids + offsets)
        reference.row_optimizer_step(rule, weight, states["weight"], touched, w.grad[touched])
        if per_row:
            reference.row_optimizer_step(rule, threshold, states["threshold"], touched, s.grad[touched])
        else:
            threshold -= 0.1 * s.grad
        fused.threshold.grad = None
        loss_of(fused(ids), target).backward()
        if not per_row:
            with torch.no_grad():
                fused.threshold -= 0.1 * fused.threshold.grad
    return weight, threshold
