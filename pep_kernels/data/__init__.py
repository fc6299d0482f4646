"""Datasets for CTR models: per-field local ids (B, F) and 0/1 labels."""

from .synthetic import SyntheticCTR, make_synthetic_ctr

__all__ = ["SyntheticCTR", "make_synthetic_ctr"]
