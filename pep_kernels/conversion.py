"""PEP into a model as it is, in one call, and out of it for serving (torchao's `quantize_` pattern).

`pep_kernels.convert(model, PEPConfig(...), filter_fn)` swaps, in place, every `nn.Embedding`,
`nn.EmbeddingBag` and table of an unsharded TorchRec `EmbeddingBagCollection` that `filter_fn`
accepts for its PEP counterpart (`PEPEmbedding`, `PEPEmbeddingBag`, `PEPEmbeddingBagCollection`),
with the same weights and forward contract: the model's code does not change. After the search
and the retrain, `convert_to_serving(model, stores)` swaps the trained tables (PEP or masked) for
store-backed `PrunedEmbedding` / `PrunedEmbeddingBag` modules, which score what they scored.

Tables are named by their fully qualified name in the model (`model.named_modules()`), the names
the workflow (`pep_kernels.train.tables`) files their snapshots and stores under.
"""

import math
import sys
from dataclasses import dataclass

import torch
from torch import nn

from .functional import resolve_backend
from .modules import (MaskedEmbedding, MaskedEmbeddingBag, PEPEmbedding, PEPEmbeddingBag, PrunedEmbedding,
                      PrunedEmbeddingBag)
from .optim import RowOptimizer
from .store import SparseRowStore

# The threshold modes of a table without fields (the field modes need PEPEmbedding's field_dims).
TABLE_MODES = ("global", "dimension", "feature", "feature_dim")


@dataclass(frozen=True)
class PEPConfig:
    """How `convert` makes each PEP table: PEPEmbedding's constructor arguments.

    `optimizer` (a `pep_kernels.optim` rule, e.g. `Adam(lr=1e-3, weight_decay=1e-5)`) makes each
    table train itself in the backward (the fused row optimizers); None leaves W and s to the
    model's torch optimizer, with ordinary gradients."""

    threshold_mode: str = "feature_dim"
    threshold_init: float = -15.0
    threshold_slope: float = 0.0
    gk: float = 1.0
    optimizer: RowOptimizer | None = None
    backend: str = "auto"

    def __post_init__(self):
        if self.threshold_mode not in TABLE_MODES:
            raise ValueError(f"threshold_mode must be one of {TABLE_MODES} (the field modes need a table of fields), "
                             f"got {self.threshold_mode!r}")
        for name in ("threshold_init", "threshold_slope", "gk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.optimizer is not None and not isinstance(self.optimizer, RowOptimizer):
            raise TypeError(f"optimizer must be None or a pep_kernels.optim rule (SGD, Adagrad, Adam), "
                            f"got {self.optimizer!r}")
        resolve_backend(self.backend, torch.device("cpu"))

    def table_arguments(self):
        return dict(threshold_mode=self.threshold_mode, threshold_init=self.threshold_init,
                    threshold_slope=self.threshold_slope, gk=self.gk, optimizer=self.optimizer, backend=self.backend)


def _torchrec_ebc_type():
    """TorchRec's EmbeddingBagCollection class if torchrec is imported (a model can hold one only then)."""
    module = sys.modules.get("torchrec.modules.embedding_modules")
    return None if module is None else module.EmbeddingBagCollection


def _check_plain_table(fqn, table):
    """ValueError for an nn.Embedding / nn.EmbeddingBag option that PEP cannot keep."""
    if table.max_norm is not None:
        raise ValueError(f"{fqn}: max_norm={table.max_norm} renormalises looked-up rows; PEP tables do not")
    if table.scale_grad_by_freq:
        raise ValueError(f"{fqn}: scale_grad_by_freq is not supported by PEP tables")
    if not table.weight.requires_grad:
        raise ValueError(f"{fqn}: the table is frozen (its weight does not require grad); leave it out with filter_fn")
    if table.padding_idx is not None and bool(table.weight[table.padding_idx].detach().any()):
        # A zero row stays zero under PEP: no entry passes the threshold, so it gets no gradient.
        raise ValueError(f"{fqn}: the row of padding_idx {table.padding_idx} must be zeros (as nn.Embedding "
                         "initialises it), got non-zero entries")


def _pep_table(fqn, table, config):
    """The PEP counterpart of an nn.Embedding or nn.EmbeddingBag, with its weights."""
    _check_plain_table(fqn, table)
    weight = table.weight.detach()
    common = dict(sparse=table.sparse and config.optimizer is None, device=weight.device, dtype=weight.dtype,
                  **config.table_arguments())
    if isinstance(table, nn.EmbeddingBag):
        if table.mode not in ("sum", "mean"):
            raise ValueError(f"{fqn}: mode {table.mode!r}; PEP bags pool by 'sum' or 'mean'")
        pep = PEPEmbeddingBag(table.num_embeddings, table.embedding_dim, mode=table.mode,
                              padding_idx=table.padding_idx, include_last_offset=table.include_last_offset, **common)
    else:
        pep = PEPEmbedding(table.num_embeddings, table.embedding_dim, **common)
    with torch.no_grad():
        pep.weight.copy_(weight)
    return pep


def _pep_collection(fqn, collection, config, filter_fn):
    """The PEPEmbeddingBagCollection of a TorchRec EmbeddingBagCollection, its tables that
    filter_fn accepts converted (None if it accepts none)."""
    from .collection import PEPEmbeddingBagCollection

    tables, converted = {}, False
    for name, table in collection.embedding_bags.items():
        table_fqn = f"{fqn}.embedding_bags.{name}".lstrip(".")
        if type(table) is nn.EmbeddingBag and filter_fn(table, table_fqn):
            table, converted = _pep_table(table_fqn, table, config), True
        tables[name] = table
    return PEPEmbeddingBagCollection(collection, tables) if converted else None


def _converted(fqn, module, config, filter_fn):
    """The PEP counterpart of `module` (None: not a table `convert` takes, or left out by filter_fn)."""
    if type(module) in (nn.Embedding, nn.EmbeddingBag):
        return _pep_table(fqn, module, config) if filter_fn(module, fqn) else None
    collection_type = _torchrec_ebc_type()
    if collection_type is not None and type(module) is collection_type:
        return _pep_collection(fqn, module, config, filter_fn)
    return None


def convert(model, config=None, filter_fn=None):
    """Swaps, in place, the embedding tables of `model` that `filter_fn(module, fqn)` accepts
    (default: all) for PEP tables made by `config` (a `PEPConfig`; default `PEPConfig()`),
    keeping their weights and forward contract; returns `model` (the new table itself when
    `model` is a table).

    Tables: `nn.Embedding` -> `PEPEmbedding` (ids of any shape; a `padding_idx` row must be
    zeros: it stays zeros); `nn.EmbeddingBag` -> `PEPEmbeddingBag` (mode sum or mean, its
    `padding_idx` and `include_last_offset`); a TorchRec `EmbeddingBagCollection` (unsharded) ->
    `PEPEmbeddingBagCollection` over its tables, those filter_fn accepts (named
    `<collection>.embedding_bags.<table>`) converted. Subclasses are left alone (their forward may
    differ); options PEP cannot keep (max_norm, scale_grad_by_freq, mode "max", a frozen table)
    are a ValueError naming the table.
    """
    config = PEPConfig() if config is None else config
    if not isinstance(config, PEPConfig):
        raise TypeError(f"config must be a PEPConfig, got {type(config).__name__}")
    filter_fn = filter_fn or (lambda module, fqn: True)
    root = _converted("", model, config, filter_fn)
    if root is not None:
        return root
    replaced = []
    for fqn, module in list(model.named_modules()):
        if any(fqn.startswith(prefix + ".") for prefix in replaced):  # a table of a converted collection
            continue
        new = _converted(fqn, module, config, filter_fn)
        if new is not None:
            _replace(model, fqn, new)
            replaced.append(fqn)
    return model


def _replace(model, fqn, new):
    parent, _, name = fqn.rpartition(".")
    setattr(model.get_submodule(parent), name, new)


def pep_tables(model):
    """{fqn: table} of the PEP tables in `model` (what a search prunes), in module order."""
    return {fqn: m for fqn, m in model.named_modules() if isinstance(m, PEPEmbedding)}


def trained_tables(model):
    """{fqn: table} of the tables `convert_to_serving` swaps: PEP tables and their retrained
    (masked) twins."""
    return {fqn: m for fqn, m in model.named_modules() if isinstance(m, (PEPEmbedding, MaskedEmbedding))}


def _field_dims(table):
    return None if table.field_dims is None else table.field_dims.tolist()


def masked_twin(table, weight, mask, copy=True):
    """The retrain stage of a PEP table: a masked table of the same contract over `weight` and
    `mask` (`MaskedEmbedding`'s `copy`)."""
    if isinstance(table, PEPEmbeddingBag):
        return MaskedEmbeddingBag(weight, mask, mode=table.mode, include_last_offset=table.include_last_offset,
                                  padding_idx=table.padding_idx, copy=copy)
    if isinstance(table, PEPEmbedding):
        return MaskedEmbedding(weight, mask, field_dims=_field_dims(table), copy=copy)
    raise TypeError(f"no masked twin for {type(table).__name__}")


def serving_twin(table, store):
    """The store-backed serving module of a trained table, with its contract."""
    if isinstance(table, (PEPEmbeddingBag, MaskedEmbeddingBag)):
        return PrunedEmbeddingBag(store, mode=table.mode, padding_idx=table.padding_idx,
                                  include_last_offset=table.include_last_offset)
    if isinstance(table, (PEPEmbedding, MaskedEmbedding)):
        return PrunedEmbedding(store, field_dims=_field_dims(table))
    raise TypeError(f"no serving module for {type(table).__name__}")


def convert_to_serving(model, stores=None, *, values="fp32", encoding="auto"):
    """Swaps, in place, every trained table of `model` (`trained_tables`) for its store-backed
    serving module, which scores what it scored (bitwise with fp32 stores); returns `model`.

    `stores` maps each table's fqn to its `SparseRowStore` (e.g. read back from the files the
    workflow exported); None builds them from the tables (`SparseRowStore.from_module`, with
    `values` and `encoding`)."""
    tables = trained_tables(model)
    if not tables:
        raise ValueError("the model holds no PEP or retrained table to serve")
    if stores is None:
        stores = {fqn: SparseRowStore.from_module(table, values=values, encoding=encoding)
                  for fqn, table in tables.items()}
    missing, unexpected = sorted(set(tables) - set(stores)), sorted(set(stores) - set(tables))
    if missing or unexpected:
        raise ValueError(f"stores must name the model's tables {sorted(tables)}: missing {missing}, "
                         f"unexpected {unexpected}")
    for fqn, table in tables.items():
        store = stores[fqn]
        if (store.num_embeddings, store.embedding_dim) != (table.num_embeddings, table.embedding_dim):
            raise ValueError(f"{fqn}: the store holds a {store.num_embeddings} x {store.embedding_dim} table, the "
                             f"model's is {table.num_embeddings} x {table.embedding_dim}")
        serving = serving_twin(table, store.to(table.weight.device))
        if fqn == "":
            return serving
        _replace(model, fqn, serving)
    return model
