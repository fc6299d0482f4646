"""Forward and forward+backward of the soft-threshold lookup on CPU, against the baselines of
../shared/BENCHMARKING.md: the eager reference, torch.compile of it, and the floor
(index_select of the W rows and threshold rows the op must read).

    pytest benchmarks/test_lookup.py --benchmark-group-by=group
"""

import pytest
import torch

from pep_kernels import reference, soft_threshold_embedding
from shapes import SHAPES, make_inputs

CASES = [("criteo", "feature_dim"), ("criteo", "feature"), ("criteo", "global"), ("wide", "feature_dim")]


def candidates(ids, weight, threshold, mode, gk, sparse=False):
    """With sparse=True every candidate returns row-sparse gradients (the floor as
    nn.Embedding(sparse=True)); torch.compile does not take sparse gradients, so it sits out."""
    per_row = mode in ("feature", "feature_dim")
    flat = ids.reshape(-1)

    def floor(ids, w, s, mode, gk):
        if sparse:
            rows = torch.nn.functional.embedding(flat, w, sparse=True)
            return (rows, torch.nn.functional.embedding(flat, s, sparse=True)) if per_row else (rows,)
        rows = torch.index_select(w, 0, flat)
        return (rows, torch.index_select(s, 0, flat)) if per_row else (rows,)

    fns = {
        "pep cpu": lambda ids, w, s, mode, gk: soft_threshold_embedding(ids, w, s, mode=mode, gk=gk, sparse=sparse,
                                                                        backend="cpu"),
        "reference": lambda ids, w, s, mode, gk: reference.soft_threshold_embedding(ids, w, s, mode, gk, sparse),
        "floor": floor,
    }
    if not sparse:
        fns["compiled reference"] = torch.compile(reference.soft_threshold_embedding)
    return fns


def forward_fns(case):
    shape, mode = SHAPES[case[0]], case[1]
    ids, weight, threshold, gk = make_inputs(shape, mode)
    return {name: (lambda f=f: f(ids, weight, threshold, mode, gk)) for name, f in candidates(ids, weight, threshold, mode, gk).items()}


def training_fns(case, sparse=False):
    shape, mode = SHAPES[case[0]], case[1]
    ids, weight, threshold, gk = make_inputs(shape, mode)
    weight.requires_grad_(True)
    threshold.requires_grad_(True)
    upstream = torch.randn(ids.shape + (shape.dim,))

    def step(f):
        weight.grad = threshold.grad = None
        outs = f(ids, weight, threshold, mode, gk)
        outs = outs if isinstance(outs, tuple) else (outs,)
        torch.autograd.backward(outs, [upstream.view(o.shape) if o.numel() == upstream.numel() else
                                       torch.ones_like(o) for o in outs])

    return {name: (lambda f=f: step(f)) for name, f in candidates(ids, weight, threshold, mode, gk, sparse).items()}


PASSES = {
    "forward": forward_fns,
    "forward+backward": training_fns,
    "forward+backward sparse": lambda case: training_fns(case, sparse=True),
}
RUNS = [(p, c) for p in PASSES for c in CASES if "sparse" not in p or c in (("criteo", "feature_dim"), ("wide", "feature_dim"))]


@pytest.mark.parametrize("run", RUNS, ids=lambda r: f"{r[0]}-{r[1][0]}-{r[1][1]}")
def test_lookup(benchmark, interleaved, run):
    pass_name, case = run
    fns = PASSES[pass_name](case)
    benchmark.group = f"{pass_name} {case[0]} {case[1]}"
    interleaved(benchmark.group, "pep cpu", fns,
                case={"pass": pass_name, "shape": case[0], "mode": case[1], "dtype": "float32"})
    benchmark(fns["pep cpu"])
