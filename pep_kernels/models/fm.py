"""Factorization machine (Rendle 2010) and DeepFM (Guo et al. 2017), as torchfm and the PEP reference."""

import torch
from torch import nn

from .layers import LinearTerm
from .widedeep import WideAndDeep


def pairwise_interaction(v):
    """sum_{f < g} <v_f, v_g> for v of shape (B, F, d), in O(F d): 1/2 sum_d ((sum_f v)^2 - sum_f v^2)."""
    return 0.5 * (v.sum(1).pow(2) - v.pow(2).sum(1)).sum(1)


class FactorizationMachine(nn.Module):
    """logit = bias + linear term + pairwise interactions of the embeddings.

    `embedding` maps per-field local ids (B, F) to (B, F, d): a `FieldEmbedding`, a
    `PEPEmbedding(field_dims=...)`, or any module of that contract.
    """

    def __init__(self, field_dims, embedding):
        super().__init__()
        self.embedding = embedding
        self.linear = LinearTerm(field_dims)
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return self.bias + self.linear(x) + pairwise_interaction(self.embedding(x))


class DeepFM(WideAndDeep):
    """Wide & Deep plus the FM interaction; all parts read the same embedding.

    The PEP reference uses mlp_dims (100, 100) on MovieLens-1M and (400, 400, 400) on Criteo and
    Avazu, dropout 0.2.
    """

    def forward(self, x):
        v = self.embedding(x)
        return self.bias + self.linear(x) + pairwise_interaction(v) + self.mlp(v.flatten(1)).squeeze(1)
