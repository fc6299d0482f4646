"""A synthetic CTR task with planted structure, for tests, demos and scale runs.

Feature frequencies follow a Zipf law within each field, and each feature's true embedding has
its own number of useful dimensions (more for frequent features, none for a share of rare
ones), so a method that learns embedding sizes has something real to find. Labels are drawn from
a factorization machine over those true embeddings.
"""

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class SyntheticCTR:
    x: torch.Tensor  # (n, F) int64 per-field local ids
    y: torch.Tensor  # (n,) float32 labels in {0, 1}
    field_dims: list
    true_dims: torch.Tensor  # (sum(field_dims),) useful dimensions of each feature


def make_synthetic_ctr(num_samples, field_dims, embedding_dim=8, zipf=1.1, seed=0):
    if num_samples < 1 or not field_dims or min(field_dims) < 1 or embedding_dim < 1:
        raise ValueError(
            f"need num_samples >= 1, non-empty positive field_dims and embedding_dim >= 1, got "
            f"{num_samples}, {field_dims}, {embedding_dim}"
        )
    rng = np.random.default_rng(seed)
    columns, true_dims, vectors = [], [], []
    for size in field_dims:
        rank = np.arange(1, size + 1, dtype=np.float64)
        freq = rank**-zipf
        freq /= freq.sum()
        ids = rng.permutation(size)  # which local id gets which frequency rank
        columns.append(ids[rng.choice(size, size=num_samples, p=freq)])
        # Useful dims fall with frequency rank: the most frequent feature uses all of them.
        dims = np.clip(np.round(embedding_dim * (1 - np.log(rank) / np.log(size + 1)) + rng.normal(0, 1, size)),
                       0, embedding_dim).astype(np.int64)
        field_vectors = rng.normal(0, 1, (size, embedding_dim)) * (np.arange(embedding_dim) < dims[:, None])
        true_dims.append(dims[np.argsort(ids)])
        vectors.append(field_vectors[np.argsort(ids)])
    x = np.stack(columns, axis=1)
    offsets = np.concatenate([[0], np.cumsum(field_dims)[:-1]])
    v = np.concatenate(vectors)[x + offsets]  # (n, F, d)
    pairwise = 0.5 * (v.sum(1) ** 2 - (v**2).sum(1)).sum(1)
    logits = (pairwise - pairwise.mean()) / (pairwise.std() + 1e-12) * 1.5
    y = (rng.random(num_samples) < 1 / (1 + np.exp(-logits))).astype(np.float32)
    return SyntheticCTR(torch.from_numpy(x), torch.from_numpy(y), list(field_dims), torch.from_numpy(np.concatenate(true_dims)))

