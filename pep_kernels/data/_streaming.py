"""One streaming encoder for large CTR logs (Criteo, Avazu), with an on-disk cache.

The raw files are tens of GB, so the text is never held in memory: pass 1 streams the file and
counts every field's raw values, pass 2 streams it again and writes local ids straight into the
output arrays (memory-mapped .npy files in the cache directory when there is one). A format only
supplies a row parser; reading, error handling, id assignment and caching live here once.
"""

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from .ctr import CTRData

ON_ERROR_CHOICES = ("raise", "skip")
# Bump when the encoding changes, so caches written by older code are not reused.
_CACHE_VERSION = 1
# Rows parsed per batch: large enough that the per-column counting and lookups run in C.
_CHUNK_ROWS = 1 << 16


class MalformedLine(Exception):
    """What is wrong with one line, raised by a row parser; the reader adds the file and line number.

    Deliberately not a ValueError, so a bug in a parser is never mistaken for bad input.
    """


def parse_label(raw: str) -> int:
    if raw == "0":
        return 0
    if raw == "1":
        return 1
    raise MalformedLine(f"label is {raw!r}, expected 0 or 1")


@dataclass(frozen=True)
class LineFormat:
    """How to read one CTR log format."""

    name: str  # part of the cache key, e.g. "criteo"
    field_names: tuple
    parse_row: Callable  # line without its newline -> (label 0/1, one raw token per field); raises MalformedLine
    header_lines: int = 0  # lines at the top that are not examples (checked by the caller)


@dataclass
class _ReadStats:
    lines: int = 0  # data lines read, malformed or not
    skipped: int = 0
    first_problem: str = ""


def encode_ctr_file(path, line_format, min_count, cache_dir, max_rows, on_error) -> CTRData:
    """Encode a CTR log into per-field local ids, reusing a cached encoding when one matches.

    Per field, values seen at least ``min_count`` times get ids ``0, 1, ...`` in order of decreasing
    frequency (ties by value); all rarer values share the next id, which exists only if some value
    is rare, so every id in ``field_dims`` occurs in the data. ``max_rows`` caps the number of
    examples read from the top of the file (malformed lines skipped along the way do not count).

    The cache entry is keyed on the file's resolved path, size and modification time, the format,
    the parameters and the encoder version; any change builds a new entry.
    """
    if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 1:
        raise ValueError(f"min_count must be an integer >= 1, got {min_count!r}")
    if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1):
        raise ValueError(f"max_rows must be None or an integer >= 1, got {max_rows!r}")
    if on_error not in ON_ERROR_CHOICES:
        raise ValueError(f"on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}")
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{line_format.name} data file {path} is a folder; expected the data file itself")
    if not path.is_file():
        raise FileNotFoundError(f"{line_format.name} data file not found: {path}")
    stat = path.stat()
    params = {
        "format": line_format.name,
        "path": str(path.resolve()),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "min_count": min_count,
        "max_rows": max_rows,
        "on_error": on_error,
        "version": _CACHE_VERSION,
    }
    if cache_dir is None:
        return _encode(path, line_format, params, output_dir=None)
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    entry = Path(cache_dir) / f"{line_format.name}-{path.name}-{key}"
    cached = _load_cache_entry(entry, params)
    if cached is not None:
        return cached
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    # Build in a private directory and rename it into place, so a crash or a concurrent build never
    # leaves a half-written entry that a later call would trust.
    staging = Path(tempfile.mkdtemp(prefix=f"{entry.name}.partial-", dir=cache_dir))
    try:
        data = _encode(path, line_format, params, output_dir=staging)
        shutil.rmtree(entry, ignore_errors=True)  # an unreadable entry under the same key
        os.replace(staging, entry)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return data


def _encode(path, line_format, params, output_dir):
    """Both passes; with an output_dir the arrays and their metadata are written there."""
    stats = _ReadStats()
    counters = [Counter() for _ in line_format.field_names]
    num_rows = 0
    for _, rows in _read_chunks(path, line_format, params, stats, "counting values"):
        for counter, column in zip(counters, zip(*rows)):
            counter.update(column)
        num_rows += len(rows)
    if num_rows == 0:
        raise ValueError(f"{path}: no well-formed data rows" + (f" ({_skip_summary(stats)})" if stats.skipped else ""))
    ids, field_dims = [], []
    for f, counter in enumerate(counters):
        field_ids, field_dim = _assign_ids(counter, params["min_count"])
        ids.append(field_ids)
        field_dims.append(field_dim)
        counters[f] = None  # free the counts (gigabytes on Criteo) before the next field's ids are built

    shape = (num_rows, len(line_format.field_names))
    if output_dir is None:
        x, y = np.empty(shape, np.int32), np.empty(num_rows, np.float32)
    else:
        x = np.lib.format.open_memmap(output_dir / "x.npy", mode="w+", dtype=np.int32, shape=shape)
        y = np.lib.format.open_memmap(output_dir / "y.npy", mode="w+", dtype=np.float32, shape=(num_rows,))
    second_pass = _ReadStats()
    start = 0
    for labels, rows in _read_chunks(path, line_format, params, second_pass, "encoding", total=stats.lines):
        end = start + len(rows)
        if end > num_rows:
            raise RuntimeError(f"{path} changed while it was being read (more rows than the {num_rows} counted)")
        y[start:end] = labels
        for f, column in enumerate(zip(*rows)):
            try:
                x[start:end, f] = np.fromiter(map(ids[f].__getitem__, column), np.int32, count=len(rows))
            except KeyError as unseen:
                raise RuntimeError(f"{path} changed while it was being read (field {line_format.field_names[f]} "
                                   f"has value {unseen} that the first pass did not see)") from None
        start = end
    if start != num_rows:
        raise RuntimeError(f"{path} changed while it was being read ({start} rows now, {num_rows} before)")
    if stats.skipped:
        warnings.warn(_skip_summary(stats), stacklevel=4)

    field_names = list(line_format.field_names)
    if output_dir is not None:
        x.flush()
        y.flush()
        meta = {
            "params": params,
            "field_names": field_names,
            "field_dims": field_dims,
            "num_rows": num_rows,
            "skipped_lines": stats.skipped,
            "first_skipped": stats.first_problem,
        }
        (output_dir / "meta.json").write_text(json.dumps(meta, indent=1))
    # Copies: the ids become int64 as CTRData requires, and nothing stays tied to the staging files.
    return CTRData(torch.from_numpy(x.astype(np.int64)), torch.from_numpy(np.array(y)), field_dims,
                   field_names, skipped_lines=stats.skipped)


def _assign_ids(counter, min_count):
    """(raw value -> local id for every value seen, number of ids); rare values share the last id."""
    frequent = sorted((value for value, count in counter.items() if count >= min_count),
                      key=lambda value: (-counter[value], value))
    ids = {value: i for i, value in enumerate(frequent)}
    rare = [value for value, count in counter.items() if count < min_count]
    ids.update(dict.fromkeys(rare, len(frequent)))
    return ids, len(frequent) + (1 if rare else 0)


def _read_chunks(path, line_format, params, stats, step, total=None):
    """Yield (labels, rows) batches of the well-formed examples, in file order.

    A malformed line raises ValueError naming the file and its 1-based line number, or with
    on_error="skip" is counted in ``stats`` and left out.
    """
    max_rows = params["max_rows"]
    kept = 0
    labels, rows = [], []
    # latin-1 maps every byte to one character, so decoding never fails and distinct bytes stay
    # distinct tokens (the logs are ASCII in practice). Lines end at "\n" only, so line numbers
    # match other tools and a stray "\r" inside a line cannot split it.
    with open(path, encoding="latin-1", newline="\n") as lines:
        for _ in range(line_format.header_lines):
            lines.readline()
        with tqdm(lines, desc=f"{line_format.name} {path.name}: {step}", total=total, unit=" lines",
                  mininterval=1, disable=None) as progress:
            for line_number, line in enumerate(progress, start=line_format.header_lines + 1):
                stats.lines += 1
                try:
                    label, row = line_format.parse_row(line.rstrip("\r\n"))
                except MalformedLine as problem:
                    where = f"{path}, line {line_number}: {problem}"
                    if params["on_error"] == "raise":
                        raise ValueError(f"{where} (pass on_error='skip' to skip malformed lines)") from None
                    stats.skipped += 1
                    stats.first_problem = stats.first_problem or where
                    continue
                labels.append(label)
                rows.append(row)
                kept += 1
                if len(rows) == _CHUNK_ROWS:
                    yield labels, rows
                    labels, rows = [], []
                if kept == max_rows:
                    break
    if rows:
        yield labels, rows


def _skip_summary(stats):
    return f"skipped {stats.skipped} malformed lines; the first: {stats.first_problem}"


def _load_cache_entry(entry, params):
    """The CTRData stored in ``entry``, or None when there is no usable entry for ``params``."""
    meta_path = entry / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta["params"] != params:
            return None
        x = np.load(entry / "x.npy")
        y = np.load(entry / "y.npy")
        if x.shape != (meta["num_rows"], len(meta["field_dims"])) or y.shape != (meta["num_rows"],):
            raise ValueError(f"arrays of shape {x.shape} and {y.shape} do not match the metadata")
        data = CTRData(torch.from_numpy(x.astype(np.int64)), torch.from_numpy(y), meta["field_dims"],
                       meta["field_names"], skipped_lines=meta["skipped_lines"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        warnings.warn(f"ignoring unreadable cache entry {entry}: {error}", stacklevel=4)
        return None
    if data.skipped_lines:
        summary = _skip_summary(_ReadStats(skipped=data.skipped_lines, first_problem=meta["first_skipped"]))
        warnings.warn(f"{summary} (when the cache entry {entry} was built)", stacklevel=4)
    return data
