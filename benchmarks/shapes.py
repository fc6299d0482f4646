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
    max_bag: int = 0  # > 0: each of the batch's B x F features is a bag of uniform 1..max_bag ids

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
        Shape("bags", 1_000_000, 32, 2048, 26, zipf=1.1, max_bag=40),
    )
}


def lookup_probabilities(shape):
    """Probability that one id is each row, float64 (N,): uniform, or Zipf over the row number."""
    if not shape.zipf:
        return torch.full((shape.rows,), 1 / shape.rows, dtype=torch.float64)
    weights = torch.arange(1, shape.rows + 1, dtype=torch.float64).pow(-shape.zipf)
    return weights / weights.sum()


def make_ids(shape, generator, batches=1):
    """`batches` batches of ids, (batches, B, F) int64, drawn from `generator`."""
    count = batches * shape.lookups
    if shape.zipf:
        ids = torch.multinomial(lookup_probabilities(shape), count, replacement=True, generator=generator)
    else:
        ids = torch.randint(0, shape.rows, (count,), generator=generator)
    return ids.view(batches, shape.batch, shape.fields)


def make_bags(shape, generator, batches=1):
    """`batches` batches of bags, each (ids (n,) int64, offsets (B x F,) int64 bag starts): every one
    of the batch's B x F features a bag of uniform 1..max_bag ids drawn as `make_ids` draws them."""
    out = []
    for _ in range(batches):
        lengths = torch.randint(1, shape.max_bag + 1, (shape.lookups,), generator=generator)
        count = int(lengths.sum())
        if shape.zipf:
            ids = torch.multinomial(lookup_probabilities(shape), count, replacement=True, generator=generator)
        else:
            ids = torch.randint(0, shape.rows, (count,), generator=generator)
        out.append((ids, torch.cumsum(lengths, 0) - lengths))
    return out


def make_inputs(shape, mode="feature_dim", device="cpu", dtype=torch.float32, seed=0):
    """(ids (B, F), weight, threshold) with thresholds that prune about half of the entries."""
    gen = torch.Generator().manual_seed(seed)
    ids = make_ids(shape, gen)[0].to(device)
    bound = (6 / (shape.rows + shape.dim)) ** 0.5  # Xavier-uniform, as PEPEmbedding
    weight = ((torch.rand(shape.rows, shape.dim, generator=gen) * 2 - 1) * bound).to(device, dtype)
    # sigmoid(s) * gk around bound / 2: about half of the entries survive.
    gk = bound
    s_shape = threshold_shape(mode, shape.rows, shape.dim, shape.fields)
    threshold = torch.full(s_shape, 0.0, device=device, dtype=torch.float32 if dtype != torch.float64 else dtype)
    return ids, weight, threshold, gk
