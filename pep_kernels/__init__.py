"""pep_kernels: fast, deployable PEP (Plug-in Embedding Pruning, ICLR 2021)."""

from ._validation import MODES as _MODES, threshold_shape
from .conversion import PEPConfig, convert, convert_to_serving
from .functional import soft_threshold_embedding, soft_threshold_embedding_bag
from .modules import (MaskedEmbedding, MaskedEmbeddingBag, PEPEmbedding, PEPEmbeddingBag, PrunedEmbedding,
                      PrunedEmbeddingBag)
from .store import SparseRowStore

THRESHOLD_MODES = tuple(_MODES)

__all__ = [
    "MaskedEmbedding", "MaskedEmbeddingBag", "PEPConfig", "PEPEmbedding", "PEPEmbeddingBag", "PrunedEmbedding",
    "PrunedEmbeddingBag", "SparseRowStore", "THRESHOLD_MODES", "convert", "convert_to_serving",
    "soft_threshold_embedding", "soft_threshold_embedding_bag", "threshold_shape",
]
