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


def candidates(ids, weight, threshold, mode, gk):
    per_row = mode in ("feature", "feature_dim")
    flat = ids.reshape(-1)

    def floor(ids, w, s, mode, gk):
        rows = torch.index_select(w, 0, flat)
        return (rows, torch.index_select(s, 0, flat)) if per_row else (rows,)

    compiled = torch.compile(reference.soft_threshold_embedding)
    return {
        "pep cpu": lambda ids, w, s, mode, gk: soft_threshold_embedding(ids, w, s, mode=mode, gk=gk, backend="cpu"),
        "reference": reference.soft_threshold_embedding,
        "compiled reference": compiled,
        "floor": floor,
    }


def forward_fns(case):
    shape, mode = SHAPES[case[0]], case[1]
    ids, weight, threshold, gk = make_inputs(shape, mode)
    return {name: (lambda f=f: f(ids, weight, threshold, mode, gk)) for name, f in candidates(ids, weight, threshold, mode, gk).items()}


def training_fns(case):
    shape, mode = SHAPES[case[0]], case[1]
    ids, weight, threshold, gk = make_inputs(shape, mode)
    weight.requires_grad_(True)
    threshold.requires_grad_(True)
    upstream = torch.randn(ids.shape + (shape.dim,))

    def step(f):
        weight.grad = threshold.grad = None
        outs = f(ids, weight, threshold, mode, gk)
        outs = outs if isinstance(outs, tuple) else (outs,)
        torch.autograd.backward(outs, [upstream.view(-1, shape.dim) if o.dim() == 2 and o.shape[1] == shape.dim else
                                       torch.ones_like(o) for o in outs])

    return {name: (lambda f=f: step(f)) for name, f in candidates(ids, weight, threshold, mode, gk).items()}


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_forward(benchmark, interleaved, case):
    fns = forward_fns(case)
    benchmark.group = f"forward {case[0]} {case[1]}"
    interleaved(benchmark.group, "pep cpu", fns)
    benchmark(fns["pep cpu"])


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_forward_backward(benchmark, interleaved, case):
    fns = training_fns(case)
    benchmark.group = f"forward+backward {case[0]} {case[1]}"
    interleaved(benchmark.group, "pep cpu", fns)
    benchmark(fns["pep cpu"])
