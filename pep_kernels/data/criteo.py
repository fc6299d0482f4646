"""Criteo (Kaggle display advertising challenge, ``train.txt``) as per-field local ids."""

from ._streaming import Roles, TextFormat, encode_table
from .buckets import criteo_integer_token, log_squared_bucket

CRITEO_INTEGER_FIELDS = tuple(f"I{i}" for i in range(1, 14))
CRITEO_CATEGORICAL_FIELDS = tuple(f"C{i}" for i in range(1, 27))
CRITEO_FIELD_NAMES = CRITEO_INTEGER_FIELDS + CRITEO_CATEGORICAL_FIELDS
CRITEO_FORMAT = TextFormat("\t", quoting=False, column_names=("label",) + CRITEO_FIELD_NAMES,
                           columns_hint=" (label, 13 integer, 26 categorical)")
CRITEO_ROLES = Roles("label", numeric=CRITEO_INTEGER_FIELDS)

__all__ = ["CRITEO_FIELD_NAMES", "criteo_integer_token", "load_criteo", "log_squared_bucket"]


def load_criteo(path, min_count=10, cache_dir=None, max_rows=None, on_error="raise"):
    """Load Criteo's ``train.txt``: 39 fields (I1-I13 bucketed by :func:`criteo_integer_token`, C1-C26 raw).

    Each line is ``label<TAB>I1..I13<TAB>C1..C26``; any column but the label may be empty. Per field,
    values seen fewer than ``min_count`` times share one out-of-vocabulary id. The file is read in
    chunks, column-wise, in one pass (`encode_table`); with ``cache_dir`` the encoding is stored
    there as .npy files and reused while the file, its modification time and the parameters stay
    the same.

    A malformed line (wrong column count, a non-integer in I1-I13, a label other than 0/1) raises
    ValueError with the file, the 1-based line number, the column and the value; with
    ``on_error="skip"`` such lines are left out, counted in ``skipped_lines`` of the result, and
    reported with a warning. ``max_rows`` keeps only the first examples (for quick runs).
    """
    return encode_table(path, "criteo", CRITEO_ROLES, CRITEO_FORMAT, min_count, cache_dir, max_rows, on_error)
