"""One column-wise encoder for CTR tables (Criteo, Avazu, CSV/TSV/Parquet files), with an on-disk cache.

The inputs are tens of GB, so they are read in chunks (about CHUNK_BYTES of text, or Parquet row
batches) by pyarrow, whose readers parse and dictionary-encode whole columns in C++, on a worker
thread while the previous chunk is encoded. One pass over the input merges each chunk's distinct
values into a vocabulary per field (pyarrow's dictionary unifier, also C++), counts them, and
writes every row's provisional id (its value's position in the vocabulary) to a scratch file;
the final ids (by decreasing count, ties by value, rare values sharing one id) are then one
numpy take per field over that file. Python touches only the labels, the distinct raw values of
numeric columns and the rows found malformed. Memory: the vocabularies, a few chunks in flight,
and the output itself.
"""

import csv
import functools
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from .buckets import numeric_token
from .ctr import BagField, CTRData

ON_ERROR_CHOICES = ("raise", "skip")
# Bump when the encoding changes, so caches written by older code are not reused.
_CACHE_VERSION = 2
# Text per chunk: large enough that per-chunk Python work is small next to the C++ work, small
# enough that the chunks in flight (two parsing, one parsed, one encoding) stay a few hundred MB.
CHUNK_BYTES = 32 << 20
PARQUET_BATCH_ROWS = 1 << 17
_PARSE_BLOCK_BYTES = 4 << 20  # the CSV reader parses a chunk in blocks of this size
_BLOCK_ROWS = 1 << 14  # rows per block when the cache's ids are written or read
_REMAP_BLOCK_ROWS = 1 << 16  # rows per block when provisional ids become final ones
_PENDING_ROWS = 1 << 23  # rows of a field whose values may wait to be merged into its vocabulary
_NUMBER = r"^\s*[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?\s*$"


@dataclass(frozen=True)
class Roles:
    """What the columns of a table are: one label column (0/1), and the features.

    Columns not named take the role ``categorical`` (one id per distinct value), in file order,
    unless ``fields`` lists the single-id fields (categorical and numeric) in the order wanted.
    ``numeric`` columns hold integer counts, bucketed by Criteo's rule (`log_squared_bucket`;
    empty is a bucket of its own); ``bags`` hold lists of values (``bag_separator`` between them
    in text, or a Parquet list column); ``dense`` hold numbers kept as they are (CTRData.dense);
    ``ignore`` are not read.
    """

    label: str
    numeric: tuple = ()
    bags: tuple = ()
    dense: tuple = ()
    ignore: tuple = ()
    bag_separator: str = "|"
    fields: tuple | None = None

    def __post_init__(self):
        for role in ("numeric", "bags", "dense", "ignore"):
            names = getattr(self, role)
            if isinstance(names, str):
                raise ValueError(f"{role} must be a sequence of column names, got the string {names!r}")
            object.__setattr__(self, role, tuple(str(name) for name in names))
        if self.fields is not None:
            object.__setattr__(self, "fields", tuple(str(name) for name in self.fields))
        if not isinstance(self.bag_separator, str) or not self.bag_separator:
            raise ValueError(f"bag_separator must be a non-empty string, got {self.bag_separator!r}")
        named = [self.label, *self.numeric, *self.bags, *self.dense, *self.ignore]
        repeated = sorted({name for name in named if named.count(name) > 1})
        if repeated:
            raise ValueError(f"columns {repeated} are given more than one role (label {self.label!r}, numeric "
                             f"{list(self.numeric)}, bags {list(self.bags)}, dense {list(self.dense)}, ignore "
                             f"{list(self.ignore)})")

    def single_id_fields(self, columns, source):
        """The categorical and numeric fields, in output order, checked against the file's columns."""
        missing = [name for name in [self.label, *self.numeric, *self.bags, *self.dense, *self.ignore,
                                     *(self.fields or ())] if name not in columns]
        if missing:
            shown = ", ".join(map(repr, columns[:60])) + (", ..." if len(columns) > 60 else "")
            raise ValueError(f"{source}: no column named {', '.join(map(repr, missing))}; its columns are: {shown}")
        if self.fields is not None:
            return list(self.fields)
        taken = {self.label, *self.bags, *self.dense, *self.ignore}
        return [name for name in columns if name not in taken]

    def needed(self, fields):
        return [self.label, *fields, *self.bags, *self.dense]


@dataclass(frozen=True)
class TextFormat:
    """How a delimited text file is split into columns."""

    delimiter: str
    quoting: bool  # honour "double quotes" (CSV); the Criteo and Avazu logs are split on the delimiter only
    column_names: tuple | None = None  # None: the first line is a header naming the columns
    columns_hint: str = ""  # what the columns are, for the wrong-column-count message

    def describe(self):
        return {"\t": "tab", ",": "comma"}.get(self.delimiter, repr(self.delimiter))


@dataclass
class _Chunk:
    """Rows of one file that parsed, and the lines or rows that did not."""

    table: pa.Table  # the needed columns
    source: Path
    unit: str  # "line" or "row"
    positions: np.ndarray  # (rows,) 1-based line or row number of each table row
    dropped: list  # (position, problem) of lines that are not in the table (a wrong column count)
    bad_rows: dict  # table row -> problem (a str, or a function that writes it): malformed values, empty lines
    lines: int = 0  # lines of text the chunk holds (text files)
    decoded: dict = None  # the needed columns, decoded (_decode)


@dataclass
class _Problems:
    skipped: int = 0
    first: str = ""
    unit: str = "line"


def encode_table(path, name, roles, text_format, min_count, cache_dir, max_rows, on_error) -> CTRData:
    """Encode a table into per-field local ids, reusing a cached encoding when one matches.

    ``path`` is a delimited text file (``text_format``; compressed .gz/.bz2/.zst/.lz4 files are
    decompressed as they are read), or with ``text_format=None`` a Parquet file or a folder of
    Parquet parts (``*.parquet`` below it, read in sorted order). Per field, values seen at least
    ``min_count`` times get ids ``0, 1, ...`` in order of decreasing frequency (ties by value);
    all rarer values share the next id, which exists only if some value is rare, so every id in
    ``field_dims`` occurs in the data. Bags follow the same rule over all their items.
    ``max_rows`` caps the number of examples read from the top (malformed lines skipped along the
    way do not count).

    A malformed line or row raises ValueError naming the file, the line (text) or row (Parquet),
    the column and the value; with ``on_error="skip"`` it is left out, counted in
    ``skipped_lines`` and reported with a warning.

    The cache entry is keyed on the input's resolved path, size and modification time (every
    part's, for a folder), the roles and format, the parameters and the encoder version; any
    change builds a new entry.
    """
    if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 1:
        raise ValueError(f"min_count must be an integer >= 1, got {min_count!r}")
    if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1):
        raise ValueError(f"max_rows must be None or an integer >= 1, got {max_rows!r}")
    if on_error not in ON_ERROR_CHOICES:
        raise ValueError(f"on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}")
    path = Path(path)
    files = _input_files(path, name, parquet=text_format is None)
    params = {
        "format": name,
        "path": str(path.resolve()),
        "files": [[str(f.relative_to(path)) if f != path else "", f.stat().st_size, f.stat().st_mtime_ns]
                  for f in files],
        "roles": asdict(roles),
        "text_format": None if text_format is None else asdict(text_format),
        "min_count": min_count,
        "max_rows": max_rows,
        "on_error": on_error,
        "version": _CACHE_VERSION,
    }
    params = json.loads(json.dumps(params))  # as read back from meta.json (tuples become lists)
    if cache_dir is None:
        with tempfile.TemporaryDirectory(prefix="pep-encode-") as scratch:
            return _encode(path, files, name, roles, text_format, params, Path(scratch), output_dir=None)
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    entry = Path(cache_dir) / f"{name}-{path.name}-{key}"
    cached = _load_cache_entry(entry, params)
    if cached is not None:
        return cached
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    # Build in a private directory and rename it into place, so a crash or a concurrent build never
    # leaves a half-written entry that a later call would trust.
    staging = Path(tempfile.mkdtemp(prefix=f"{entry.name}.partial-", dir=cache_dir))
    try:
        data = _encode(path, files, name, roles, text_format, params, staging, output_dir=staging)
        shutil.rmtree(entry, ignore_errors=True)  # an unreadable entry under the same key
        os.replace(staging, entry)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return data


def _input_files(path, name, parquet):
    if path.is_dir():
        if not parquet:
            raise ValueError(f"{name} data file {path} is a folder; expected the data file itself")
        parts = sorted(p for p in path.rglob("*.parquet") if p.is_file())
        if not parts:
            raise ValueError(f"{name} data folder {path} has no *.parquet files")
        return parts
    if not path.is_file():
        raise FileNotFoundError(f"{name} data file not found: {path}")
    return [path]


class _Vocabulary:
    """The distinct values of one field (or bag), their counts, and every row's provisional id.

    Each chunk brings its values dictionary-encoded (its distinct values, and an index per row).
    The chunks' dictionaries are merged into the vocabulary in C++ (pyarrow's dictionary unifier,
    which keeps the vocabulary's order and appends new values), in batches that grow with the
    vocabulary, so that re-hashing it costs O(values seen) over the whole file; a batch is also
    merged once it holds _PENDING_ROWS rows, which bounds its memory. Each row's provisional id
    (its value's position in the vocabulary, -1 for a missing value) goes to a scratch file.
    """

    def __init__(self, scratch_path, what):
        self.what = what  # "column 'C3' of FILE", for errors
        self.values = None  # pa.Array: the value of each provisional id
        self.counts = np.zeros(0, np.int64)
        self.missing = 0  # rows with a missing (null) value, a value of its own
        self.pending, self.pending_values, self.pending_rows = [], 0, 0
        self.scratch_path = scratch_path
        self.scratch = open(scratch_path, "wb")

    def add(self, dictionary, indices):
        """One chunk: its distinct values (pa.Array, no two equal) and each row's index into them
        (int32; len(dictionary) for a missing value)."""
        self.pending.append((dictionary, indices))
        self.pending_values += len(dictionary)
        self.pending_rows += len(indices)
        vocabulary_size = 0 if self.values is None else len(self.values)
        if self.pending_values >= vocabulary_size or self.pending_rows >= _PENDING_ROWS:
            self._merge()

    def _merge(self):
        dictionaries = ([] if self.values is None else [self.values]) + [d for d, _ in self.pending]
        kind = dictionaries[0].type
        for d, dictionary in enumerate(dictionaries):
            if dictionary.type != kind:
                try:
                    dictionaries[d] = dictionary.cast(kind)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
                    raise ValueError(f"{self.what} holds values of type {kind} and of type {dictionary.type}; "
                                     "expected one type") from None
        merged = pa.chunked_array([pa.DictionaryArray.from_arrays(pa.array(np.arange(len(d), dtype=np.int32)), d)
                                   for d in dictionaries]).unify_dictionaries()
        self.values = merged.chunk(0).dictionary
        self.counts = np.concatenate([self.counts, np.zeros(len(self.values) - len(self.counts), np.int64)])
        for (dictionary, indices), chunk in zip(self.pending, merged.chunks[len(dictionaries) - len(self.pending):]):
            ids = np.append(chunk.indices.to_numpy(), np.int32(-1))  # the slot after the values: missing
            counts = np.bincount(indices, minlength=len(ids))
            self.counts[ids[:-1]] += counts[:-1]
            self.missing += int(counts[-1])
            self.scratch.write(ids[indices].tobytes())
        self.pending, self.pending_values, self.pending_rows = [], 0, 0

    def final_ids(self, min_count):
        """(final id of each provisional id, then of the missing value (the id -1 reads it); number of ids).

        Values seen at least min_count times by decreasing count, ties by value (a missing value
        after the others), then one id for all rarer values if there are any."""
        if self.pending:
            self._merge()
        self.scratch.close()
        values, counts = self.values, np.append(self.counts, self.missing)
        if self.missing:
            values = pa.concat_arrays([values, pa.nulls(1, values.type)])
        frequent = np.flatnonzero(counts >= min_count)  # only they need an order: the rare share one id
        order = pc.sort_indices(pa.table({"count": counts[frequent], "value": values.take(pa.array(frequent))}),
                                sort_keys=[("count", "descending"), ("value", "ascending")]).to_numpy()
        final = np.full(len(counts), len(frequent), np.int64)
        final[frequent[order]] = np.arange(len(frequent))
        rare = bool(((counts > 0) & (counts < min_count)).any())  # values of skipped rows only have count 0
        return final, len(frequent) + rare

    def close(self):
        self.scratch.close()


def _encode(path, files, name, roles, text_format, params, scratch, output_dir):
    """The one pass, then the final ids; with an output_dir the arrays and their metadata are written there."""
    fields, chunks = _open_chunks(path, files, name, roles, text_format)
    vocabularies = [_Vocabulary(scratch / f"{i}.provisional", f"column {column!r} of {path}")
                    for i, column in enumerate([*fields, *roles.bags])]
    labels, bag_lengths, dense = [], [[] for _ in roles.bags], []
    problems = _Problems()
    num_rows, max_rows = 0, params["max_rows"]
    try:
        with tqdm(desc=f"{name} {path.name}: encoding", unit=" rows", mininterval=1, disable=None) as progress:
            for chunk in chunks:
                columns = chunk.decoded
                room = None if max_rows is None else max_rows - num_rows
                keep = _keep_rows(chunk, problems, params["on_error"], room)
                every_row = len(keep) == chunk.table.num_rows
                labels.append(columns[roles.label][keep])
                for f, field in enumerate(fields):
                    dictionary, indices = columns[field]
                    vocabularies[f].add(dictionary, indices if every_row else indices[keep])
                for b, bag in enumerate(roles.bags):
                    dictionary, indices, offsets = columns[bag]
                    lengths = np.diff(offsets)
                    kept = np.zeros(len(lengths), bool)
                    kept[keep] = True
                    items = indices if every_row else indices[np.repeat(kept, lengths)]
                    vocabularies[len(fields) + b].add(dictionary, items)
                    bag_lengths[b].append(lengths[keep])
                if roles.dense:
                    dense.append(np.stack([columns[d][keep] for d in roles.dense], axis=1))
                num_rows += len(keep)
                progress.update(len(keep))
                if num_rows == max_rows:
                    break
        if num_rows == 0:
            raise ValueError(f"{path}: no well-formed data rows"
                             + (f" ({_skip_summary(problems)})" if problems.skipped else ""))
        maps = [vocabulary.final_ids(params["min_count"]) for vocabulary in vocabularies]
    finally:
        chunks.close()
        for vocabulary in vocabularies:
            vocabulary.close()
    x = np.empty((num_rows, len(fields)), np.int64)
    _write_final_ids(vocabularies[:len(fields)], [final for final, _ in maps[:len(fields)]], x)
    bags = []
    for b, bag in enumerate(roles.bags):
        final, num_values = maps[len(fields) + b]
        offsets = np.concatenate([[0], np.cumsum(np.concatenate(bag_lengths[b]))]).astype(np.int64)
        values = np.empty(offsets[-1], np.int64)
        _write_final_ids([vocabularies[len(fields) + b]], [final], values[:, None])
        # max(.., 1): a bag column whose every bag is empty still has a valid (unused) id range
        bags.append(BagField(bag, max(num_values, 1), torch.from_numpy(values), torch.from_numpy(offsets)))
    if problems.skipped:
        warnings.warn(_skip_summary(problems), stacklevel=4)
    field_dims = [dim for _, dim in maps[:len(fields)]]
    data = CTRData(torch.from_numpy(x), torch.from_numpy(np.concatenate(labels)), field_dims, fields,
                   skipped_lines=problems.skipped, bags=bags,
                   dense=torch.from_numpy(np.concatenate(dense)) if roles.dense else None,
                   dense_names=list(roles.dense))
    if output_dir is not None:
        _write_cache_entry(output_dir, data, params, problems)
    return data


def _write_final_ids(vocabularies, finals, out):
    """out[i, f] = finals[f][provisional id of row i in vocabularies[f]], in blocks of rows on two
    threads (numpy's gathers release the GIL): a block stays in cache while its columns are
    written, and the scratch files are read in blocks, not memory-mapped (mapped pages count in the
    process's memory, which would then grow with the file)."""
    finals = [final.astype(np.int32) for final in finals]  # half the cache lines for the random reads

    def write(start):
        block = out[start:start + _REMAP_BLOCK_ROWS]
        for f, (vocabulary, final) in enumerate(zip(vocabularies, finals)):
            block[:, f] = final[np.fromfile(vocabulary.scratch_path, np.int32, len(block), offset=4 * start)]

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(write, range(0, len(out), _REMAP_BLOCK_ROWS)))


def _open_chunks(path, files, name, roles, text_format):
    """(the single-id fields, an iterator of _Chunk parsed and decoded on worker threads)."""
    if text_format is None:
        fields = roles.single_id_fields(pq.ParquetFile(files[0]).schema_arrow.names, files[0])
        needed = roles.needed(fields)
        decode = functools.partial(_decode, roles=roles, fields=fields, numeric=set(roles.numeric))
        read = functools.partial(_parquet_chunk, dictionary_columns=needed[:len(fields) + 1], decode=decode)
        return fields, _parallel_in_order(read, _parquet_batches(files, needed))
    stream = pa.input_stream(str(path), compression="detect")
    try:
        head, first_line = None, 1
        if text_format.column_names is None:
            head = stream.read(CHUNK_BYTES)
            end = head.find(b"\n") + 1 or len(head)
            columns = _header_columns(head[:end], text_format, path)
            head, first_line = head[end:], 2
        else:
            columns = list(text_format.column_names)
        fields = roles.single_id_fields(columns, path)
    except BaseException:
        stream.close()
        raise
    decode = functools.partial(_decode, roles=roles, fields=fields, numeric=set(roles.numeric))
    parse = functools.partial(_parse_text, path=path, text_format=text_format, columns=columns,
                              needed=roles.needed(fields), bags_and_dense=[*roles.bags, *roles.dense], decode=decode)
    return fields, _numbered(_parallel_in_order(parse, _text_chunks(stream, head)), path, first_line)


def _header_columns(header, text_format, path):
    text = header.removeprefix(b"\xef\xbb\xbf").rstrip(b"\r\n")  # a UTF-8 byte order mark is not a name
    if not text:
        raise ValueError(f"{path}, line 1: expected a header naming the columns, found an empty line")
    try:
        decoded = text.decode("utf-8")
    except UnicodeDecodeError:
        decoded = text.decode("latin-1")
    quoting = csv.QUOTE_MINIMAL if text_format.quoting else csv.QUOTE_NONE
    (columns,) = csv.reader([decoded], delimiter=text_format.delimiter, quoting=quoting)
    repeated = sorted({c for c in columns if columns.count(c) > 1})
    if repeated:
        raise ValueError(f"{path}, line 1: the header must name every column once; repeated: {repeated}")
    if "" in columns:
        raise ValueError(f"{path}, line 1: the header must name every column; column {columns.index('') + 1} "
                         "has no name")
    return columns


def _text_chunks(stream, head):
    """(bytes, is the last chunk) of chunks of whole lines, in file order. Each chunk is read into
    a buffer of its own (the parser threads keep it while the next is read), with no other copy."""
    with stream:
        carry = head or b""
        while True:
            buffer = bytearray(len(carry) + CHUNK_BYTES)
            buffer[:len(carry)] = carry
            size = len(carry) + stream.readinto(memoryview(buffer)[len(carry):])
            if size == len(carry):
                if carry:
                    yield bytes(carry), True
                return
            end = buffer.rfind(b"\n", 0, size) + 1  # from the end: scans the last line only
            if end == 0:
                carry = buffer[:size]
                continue
            carry = bytes(buffer[end:size])
            del buffer[end:]  # shrinks in place: no copy
            yield buffer, False


def _parse_text(raw, path, text_format, columns, needed, bags_and_dense, decode):
    """A chunk of whole lines (_text_chunks) as a _Chunk whose lines are numbered from 1: label and
    single-id fields dictionary-encoded (by the CSV reader, in C++), bags and dense columns as raw
    bytes. The caller adds the lines before the chunk to `positions` and `dropped`."""
    data, last = raw
    first_line = 1
    dropped = []
    wrong_count = f"{text_format.describe()}-separated columns{text_format.columns_hint}"

    def on_invalid_row(row):
        dropped.append((first_line + row.number - 1, f"expected {row.expected_columns} {wrong_count}, "
                                                     f"found {row.actual_columns}"))
        return "skip"

    misread = {}  # line -> problem: lines that pyarrow would read differently from "one line, one row"
    if b"\r" in data and data.count(b"\r") != data.count(b"\r\n"):
        # pyarrow ends a line at a lone "\r" too; here lines end at "\n" (as in the line numbers),
        # so such a line is malformed, and the "\r" is blanked to keep rows and lines in step.
        data = bytearray(data)
        for match in re.finditer(rb"\r(?!\n)", data):
            if last and match.start() == len(data) - 1:
                continue  # "\r" ending the file ends its last line
            line = first_line + data.count(b"\n", 0, match.start())
            misread.setdefault(line, "a carriage return (\\r) inside the line; lines end at \\n or \\r\\n")
            data[match.start()] = ord(" ")
    empty_line = f"expected {len(columns)} {wrong_count}, found 1"
    if data.startswith((b"\n", b"\r\n")):
        misread.setdefault(first_line, empty_line)
    for separator in (b"\n\n", b"\n\r\n"):  # pyarrow reads an empty line as a row of empty values
        start = data.find(separator)
        while start >= 0:
            misread.setdefault(first_line + data.count(b"\n", 0, start + 1), empty_line)
            start = data.find(separator, start + 1)
    dictionary_columns = needed[:len(needed) - len(bags_and_dense)]
    types = dict.fromkeys(needed, pa.binary())
    types.update(dict.fromkeys(dictionary_columns, pa.dictionary(pa.int32(), pa.binary())))

    def read(data):
        # One thread per chunk (chunks are parsed two at a time), which also numbers the lines it
        # drops; blocks of a few MB stay in cache, each with its own dictionaries, unified after.
        return pacsv.read_csv(
            pa.py_buffer(data),
            read_options=pacsv.ReadOptions(column_names=columns, use_threads=False, block_size=_PARSE_BLOCK_BYTES),
            parse_options=pacsv.ParseOptions(delimiter=text_format.delimiter,
                                             quote_char='"' if text_format.quoting else False,
                                             ignore_empty_lines=False, invalid_row_handler=on_invalid_row),
            convert_options=pacsv.ConvertOptions(include_columns=needed, column_types=types,
                                                 strings_can_be_null=False, quoted_strings_can_be_null=False),
        ).unify_dictionaries().combine_chunks()

    if not data.isascii() and not _is_utf8(data):
        # pyarrow decodes a line with the wrong column count as UTF-8 to hand it to on_invalid_row,
        # and fails on other bytes: count the columns of every line here instead (slow, but only
        # for such chunks), and blank the wrong ones, which then read as empty rows that
        # `misread` drops with their own problem.
        data, wrong = _blank_lines_with_wrong_column_counts(data, text_format, len(columns))
        for line, found in wrong:
            misread[first_line + line - 1] = f"expected {len(columns)} {wrong_count}, found {found}"
    num_lines = data.count(b"\n") + (0 if data.endswith(b"\n") else 1)
    try:
        table = read(data)
    except pa.ArrowInvalid as error:  # e.g. a quoted value spanning lines, then a line that is not UTF-8
        raise _UnreadableChunk(f"pyarrow cannot read them ({str(error)[:300]})", num_lines) from None
    positions = np.arange(first_line, first_line + num_lines)
    dropped_lines = {line for line, _ in dropped}
    if dropped:
        positions = np.delete(positions, [line - first_line for line in dropped_lines])
    if len(positions) != table.num_rows:
        raise _UnreadableChunk(f"read {table.num_rows} rows from {len(positions)} lines (a quoted value spanning "
                               "lines?); expected one row per line", num_lines)
    bad_rows = {int(np.searchsorted(positions, line)): problem for line, problem in misread.items()
                if line not in dropped_lines}
    chunk = _Chunk(table, path, "line", positions, dropped, bad_rows, num_lines)
    chunk.decoded = decode(chunk)
    return chunk


def _is_utf8(data):
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _blank_lines_with_wrong_column_counts(data, text_format, expected):
    """(data with the lines that do not have `expected` columns emptied, [(1-based line, columns found)])."""
    lines = bytes(data).split(b"\n")
    wrong = []
    for i, line in enumerate(lines):
        text = line.removesuffix(b"\r").decode("latin-1")
        if text_format.quoting:
            found = max(1, len(next(csv.reader([text], delimiter=text_format.delimiter))))
        else:
            found = text.count(text_format.delimiter) + 1
        if found != expected and (line or i < len(lines) - 1):  # not the end of the last line's newline
            wrong.append((i + 1, found))
            lines[i] = b""
    return b"\n".join(lines) or b"\n", wrong  # a lone line emptied is still a line (pyarrow refuses b"")


class _UnreadableChunk(Exception):
    """(problem, number of lines): a chunk that cannot be read line by line, whatever on_error says."""


def _numbered(chunks, path, first_line):
    """The chunks of _parse_text with their lines numbered from the top of the file."""
    while True:
        try:
            chunk = next(chunks)
        except StopIteration:
            return
        except _UnreadableChunk as error:
            problem, lines = error.args
            raise ValueError(f"{path}, lines {first_line}-{first_line + lines - 1}: {problem}") from None
        chunk.positions += first_line - 1
        chunk.dropped = [(line + first_line - 1, problem) for line, problem in chunk.dropped]
        first_line += chunk.lines
        yield chunk


def _parquet_batches(files, needed):
    """(part, first row number, record batch) of the needed columns of every part, in order."""
    for part in files:
        reader = pq.ParquetFile(part)
        missing = [c for c in needed if c not in reader.schema_arrow.names]
        if missing:
            raise ValueError(f"{part}: no column named {', '.join(map(repr, missing))} (the first part has them)")
        row = 1
        for batch in reader.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=needed):
            yield part, row, batch
            row += batch.num_rows


def _parquet_chunk(item, dictionary_columns, decode):
    """A Parquet record batch as a _Chunk: the label and single-id fields dictionary-encoded, decoded."""
    part, row, batch = item
    table = pa.Table.from_batches([batch])
    for name in dictionary_columns:
        column = table.column(name).combine_chunks()
        if not pa.types.is_dictionary(column.type):
            try:
                column = pc.dictionary_encode(column)
            except pa.ArrowNotImplementedError:
                raise ValueError(f"{part}: column {name!r} is a {column.type} column, which cannot be a "
                                 "categorical field or the label (a list column can be a bag)") from None
        table = table.set_column(table.schema.get_field_index(name), name, column)
    chunk = _Chunk(table, part, "row", np.arange(row, row + batch.num_rows), [], {})
    chunk.decoded = decode(chunk)
    return chunk


def _parallel_in_order(function, items, workers=2):
    """function(item) for each item, on `workers` threads (pyarrow parses without the GIL), yielded
    in order while the calling thread encodes the previous result; at most workers + 1 items are
    in flight. Closing the iterator cancels what has not started and waits for what has."""
    with ThreadPoolExecutor(workers, thread_name_prefix="pep-data-reader") as pool:
        pending = deque()
        try:
            for item in items:
                pending.append(pool.submit(function, item))
                if len(pending) > workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def _decode(chunk, roles, fields, numeric):
    """Every needed column of the chunk decoded: {label: float32 labels; a field: (its distinct
    values (pa.Array), the int32 index of each row's value, len(values) for a missing one); a bag:
    (distinct items, index of each item, item offsets per row); a dense column: float32}. A
    malformed value's row goes into ``chunk.bad_rows``, with a function that writes its problem
    (in column order, so a row's first problem is the one reported)."""
    table, decoded = chunk.table, {}

    def flag(rows, problem_of_row):
        for row in np.flatnonzero(rows).tolist():
            chunk.bad_rows.setdefault(row, functools.partial(problem_of_row, row))

    dictionary, indices = _dictionary(_column(table, roles.label))
    raw = dictionary.to_pylist() + [None]
    labels = np.array([_label_value(value) for value in raw], np.float32)[indices]  # NaN: not a label
    invalid = np.isnan(labels)
    if invalid.any():
        flag(invalid, lambda r, raw=raw, indices=indices:
             f"column {roles.label!r} (label) is {_shown(raw[indices[r]])}, expected 0 or 1")
    decoded[roles.label] = labels
    for field in fields:
        dictionary, indices = _dictionary(_column(table, field))
        if field in numeric:
            raw = dictionary.to_pylist() + [None]  # the index after the values: missing, the empty token
            tokens = [numeric_token(value) for value in raw]
            if None in tokens:
                invalid = np.array([token is None for token in tokens])
                flag(invalid[indices], lambda r, raw=raw, indices=indices, field=field:
                     f"column {field!r} (numeric) is {_shown(raw[indices[r]])}, expected an integer or empty")
            # Raw "3" and "4" are both bucket "1": one value each. A malformed value's rows are
            # dropped; they point past the values (no value of its own to merge).
            distinct = {token: i for i, token in enumerate(dict.fromkeys(t for t in tokens if t is not None))}
            indices = np.array([distinct.get(token, len(distinct)) for token in tokens], np.int32)[indices]
            dictionary = pa.array(list(distinct), pa.string())
        decoded[field] = dictionary, indices
    for bag in roles.bags:
        decoded[bag] = _bag(_column(table, bag), roles.bag_separator, bag, flag)
    for name in roles.dense:
        decoded[name] = _dense(_column(table, name), name, flag)
    return decoded


def _column(table, name):
    column = table.column(name)
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


def _dictionary(column):
    """(distinct values (pa.Array), int32 index of each row's value; len(values) for a missing one)."""
    if not pa.types.is_dictionary(column.type):
        column = pc.dictionary_encode(column)
    indices = column.indices if column.null_count == 0 else column.indices.fill_null(len(column.dictionary))
    return column.dictionary, indices.to_numpy()


def _label_value(value):
    """0 or 1, or NaN when the value is not a label."""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if isinstance(value, str):
        return {"0": 0, "1": 1}.get(value, math.nan)
    if isinstance(value, bool | int | float) and value in (0, 1):
        return int(value)
    return math.nan


def _shown(value):
    return repr(value.decode("latin-1")) if isinstance(value, bytes) else repr(value)


def _is_text(data_type):
    return pa.types.is_binary(data_type) or pa.types.is_string(data_type) or pa.types.is_large_string(data_type)


def _bag(column, separator, name, flag):
    if _is_text(column.type):
        column = pc.split_pattern(column, separator)
    elif not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)):
        raise ValueError(f"column {name!r} (bag) is of type {column.type}; expected text with {separator!r} between "
                         "the items, or a list column")
    column = pc.fill_null(column, pa.scalar([], column.type))  # a missing list is an empty bag
    offsets = column.offsets.to_numpy().astype(np.int64)
    offsets -= offsets[0]
    items = pc.list_flatten(column)
    missing = items.is_null().to_numpy(zero_copy_only=False)
    if missing.any():
        item_rows = np.repeat(np.arange(len(column)), np.diff(offsets))
        flag(np.bincount(item_rows[missing], minlength=len(column)) > 0,
             lambda r: f"column {name!r} (bag) has a missing item in its list, expected values only")
    # Text "a||b" and "" hold no empty item: separators only separate.
    empty = pc.equal(pc.binary_length(items), 0).to_numpy(zero_copy_only=False) if _is_text(items.type) else False
    dropped = missing | empty
    if np.any(dropped):
        items = items.filter(pa.array(~dropped))
        offsets = np.concatenate([[0], np.cumsum(~dropped)])[offsets]
    dictionary, indices = _dictionary(items)
    return dictionary, indices, offsets


def _dense(column, name, flag):
    if _is_text(column.type):
        valid = pc.match_substring_regex(column, _NUMBER)
        text = pc.cast(pc.if_else(valid, column, pa.scalar(b"0", column.type) if pa.types.is_binary(column.type)
                                  else "0"), pa.string())
        values = pc.cast(pc.utf8_trim_whitespace(text), pa.float64())
        valid = valid.to_numpy(zero_copy_only=False)
    elif pa.types.is_integer(column.type) or pa.types.is_floating(column.type):
        values = pc.cast(column, pa.float64())
        valid = column.is_valid().to_numpy(zero_copy_only=False)
    else:
        raise ValueError(f"column {name!r} (dense) is of type {column.type}; expected numbers")
    values = values.fill_null(0).to_numpy(zero_copy_only=False)
    valid &= np.isfinite(values) & (np.abs(values) <= np.finfo(np.float32).max)
    if not valid.all():
        flag(~valid, lambda r: f"column {name!r} (dense) is {_shown(column[r].as_py())}, expected a finite number")
    return np.where(valid, values, 0).astype(np.float32)


def _keep_rows(chunk, problems, on_error, room):
    """The table rows to encode (int64 indices, in order); raises on, or counts, the malformed lines
    up to the last row kept (``room``: how many rows may still be kept, None for all)."""
    good = np.arange(chunk.table.num_rows)
    if chunk.bad_rows:
        good = np.setdiff1d(good, list(chunk.bad_rows), assume_unique=True)
    found = chunk.dropped + [(int(chunk.positions[row]), problem) for row, problem in chunk.bad_rows.items()]
    if room is not None and len(good) > room:
        good = good[:room]
        found = [(line, problem) for line, problem in found if line <= chunk.positions[good[-1]]]
    if found:
        line, problem = min(found, key=lambda item: item[0])
        where = f"{chunk.source}, {chunk.unit} {line}: {problem if isinstance(problem, str) else problem()}"
        if on_error == "raise":
            raise ValueError(f"{where} (pass on_error='skip' to skip malformed {chunk.unit}s)")
        problems.first = problems.first or where
        problems.skipped += len(found)
        problems.unit = chunk.unit
    return good


def _skip_summary(problems):
    return f"skipped {problems.skipped} malformed {problems.unit}s; the first: {problems.first}"


def _write_cache_entry(output_dir, data, params, problems):
    with open(output_dir / "x.npy", "wb") as file:  # int32, in blocks: no copy of the whole table
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.int32)), "fortran_order": False,
                  "shape": tuple(data.x.shape)}
        np.lib.format.write_array_header_2_0(file, header)
        for start in range(0, len(data.x), _BLOCK_ROWS):
            file.write(data.x[start:start + _BLOCK_ROWS].numpy().astype(np.int32).tobytes())
    np.save(output_dir / "y.npy", data.y.numpy())
    for b, bag in enumerate(data.bags):
        np.save(output_dir / f"bag{b}_values.npy", bag.values.numpy().astype(np.int32))
        np.save(output_dir / f"bag{b}_offsets.npy", bag.offsets.numpy())
    if data.dense is not None:
        np.save(output_dir / "dense.npy", data.dense.numpy())
    for scratch in output_dir.glob("*.provisional"):
        scratch.unlink()
    meta = {
        "params": params,
        "field_names": data.field_names,
        "field_dims": data.field_dims,
        "bags": [[bag.name, bag.num_values] for bag in data.bags],
        "dense_names": data.dense_names,
        "num_rows": len(data),
        "skipped_lines": problems.skipped,
        "first_skipped": problems.first,
        "skipped_unit": problems.unit,
    }
    (output_dir / "meta.json").write_text(json.dumps(meta, indent=1))


def _read_int32_npy_as_int64(path):
    """An (n, F) int32 .npy file as int64, read in blocks: no int32 copy of the whole table beside it."""
    with open(path, "rb") as file:
        version = np.lib.format.read_magic(file)
        shape, fortran_order, dtype = (np.lib.format.read_array_header_1_0(file) if version == (1, 0)
                                       else np.lib.format.read_array_header_2_0(file))
        if dtype != np.int32 or fortran_order or len(shape) != 2:
            raise ValueError(f"{path} holds a {dtype} array of shape {shape}, expected a C-ordered 2-D int32 one")
        x = np.empty(shape, np.int64)
        for start in range(0, shape[0], _BLOCK_ROWS):
            block = x[start:start + _BLOCK_ROWS]
            block[...] = np.fromfile(file, np.int32, block.size).reshape(block.shape)
    return x


def _load_cache_entry(entry, params):
    """The CTRData stored in ``entry``, or None when there is no usable entry for ``params``."""
    meta_path = entry / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta["params"] != params:
            return None
        n = meta["num_rows"]
        x = _read_int32_npy_as_int64(entry / "x.npy")
        y = np.load(entry / "y.npy")
        if x.shape != (n, len(meta["field_dims"])) or y.shape != (n,):
            raise ValueError(f"arrays of shape {x.shape} and {y.shape} do not match the metadata")
        bags = [BagField(name, num_values, torch.from_numpy(np.load(entry / f"bag{b}_values.npy").astype(np.int64)),
                         torch.from_numpy(np.load(entry / f"bag{b}_offsets.npy")))
                for b, (name, num_values) in enumerate(meta["bags"])]
        dense = torch.from_numpy(np.load(entry / "dense.npy")) if meta["dense_names"] else None
        data = CTRData(torch.from_numpy(x), torch.from_numpy(y), meta["field_dims"],
                       meta["field_names"], skipped_lines=meta["skipped_lines"], bags=bags, dense=dense,
                       dense_names=meta["dense_names"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        warnings.warn(f"ignoring unreadable cache entry {entry}: {error}", stacklevel=4)
        return None
    if data.skipped_lines:
        summary = _skip_summary(_Problems(data.skipped_lines, meta["first_skipped"], meta["skipped_unit"]))
        warnings.warn(f"{summary} (when the cache entry {entry} was built)", stacklevel=4)
    return data
