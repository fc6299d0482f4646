"""`PEPEmbeddingBagCollection`: the contract of TorchRec's unsharded `EmbeddingBagCollection`
(a `KeyedJaggedTensor` in, a `KeyedTensor` of pooled features out) over bag tables of any kind.

`pep_kernels.convert` puts one in place of an `EmbeddingBagCollection`, holding the collection's
tables as PEP tables (`PEPEmbeddingBag`); the workflow swaps them for their retrained twins
(`MaskedEmbeddingBag`) and `convert_to_serving` for store-backed ones (`PrunedEmbeddingBag`),
under the same names (`embedding_bags.<table name>`, as in the collection's state_dict). The
forward is the collection's: each feature's bag of ids (its values, offsets and, for a weighted
collection, weights) pooled by its table, in the order of the collection's configs.

It is its own class, not a subclass: TorchRec's sharders and `DistributedModelParallel` would
take a subclass for a plain collection and shard its weights as one, dropping the thresholds.
Needs torchrec (`pip install --no-deps -r requirements-torchrec.txt`).
"""

from torch import nn

try:
    from torchrec.modules.embedding_modules import (get_embedding_names_by_table, process_pooled_embeddings,
                                                    reorder_inverse_indices)
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor
except ImportError as error:  # the optional extras
    raise ImportError("pep_kernels.collection needs torchrec: pip install --no-deps -r requirements-torchrec.txt") \
        from error


class PEPEmbeddingBagCollection(nn.Module):
    """An `EmbeddingBagCollection`'s forward over `tables` ({table name: bag module taking
    `(values, offsets, per_sample_weights=...)` with offsets of length B + 1}), one for each of
    `ebc`'s tables, whose configs (names, features, dims, weighting) it keeps."""

    def __init__(self, ebc, tables):
        super().__init__()
        configs = ebc.embedding_bag_configs()
        names = [config.name for config in configs]
        if sorted(tables) != sorted(names):
            raise ValueError(f"need one table for each of the collection's tables {names}, got {sorted(tables)}")
        for config in configs:
            table = tables[config.name]
            if (table.num_embeddings, table.embedding_dim) != (config.num_embeddings, config.embedding_dim):
                raise ValueError(f"table {config.name!r} is {table.num_embeddings} x {table.embedding_dim}, its config "
                                 f"{config.num_embeddings} x {config.embedding_dim}")
        self.embedding_bags = nn.ModuleDict({name: tables[name] for name in names})
        self._embedding_bag_configs = configs
        self._is_weighted = ebc.is_weighted()
        self._feature_names = [list(config.feature_names) for config in configs]
        self._embedding_names = [name for names in get_embedding_names_by_table(configs) for name in names]
        self._lengths_per_embedding = [config.embedding_dim for config in configs for _ in config.feature_names]

    def embedding_bag_configs(self):
        return self._embedding_bag_configs

    def is_weighted(self):
        return self._is_weighted

    def forward(self, features):
        if not isinstance(features, KeyedJaggedTensor):
            raise TypeError(f"features must be a KeyedJaggedTensor, got {type(features).__name__}")
        flat_feature_names = [name for names in self._feature_names for name in names]
        feature_dict = features.to_dict()
        missing = [name for name in flat_feature_names if name not in feature_dict]
        if missing:
            raise ValueError(f"the KeyedJaggedTensor lacks the features {missing} (it has {features.keys()})")
        inverse_indices = reorder_inverse_indices(features.inverse_indices_or_none(), flat_feature_names)
        pooled = []
        for table, names in zip(self.embedding_bags.values(), self._feature_names):
            for name in names:
                feature = feature_dict[name]
                weights = feature.weights() if self._is_weighted else None
                pooled.append(table(feature.values(), feature.offsets(), per_sample_weights=weights).float())
        return KeyedTensor(keys=self._embedding_names, values=process_pooled_embeddings(pooled, inverse_indices),
                           length_per_key=self._lengths_per_embedding)

    def extra_repr(self):
        return f"features={[name for names in self._feature_names for name in names]}, weighted={self._is_weighted}"

