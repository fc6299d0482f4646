"""Avazu (Kaggle CTR prediction, ``train`` CSV) as per-field local ids."""

import operator
from pathlib import Path

from ._streaming import LineFormat, MalformedLine, encode_ctr_file, parse_label

AVAZU_FIELD_NAMES = (
    "hour", "C1", "banner_pos",
    "site_id", "site_domain", "site_category",
    "app_id", "app_domain", "app_category",
    "device_id", "device_ip", "device_model", "device_type", "device_conn_type",
    "C14", "C15", "C16", "C17", "C18", "C19", "C20", "C21",
)  # fmt: skip
_HEADER_COLUMNS = ("id", "click") + AVAZU_FIELD_NAMES


def _avazu_format(path):
    """The LineFormat for this file, with columns located by its header (which must have exactly
    ``id``, ``click`` and the 22 fields, in any order)."""
    with open(path, encoding="latin-1", newline="\n") as lines:
        header = lines.readline().rstrip("\r\n").split(",")
    missing = [name for name in _HEADER_COLUMNS if name not in header]
    unexpected = [name for name in header if name not in _HEADER_COLUMNS]
    repeated = sorted({name for name in header if header.count(name) > 1})
    if missing or unexpected or repeated:
        raise ValueError(f"{path}, line 1: expected the Avazu header with columns {','.join(_HEADER_COLUMNS)}; "
                         f"missing {missing}, unexpected {unexpected}, repeated {repeated}")
    label_column = header.index("click")
    select_fields = operator.itemgetter(*(header.index(name) for name in AVAZU_FIELD_NAMES))
    width = len(header)

    def parse_avazu_row(line):
        columns = line.split(",")
        if len(columns) != width:
            raise MalformedLine(f"expected {width} comma-separated columns, found {len(columns)}")
        return parse_label(columns[label_column]), select_fields(columns)

    return LineFormat("avazu", AVAZU_FIELD_NAMES, parse_avazu_row, header_lines=1)


def load_avazu(path, min_count=10, cache_dir=None, max_rows=None, on_error="raise"):
    """Load Avazu's ``train``: 22 categorical fields (``hour`` kept raw), label ``click``, ``id`` dropped.

    Same rare-value rule, streaming, caching and malformed-line handling as :func:`load_criteo`;
    line numbers count the header as line 1. A header that is not Avazu's raises ValueError
    whatever ``on_error`` says, since no line of such a file could be read correctly.
    """
    if Path(path).is_dir():
        raise ValueError(f"avazu data file {path} is a folder; expected the data file itself")
    if not Path(path).is_file():
        raise FileNotFoundError(f"avazu data file not found: {path}")
    return encode_ctr_file(path, _avazu_format(path), min_count, cache_dir, max_rows, on_error)
