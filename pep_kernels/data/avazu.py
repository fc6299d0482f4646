"""Avazu (Kaggle CTR prediction, ``train`` CSV) as per-field local ids."""

from pathlib import Path

from ._streaming import Roles, TextFormat, encode_table

AVAZU_FIELD_NAMES = (
    "hour", "C1", "banner_pos",
    "site_id", "site_domain", "site_category",
    "app_id", "app_domain", "app_category",
    "device_id", "device_ip", "device_model", "device_type", "device_conn_type",
    "C14", "C15", "C16", "C17", "C18", "C19", "C20", "C21",
)  # fmt: skip
_HEADER_COLUMNS = ("id", "click") + AVAZU_FIELD_NAMES
AVAZU_FORMAT = TextFormat(",", quoting=False)  # the header names the columns
AVAZU_ROLES = Roles("click", ignore=("id",), fields=AVAZU_FIELD_NAMES)


def _check_header(path):
    """The header must have exactly ``id``, ``click`` and the 22 fields, in any order."""
    with open(path, encoding="latin-1", newline="\n") as lines:
        header = lines.readline().rstrip("\r\n").split(",")
    missing = [name for name in _HEADER_COLUMNS if name not in header]
    unexpected = [name for name in header if name not in _HEADER_COLUMNS]
    repeated = sorted({name for name in header if header.count(name) > 1})
    if missing or unexpected or repeated:
        raise ValueError(f"{path}, line 1: expected the Avazu header with columns {','.join(_HEADER_COLUMNS)}; "
                         f"missing {missing}, unexpected {unexpected}, repeated {repeated}")


def load_avazu(path, min_count=10, cache_dir=None, max_rows=None, on_error="raise"):
    """Load Avazu's ``train``: 22 categorical fields (``hour`` kept raw), label ``click``, ``id`` dropped.

    Same rare-value rule, reading, caching and malformed-line handling as :func:`load_criteo`;
    line numbers count the header as line 1. A header that is not Avazu's raises ValueError
    whatever ``on_error`` says, since no line of such a file could be read correctly.
    """
    if Path(path).is_dir():
        raise ValueError(f"avazu data file {path} is a folder; expected the data file itself")
    if not Path(path).is_file():
        raise FileNotFoundError(f"avazu data file not found: {path}")
    _check_header(path)
    return encode_table(path, "avazu", AVAZU_ROLES, AVAZU_FORMAT, min_count, cache_dir, max_rows, on_error)
