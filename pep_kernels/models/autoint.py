"""AutoInt (Song et al. 2019) with its DNN part, as torchfm's AutomaticFeatureInteractionModel."""

import torch
from torch import nn

from .layers import LinearTerm, MultiLayerPerceptron, embedding_dim_of


class FieldSelfAttention(nn.MultiheadAttention):
    """`nn.MultiheadAttention(batch_first=True)` over the fields, as self-attention: same parameters and numbers.

    Over a handful of fields torch's CPU attention kernel is about 2x slower (forward and backward) than two
    einsums, and attention over fields is most of AutoInt's step.
    """

    def __init__(self, embed_dim, num_heads, dropout=0.0):
        super().__init__(embed_dim, num_heads, dropout=dropout, batch_first=True)

    def forward(self, x):
        batch, fields, _ = x.shape
        qkv = nn.functional.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(batch, fields, 3, self.num_heads, self.head_dim).unbind(2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * self.head_dim**-0.5
        weights = nn.functional.dropout(scores.softmax(-1), self.dropout, self.training)
        out = torch.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, fields, self.embed_dim)
        return self.out_proj(out)


class AutoInt(nn.Module):
    """logit = bias + linear term + self-attention over the fields + MLP over the concatenated embeddings.

    Follows torchfm and the PEP reference where they differ from the paper: the residual projection
    is added once, after the last attention layer, and attention dropout defaults to 0 (the
    reference's `att_dropout`). The reference's forward leaves out the linear term; torchfm keeps it.
    The PEP reference uses 3 layers, 2 heads, attention dim 64, and mlp_dims (100, 100) on
    MovieLens-1M, (400, 400, 400) on Criteo and Avazu.
    """

    def __init__(self, field_dims, embedding, atten_embed_dim=64, num_heads=2, num_layers=3, mlp_dims=(400, 400, 400),
                 dropout=0.2, has_residual=True, attention_dropout=0.0):
        super().__init__()
        d = embedding_dim_of(embedding)
        self.embedding = embedding
        self.linear = LinearTerm(field_dims)
        self.bias = nn.Parameter(torch.zeros(1))
        self.atten_embedding = nn.Linear(d, atten_embed_dim)
        self.self_attns = nn.ModuleList(
            FieldSelfAttention(atten_embed_dim, num_heads, dropout=attention_dropout) for _ in range(num_layers)
        )
        self.residual = nn.Linear(d, atten_embed_dim) if has_residual else None
        self.attn_fc = nn.Linear(len(field_dims) * atten_embed_dim, 1)
        self.mlp = MultiLayerPerceptron(len(field_dims) * d, mlp_dims, dropout)

    def forward(self, x):
        v = self.embedding(x)
        cross = self.atten_embedding(v)
        for self_attn in self.self_attns:
            cross = self_attn(cross)
        if self.residual is not None:
            cross = cross + self.residual(v)
        attention_logit = self.attn_fc(cross.relu().flatten(1)).squeeze(1)
        return self.bias + self.linear(x) + attention_logit + self.mlp(v.flatten(1)).squeeze(1)
