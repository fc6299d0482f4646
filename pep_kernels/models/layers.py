"""Pieces the CTR models share: the baseline table, the linear term, the MLP, reading d."""

import torch
from torch import nn

from ..ops.indices import offset_field_ids


class FieldEmbedding(nn.Module):
    """A plain full table with per-field offsets: the baseline PEP is compared with."""

    def __init__(self, field_dims, embedding_dim):
        super().__init__()
        self.embedding_dim = embedding_dim
        self.embedding = nn.Embedding(sum(field_dims), embedding_dim)
        nn.init.xavier_uniform_(self.embedding.weight)
        self.register_buffer("field_dims", torch.tensor(field_dims), persistent=False)

    def forward(self, x):
        return self.embedding(offset_field_ids(x, self.field_dims))


class LinearTerm(nn.Module):
    """sum_f w[x_f]: the first-order term of FM, DeepFM, AutoInt and Wide&Deep (torchfm's FeaturesLinear).

    It has its own full table, apart from the (prunable) embedding, as in the reference code; the
    models keep the global bias themselves. Zero-initialised, so a model starts from its other
    parts alone (torchfm draws N(0, 1)).
    """

    def __init__(self, field_dims):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(sum(field_dims), 1))
        self.register_buffer("field_dims", torch.tensor(field_dims), persistent=False)

    def forward(self, x):
        return nn.functional.embedding(offset_field_ids(x, self.field_dims), self.weight).sum((1, 2))


def embedding_dim_of(embedding):
    """d of any (B, F) -> (B, F, d) module; models size their layers from it, not from an argument."""
    try:
        return embedding.embedding_dim
    except AttributeError:
        raise TypeError(
            f"the embedding module ({type(embedding).__name__}) must have an `embedding_dim` attribute"
        ) from None


class MultiLayerPerceptron(nn.Module):
    """torchfm's MLP: (Linear, BatchNorm1d, ReLU, Dropout) per hidden size, then Linear to 1.

    Without `output_layer` the last hidden layer is the output, for models that combine it with
    another branch first; `output_dim` says its width.
    """

    def __init__(self, input_dim, hidden_dims, dropout, output_layer=True):
        super().__init__()
        layers = []
        for hidden_dim in hidden_dims:
            layers += [nn.Linear(input_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(), nn.Dropout(dropout)]
            input_dim = hidden_dim
        if output_layer:
            layers.append(nn.Linear(input_dim, 1))
            input_dim = 1
        self.output_dim = input_dim
        self.mlp = nn.Sequential(*layers)

    def forward(self, x):
        return self.mlp(x)
