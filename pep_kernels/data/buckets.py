"""Criteo's discretization of integer counts, shared by the loaders."""

import functools
import math
import re

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


def numeric_token(value):
    """The token of one value of a numeric column, as read from text (bytes, str) or Parquet
    (int, float, None): the bucket of an integer as :func:`criteo_integer_token` writes it, the
    empty token for a missing value; None when the value is not an integer."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if isinstance(value, str):
        try:
            return criteo_integer_token(value)
        except ValueError:
            return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(log_squared_bucket(value))
    return None
