"""A table of one's own (CSV, TSV or Parquet) as per-field local ids, with bags and dense features."""

from pathlib import Path

from ._streaming import Roles, TextFormat, encode_table
from .ctr import CTRData

TEXT_DELIMITERS = {".csv": ",", ".tsv": "\t", ".tab": "\t"}
COMPRESSED_SUFFIXES = (".gz", ".bz2", ".zst", ".lz4")  # decompressed by pyarrow as the file is read
PARQUET_SUFFIXES = (".parquet", ".pq")
TABLE_FILES = "a .csv or .tsv file (also .gz, .bz2, .zst, .lz4), a .parquet file, or a folder of .parquet parts"


def table_text_format(path):
    """The TextFormat of a CSV or TSV file named ``path`` (header line, "double quotes"), or None for Parquet."""
    path = Path(path)
    if path.is_dir():
        return None
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSED_SUFFIXES:
        suffixes.pop()
    if suffixes and suffixes[-1] in PARQUET_SUFFIXES:
        return None
    if suffixes and suffixes[-1] in TEXT_DELIMITERS:
        return TextFormat(TEXT_DELIMITERS[suffixes[-1]], quoting=True)
    raise ValueError(f"table file {path}: cannot tell its format from its name; expected {TABLE_FILES}")


def load_table(path, label, *, numeric=(), bags=(), dense=(), ignore=(), bag_separator="|", min_count=10,
               cache_dir=None, max_rows=None, on_error="raise") -> CTRData:
    """Load a table: one row per example, a 0/1 ``label`` column, and feature columns.

    ``path`` is a CSV (``.csv``) or TSV (``.tsv``) file whose first line names the columns,
    compressed or not, a Parquet file, or a folder of Parquet parts (read in sorted order). Every
    column is a categorical field (one id per distinct value, the field's name its column's)
    unless it is named in

    - ``numeric``: integer counts, bucketed by Criteo's rule (:func:`log_squared_bucket`; an empty or
      missing value is a bucket of its own), one field each, in file order among the categorical;
    - ``bags``: multi-hot features (``CTRData.bags``, for a model with an EmbeddingBag): text with
      ``bag_separator`` between the values ("" is an empty bag), or a Parquet list column;
    - ``dense``: numbers kept as they are (``CTRData.dense``, float32, for a bottom MLP);
    - ``ignore``: not read.

    Ids follow :func:`load_criteo`'s rule: per field (and per bag, over all its values), values
    seen at least ``min_count`` times get ids by decreasing count, the rarer ones share one id. A
    categorical value is its text as written (CSV, TSV) or its Parquet value (a missing one is a
    value of its own). The reader, the cache (``cache_dir``), ``max_rows`` and malformed input
    (``on_error``: a ValueError naming the file, the line or row, the column and the value, or
    ``"skip"``) work as for Criteo. A label must be 0 or 1 (text "0"/"1", integers, booleans).
    """
    roles = Roles(label, numeric=numeric, bags=bags, dense=dense, ignore=ignore, bag_separator=bag_separator)
    return encode_table(path, "table", roles, table_text_format(path), min_count, cache_dir, max_rows, on_error)
