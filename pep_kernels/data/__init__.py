"""Datasets for CTR models: per-field local ids (B, F) and 0/1 labels."""

from .avazu import AVAZU_FIELD_NAMES, load_avazu
from .criteo import CRITEO_FIELD_NAMES, criteo_integer_token, load_criteo, log_squared_bucket
from .ctr import BagField, CTRData, split, synthetic_ctr_data
from .movielens import load_movielens_1m, load_movielens_100k, movielens_100k_dir
from .synthetic import SyntheticCTR, make_synthetic_ctr, write_criteo_like_file
from .table import load_table

__all__ = [
    "AVAZU_FIELD_NAMES",
    "BagField",
    "CRITEO_FIELD_NAMES",
    "CTRData",
    "SyntheticCTR",
    "criteo_integer_token",
    "load_avazu",
    "load_criteo",
    "load_movielens_100k",
    "load_movielens_1m",
    "load_table",
    "log_squared_bucket",
    "make_synthetic_ctr",
    "movielens_100k_dir",
    "split",
    "synthetic_ctr_data",
    "write_criteo_like_file",
]
