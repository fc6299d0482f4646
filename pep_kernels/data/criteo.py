"""Criteo (Kaggle display advertising challenge, ``train.txt``) as per-field local ids."""

import functools
import math
import re

from ._streaming import LineFormat, MalformedLine, encode_ctr_file, parse_label

CRITEO_INTEGER_FIELDS = tuple(f"I{i}" for i in range(1, 14))
CRITEO_CATEGORICAL_FIELDS = tuple(f"C{i}" for i in range(1, 27))
CRITEO_FIELD_NAMES = CRITEO_INTEGER_FIELDS + CRITEO_CATEGORICAL_FIELDS
_NUM_COLUMNS = 1 + len(CRITEO_FIELD_NAMES)
_FIRST_CATEGORICAL = 1 + len(CRITEO_INTEGER_FIELDS)  # column index, after the label
_INTEGER = re.compile(r"-?[0-9]+")


def log_squared_bucket(value: int) -> int:
    """``int(ln(v)^2)`` for v > 2, else ``v - 2``: the Criteo winners' discretization of counts.

    Buckets widen as values grow, so heavy-tailed counts get a small vocabulary. The two branches
    never collide: v > 2 gives buckets >= 1, v <= 2 gives buckets <= 0 (-1 -> -3, 0 -> -2, 2 -> 0).
    """
    return int(math.log(value) ** 2) if value > 2 else value - 2


@functools.lru_cache(maxsize=1 << 16)  # a column repeats few distinct raw strings
def criteo_integer_token(raw: str) -> str:
    """The token of one raw Criteo integer column: empty stays empty (its own token), else its bucket."""
    if raw == "":
        return ""
    if not _INTEGER.fullmatch(raw):
        raise ValueError(f"{raw!r} is not an integer")
    return str(log_squared_bucket(int(raw)))


def _parse_criteo_row(line):
    columns = line.split("\t")
    if len(columns) != _NUM_COLUMNS:
        raise MalformedLine(f"expected {_NUM_COLUMNS} tab-separated columns (label, 13 integer, 26 categorical), "
                            f"found {len(columns)}")
    label = parse_label(columns[0])
    integers = columns[1:_FIRST_CATEGORICAL]
    try:
        return label, list(map(criteo_integer_token, integers)) + columns[_FIRST_CATEGORICAL:]
    except ValueError:
        for field, raw in zip(CRITEO_INTEGER_FIELDS, integers):
            if raw != "" and not _INTEGER.fullmatch(raw):
                raise MalformedLine(f"integer field {field} is {raw!r}, expected an integer or empty") from None
        raise


CRITEO_FORMAT = LineFormat("criteo", CRITEO_FIELD_NAMES, _parse_criteo_row)


def load_criteo(path, min_count=10, cache_dir=None, max_rows=None, on_error="raise"):
    """Load Criteo's ``train.txt``: 39 fields (I1-I13 bucketed by :func:`criteo_integer_token`, C1-C26 raw).

    Each line is ``label<TAB>I1..I13<TAB>C1..C26``; any column but the label may be empty. Per field,
    values seen fewer than ``min_count`` times share one out-of-vocabulary id. The file is streamed
    twice and never held in memory; with ``cache_dir`` the encoding is stored there as .npy files and
    reused while the file, its modification time and the parameters stay the same.

    A malformed line (wrong column count, a non-integer in I1-I13, a label other than 0/1) raises
    ValueError with the file and 1-based line number; with ``on_error="skip"`` such lines are left
    out, counted in ``skipped_lines`` of the result, and reported with a warning. ``max_rows`` keeps
    only the first examples (for quick runs).
    """
    return encode_ctr_file(path, CRITEO_FORMAT, min_count, cache_dir, max_rows, on_error)
