"""DLRM (Naumov et al. 2019) in plain PyTorch, as its reference code (dlrm_s_pytorch.py) builds it:
the model users bring, with one `nn.EmbeddingBag` per feature, for `pep_kernels.convert`.

Not one of the `(B, F)` models of `build_model`: it reads dense features, and categorical and
multi-hot features as bags of ids (`DLRMBatches` makes its batches from a `CTRData`).
"""

import math

import torch
from torch import nn


def _mlp(sizes, last_relu):
    layers = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(fan_in, fan_out))
        if last_relu or i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class DLRM(nn.Module):
    """logit = top MLP([bottom MLP(dense), pairwise dot products of the bottom output and the pooled
    embeddings]).

    `tables`: {feature name: number of ids}, one `nn.EmbeddingBag(n, embedding_dim, mode=mode)` per
    feature (held in `self.embeddings`, keyed by name), initialised uniform in +-sqrt(1/n) as the
    reference does. `num_dense` numeric features go through the bottom MLP (`bottom_mlp` hidden
    sizes, then `embedding_dim`, ReLU after every layer); with none there is no bottom MLP. The
    interaction is the reference's "dot": the dot products of every pair of the F (+1) vectors,
    beside the bottom MLP's output; the top MLP (`top_mlp` hidden sizes, ReLU) ends in one logit.

    `forward(dense, indices, offsets)`: `dense` (B, num_dense) float (None when num_dense is 0);
    `indices` and `offsets` one entry per table, in the order of `tables`: 1-D ids and the (B,)
    start of each example's bag in them (a one-hot feature's offsets are arange(B)), as
    `nn.EmbeddingBag` takes them. Returns logits (B,).
    """

    def __init__(self, num_dense, tables, embedding_dim=16, bottom_mlp=(64,), top_mlp=(64,), mode="sum"):
        super().__init__()
        if not tables:
            raise ValueError("DLRM needs at least one embedding table")
        self.num_dense, self.embedding_dim = num_dense, embedding_dim
        self.embeddings = nn.ModuleDict({name: nn.EmbeddingBag(n, embedding_dim, mode=mode)
                                         for name, n in tables.items()})
        for bag in self.embeddings.values():
            bound = math.sqrt(1 / bag.num_embeddings)
            nn.init.uniform_(bag.weight, -bound, bound)
        self.bottom = _mlp([num_dense, *bottom_mlp, embedding_dim], last_relu=True) if num_dense else None
        vectors = len(tables) + (1 if num_dense else 0)
        interaction = vectors * (vectors - 1) // 2 + (embedding_dim if num_dense else 0)
        self.top = _mlp([interaction, *top_mlp, 1], last_relu=False)
        pairs = torch.triu_indices(vectors, vectors, offset=1)
        self.register_buffer("pairs", pairs, persistent=False)

    def forward(self, dense, indices, offsets):
        if len(indices) != len(self.embeddings) or len(offsets) != len(self.embeddings):
            raise ValueError(f"need ids and offsets for each of the {len(self.embeddings)} tables "
                             f"{list(self.embeddings)}, got {len(indices)} and {len(offsets)}")
        vectors = [bag(ids, starts) for bag, ids, starts in zip(self.embeddings.values(), indices, offsets)]
        if self.bottom is not None:
            bottom = self.bottom(dense)
            vectors.insert(0, bottom)
        z = torch.stack(vectors, 1)
        dots = torch.bmm(z, z.transpose(1, 2))[:, self.pairs[0], self.pairs[1]]
        interaction = torch.cat([bottom, dots], 1) if self.bottom is not None else dots
        return self.top(interaction).squeeze(1)


class DLRMBatches:
    """The `(inputs, labels)` batches of a `CTRData` for `DLRM`: inputs `(dense, indices, offsets)`
    with one table per categorical field (`x` column: one id per example) and then per bag, in the
    order of `tables(data)`. Shuffled by `epoch_order(n, seed, epoch)` (`set_epoch` picks the
    epoch; `shuffle=False` keeps the data's order)."""

    def __init__(self, data, batch_size, seed=0, shuffle=True):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.data, self.batch_size, self.seed, self.shuffle, self.epoch = data, batch_size, seed, shuffle, 0

    @staticmethod
    def tables(data):
        """{feature name: number of ids}: the DLRM tables of `data`, fields first, then bags."""
        return {**dict(zip(data.field_names, data.field_dims)), **{bag.name: bag.num_values for bag in data.bags}}

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return -(-len(self.data) // self.batch_size)

    def __iter__(self):
        from ..train.batches import epoch_order  # pep_kernels.train imports the models: import it late

        n = len(self.data)
        order = epoch_order(n, self.seed, self.epoch) if self.shuffle else torch.arange(n)
        for rows in order.split(self.batch_size):
            part = self.data.take(rows)
            starts = torch.arange(len(rows))
            indices = [part.x[:, f] for f in range(part.x.shape[1])] + [bag.values for bag in part.bags]
            offsets = [starts] * part.x.shape[1] + [bag.offsets[:-1] for bag in part.bags]
            yield (part.dense, indices, offsets), part.y
