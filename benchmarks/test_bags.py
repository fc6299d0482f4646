"""PEPEmbeddingBag on CPU (shape `bags` of ../shared/BENCHMARKING.md: a 1M x 32 table, feature_dim
thresholds pruning about half of the entries, 2048 x 26 bags of uniform 1-40 Zipf(1.1) ids, sum
pooling), against:

- "nn.EmbeddingBag": `F.embedding_bag` of the plain table (no thresholds): what the model pays
  without PEP, and the floor of a pooled lookup;
- "reference": `pep_kernels.reference.soft_threshold_embedding_bag` as written, the published
  code's way: the whole table soft-thresholded, then `F.embedding_bag` (its id and offset checks
  included);
- "compiled reference": `torch.compile` of it (graph breaks at the checks' host reads);
- "fbgemm": FBGEMM's CPU TBE, pooled (`SplitTableBatchedEmbeddingBagsCodegen`, one 1M x 32 table
  on the host, `EmbeddingLocation.HOST`, `ComputeDevice.CPU`, PoolingMode.SUM); its backward is
  its fused optimizer (EXACT_ROWWISE_ADAGRAD), so it is in the forward and the training step.
  Omitted, with a warning, when `fbgemm_gpu` does not import
  (`pip install --no-deps -r benchmarks/requirements-fbgemm.txt`).

Passes: "forward"; "forward+backward" (dense gradients of W and s: the candidates that make them);
"forward+backward sparse" (row-sparse gradients: pep and nn.EmbeddingBag(sparse=True)); "train
step": the loss (out * target).sum(), backward and update, "pep rowwise adagrad" (a
PEPEmbeddingBag with the fused `Adagrad(rowwise=True)`: W and its per-row thresholds) against
"fbgemm rowwise adagrad" (W only) and "nn.EmbeddingBag + Adagrad" (sparse gradients,
torch.optim.Adagrad). Every call takes the next of BATCHES pre-drawn batches, the same order
for every candidate.

    pytest benchmarks/test_bags.py --benchmark-group-by=group
"""

import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F

from pep_kernels import PEPEmbeddingBag, reference, soft_threshold_embedding_bag
from pep_kernels.optim import Adagrad
import fbgemm_baselines as fb
from fbgemm_baselines import FBGEMM_MISSING
from shapes import SHAPES, make_bags, make_inputs


SHAPE = SHAPES["bags"]
MODE = "feature_dim"
BATCHES = 4
LR, EPS = 1e-2, 1e-8  # both row-wise Adagrads; FBGEMM's default eps


def inputs():
    """(batches of (ids, offsets), weight, threshold, gk): make_inputs' table, the shape's bags."""
    _, weight, threshold, gk = make_inputs(SHAPE, MODE)
    return make_bags(SHAPE, torch.Generator().manual_seed(2), BATCHES), weight, threshold, gk


def tbe(weight):
    table = fb.SplitTableBatchedEmbeddingBagsCodegen(
        [(SHAPE.rows, SHAPE.dim, fb.EmbeddingLocation.HOST, fb.ComputeDevice.CPU)],
        optimizer=fb.OptimType.EXACT_ROWWISE_ADAGRAD, learning_rate=LR, eps=EPS,
    )
    table.split_embedding_weights()[0].copy_(weight)
    return table


def with_end(ids, offsets):
    """FBGEMM's offsets: B + 1, the last the number of ids."""
    return torch.cat([offsets, offsets.new_tensor([ids.numel()])])


def lookups(weight, threshold, gk, sparse=False):
    """name -> f(ids, offsets, w, s) for the pooled lookups with gradients of w (and s)."""

    def pep(ids, offsets, w, s):
        return soft_threshold_embedding_bag(ids, w, s, offsets, mode=MODE, gk=gk, pooling="sum", sparse=sparse,
                                            backend="cpu")

    def plain(ids, offsets, w, s):
        return F.embedding_bag(ids, w, offsets, mode="sum", sparse=sparse)

    fns = {"pep cpu": pep, "nn.EmbeddingBag": plain}
    if not sparse:
        def eager(ids, offsets, w, s):
            return reference.soft_threshold_embedding_bag(ids, w, s, offsets, MODE, gk, "sum")

        fns["reference"] = eager
        # dynamic=False: static-shape graphs, not a dynamic-shape recompile for the batches' lengths.
        fns["compiled reference"] = torch.compile(eager, dynamic=False)
    return fns


def cycling(step, batches):
    """A call of `step` on the next batch at every call, in the order of `batches`."""
    order = itertools.cycle(batches)
    return lambda: step(*next(order))


def forward_fns():
    batches, weight, threshold, gk = inputs()
    fns = {name: cycling(lambda ids, offsets, f=f: f(ids, offsets, weight, threshold), batches)
           for name, f in lookups(weight, threshold, gk).items()}
    if FBGEMM_MISSING:
        warnings.warn(f"fbgemm_gpu does not import ({FBGEMM_MISSING}): the FBGEMM baseline is omitted", stacklevel=1)
    else:
        table = tbe(weight)

        @torch.no_grad()
        def fbgemm(ids, offsets):
            return table(ids, with_end(ids, offsets))

        fns["fbgemm"] = cycling(fbgemm, batches)
    return fns


def backward_fns(sparse=False):
    batches, weight, threshold, gk = inputs()
    w, s = weight.requires_grad_(True), threshold.requires_grad_(True)
    upstream = torch.randn(SHAPE.lookups, SHAPE.dim, generator=torch.Generator().manual_seed(1))

    def step(f, ids, offsets):
        w.grad = s.grad = None
        f(ids, offsets, w, s).backward(upstream)

    return {name: cycling(lambda ids, offsets, f=f: step(f, ids, offsets), batches)
            for name, f in lookups(weight, threshold, gk, sparse).items()}


def train_fns():
    batches, weight, threshold, gk = inputs()
    target = torch.randn(SHAPE.lookups, SHAPE.dim, generator=torch.Generator().manual_seed(1))

    def loss(out):
        return (out * target).sum()

    pep = PEPEmbeddingBag(SHAPE.rows, SHAPE.dim, mode="sum", threshold_mode=MODE, gk=gk,
                          optimizer=Adagrad(lr=LR, eps=EPS, rowwise=True))
    plain = torch.nn.EmbeddingBag(SHAPE.rows, SHAPE.dim, mode="sum", sparse=True)
    with torch.no_grad():
        pep.weight.copy_(weight), pep.threshold.copy_(threshold), plain.weight.copy_(weight)
    adagrad = torch.optim.Adagrad(plain.parameters(), lr=LR, eps=EPS)

    def plain_step(ids, offsets):
        loss(plain(ids, offsets)).backward()
        adagrad.step()
        adagrad.zero_grad(set_to_none=True)

    fns = {"pep rowwise adagrad": cycling(lambda ids, offsets: loss(pep(ids, offsets)).backward(), batches)}
    if not FBGEMM_MISSING:
        table = tbe(weight)
        fns["fbgemm rowwise adagrad"] = cycling(
            lambda ids, offsets: loss(table(ids, with_end(ids, offsets))).backward(), batches)
    fns["nn.EmbeddingBag + Adagrad"] = cycling(plain_step, batches)
    return fns


PASSES = {
    "forward": ("pep cpu", forward_fns),
    "forward+backward": ("pep cpu", backward_fns),
    "forward+backward sparse": ("pep cpu", lambda: backward_fns(sparse=True)),
    "train step": ("pep rowwise adagrad", train_fns),
}


@pytest.mark.parametrize("pass_name", PASSES)
def test_bags(benchmark, interleaved, pass_name):
    candidate, make = PASSES[pass_name]
    fns = make()
    benchmark.group = f"{pass_name} bags {MODE}"
    interleaved(benchmark.group, candidate, fns)
    benchmark(fns[candidate])
