"""CTR models over any embedding module with the (B, F) -> (B, F, d) contract."""

from .fm import FactorizationMachine, FieldEmbedding

__all__ = ["FactorizationMachine", "FieldEmbedding"]
