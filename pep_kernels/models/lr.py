"""Logistic regression whose weights are an embedding module, so PEP can prune a linear model too."""

import torch
from torch import nn

from .layers import embedding_dim_of


class LogisticRegression(nn.Module):
    """logit = bias + sum_f w[x_f], with the weights w held by `embedding` as a 1-dim table.

    `field_dims` is accepted for the signature every model shares; the embedding holds the field
    layout.
    """

    def __init__(self, field_dims, embedding):
        super().__init__()
        d = embedding_dim_of(embedding)
        if d != 1:
            raise ValueError(f"LogisticRegression needs an embedding with embedding_dim 1 (one weight per feature), got {d}")
        self.embedding = embedding
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return self.bias + self.embedding(x).sum((1, 2))
