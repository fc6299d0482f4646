"""The standard shapes of ../shared/BENCHMARKING.md and the inputs every benchmark builds."""

from dataclasses import dataclass

import torch

from pep_kernels import threshold_shape


@dataclass(frozen=True)
class Shape:
    name: str
    rows: int
    dim: int
    batch: int
    fields: int
    zipf: float = 0.0  # 0: uniform ids

    @property
    def lookups(self):
        return self.batch * self.fields


SHAPES = {
    s.name: s
    for s in (
        Shape("criteo", 1_000_000, 16, 2048, 39),
        Shape("avazu", 645_394, 24, 1024, 22),
        Shape("wide", 100_000, 128, 4096, 26),
        Shape("skewed", 1_000_000, 32, 2048, 39, zipf=1.1),
    )
}


def make_inputs(shape, mode="feature_dim", device="cpu", dtype=torch.float32, seed=0):
    """(ids (B, F), weight, threshold) with thresholds that prune about half of the entries."""
    gen = torch.Generator().manual_seed(seed)
    if shape.zipf:
        ranks = torch.arange(1, shape.rows + 1, dtype=torch.float64)
        ids = torch.multinomial(ranks.pow(-shape.zipf), shape.lookups, replacement=True, generator=gen)
    else:
        ids = torch.randint(0, shape.rows, (shape.lookups,), generator=gen)
    ids = ids.view(shape.batch, shape.fields).to(device)
    bound = (6 / (shape.rows + shape.dim)) ** 0.5  # Xavier-uniform, as PEPEmbedding
    weight = ((torch.rand(shape.rows, shape.dim, generator=gen) * 2 - 1) * bound).to(device, dtype)
    # sigmoid(s) * gk around bound / 2: about half of the entries survive.
    gk = bound
    s_shape = threshold_shape(mode, shape.rows, shape.dim, shape.fields)
    threshold = torch.full(s_shape, 0.0, device=device, dtype=torch.float32 if dtype != torch.float64 else dtype)
    return ids, weight, threshold, gk
