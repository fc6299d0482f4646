"""Wide & Deep (Cheng et al. 2016), as torchfm's WideAndDeepModel."""

import torch
from torch import nn

from .layers import LinearTerm, MultiLayerPerceptron, embedding_dim_of


class WideAndDeep(nn.Module):
    """logit = bias + linear term (wide) + MLP over the concatenated embeddings (deep).

    The PEP reference sizes MLPs (100, 100) on MovieLens-1M and (400, 400, 400) on Criteo and Avazu.
    """

    def __init__(self, field_dims, embedding, mlp_dims=(400, 400, 400), dropout=0.2):
        super().__init__()
        self.embedding = embedding
        self.linear = LinearTerm(field_dims)
        self.bias = nn.Parameter(torch.zeros(1))
        self.mlp = MultiLayerPerceptron(len(field_dims) * embedding_dim_of(embedding), mlp_dims, dropout)

    def forward(self, x):
        return self.bias + self.linear(x) + self.mlp(self.embedding(x).flatten(1)).squeeze(1)
