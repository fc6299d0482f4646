"""Factorization machine (Rendle 2010), as in the PEP reference code (torchfm's FM)."""

import torch
from torch import nn

from ..ops.indices import offset_field_ids


class FactorizationMachine(nn.Module):
    """logit = bias + sum_f w[x_f] + 1/2 sum_d ((sum_f v_fd)^2 - sum_f v_fd^2).

    `embedding` maps per-field local ids (B, F) to (B, F, d): an `nn.Embedding`-like full table
    wrapped with field offsets, a `PEPEmbedding(field_dims=...)`, or any module of that contract.
    """

    def __init__(self, field_dims, embedding):
        super().__init__()
        self.embedding = embedding
        self.linear = nn.Embedding(sum(field_dims), 1)
        nn.init.zeros_(self.linear.weight)
        self.bias = nn.Parameter(torch.zeros(1))
        self.register_buffer("offsets", torch.tensor([0, *field_dims[:-1]]).cumsum(0), persistent=False)

    def forward(self, x):
        v = self.embedding(x)
        interaction = 0.5 * (v.sum(1).pow(2) - v.pow(2).sum(1)).sum(1)
        return self.bias + self.linear(x + self.offsets).sum((1, 2)) + interaction


class FieldEmbedding(nn.Module):
    """A plain full table with per-field offsets: the baseline PEP is compared with."""

    def __init__(self, field_dims, embedding_dim):
        super().__init__()
        self.embedding = nn.Embedding(sum(field_dims), embedding_dim)
        nn.init.xavier_uniform_(self.embedding.weight)
        self.register_buffer("field_dims", torch.tensor(field_dims), persistent=False)

    def forward(self, x):
        return self.embedding(offset_field_ids(x, self.field_dims))
