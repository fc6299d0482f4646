"""The benchmarks' results tables: one append-only CSV per kind of benchmark in benchmarks/data/,
one row per measurement (a candidate against one baseline timed in the same run, or a candidate
alone), with the date, machine and command that made it. Rows are only ever appended: a new run
adds rows, old rows stay as the record of what an earlier build measured.

The CPU suites append through `benchmarks/conftest.py`; any other harness calls `append_rows`:

    sys.path.insert(0, "benchmarks")  # or run from benchmarks/
    from results import append_rows
    append_rows("train_step", [{"pass": "train step", "shape": "criteo", "mode": "feature_dim",
                                "dtype": "float32", "metric": "time", "unit": "ms", "candidate": "pep fast",
                                "candidate_value": 2.1, "baseline": "eager", "baseline_value": 2.536}])

Columns a row leaves out of `ENVIRONMENT` are filled in from the running process (`environment`);
`ratio` is baseline_value / candidate_value unless given (above 1: the candidate is faster, or
smaller).
"""

import csv
import os
import platform
import shlex
import sys
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parent / "data"
KINDS = {
    "lookup": "the soft-threshold lookup, forward and forward+backward (test_lookup.py, bench_gpu.py lookup)",
    "train_step": "one training step of the table (test_train_step.py, bench_gpu.py step)",
    "step_profile": "where a GPU training step's time goes: kernel time, launches, syncs (bench_gpu.py profile)",
    "bags": "pooled bag lookups, forward+backward and the fused row-wise Adagrad step (test_bags.py)",
    "store": "lookups from a SparseRowStore (test_store.py::test_serve)",
    "store_bytes": "bytes of a SparseRowStore against its target, the dense table and FBGEMM "
                   "(test_store.py::test_store_bytes)",
}
ENVIRONMENT = ("date", "machine", "device", "cpu_capability", "threads", "torch", "command")
MEASUREMENT = ("pass", "shape", "mode", "dtype", "metric", "unit", "candidate", "candidate_value", "baseline",
               "baseline_value", "ratio", "note")
COLUMNS = ENVIRONMENT + MEASUREMENT
REQUIRED = ("metric", "unit", "candidate", "candidate_value")


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        return platform.processor() or None


def environment(device="cpu", command=None):
    """The ENVIRONMENT columns of this process: UTC date and time, machine (CPU cores and model,
    and the GPU's name on `device="cuda"`), torch's CPU capability and threads, torch's version,
    and `command` (default: this process's command line)."""
    machine = f"{os.cpu_count()} cores, {_cpu_model() or 'unknown CPU'}"
    if device == "cuda":
        machine = f"{torch.cuda.get_device_name()}, {machine}"
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
        "machine": machine,
        "device": device,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "command": command or shlex.join([Path(sys.executable).name, *sys.argv]),
    }


def _cell(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def append_rows(kind, rows, directory=DATA):
    """Appends `rows` (mappings of COLUMNS names to values) to `directory/<kind>.csv`, writing the
    header first if the file is new. Missing ENVIRONMENT columns come from `environment()` (its
    device from the row's `device`, default cpu); a missing `ratio` is baseline_value /
    candidate_value where both are given. Raises ValueError for an unknown kind, a row with an
    unknown column or without a REQUIRED one, and a file whose header is not COLUMNS."""
    if kind not in KINDS:
        raise ValueError(f"unknown benchmark kind {kind!r}; expected one of {sorted(KINDS)} (a new kind goes into "
                         "benchmarks/results.py KINDS)")
    rows = list(rows)
    for row in rows:
        if not isinstance(row, Mapping):
            raise ValueError(f"a row must be a mapping of column names to values, got {type(row).__name__}")
        unknown = sorted(set(row) - set(COLUMNS))
        if unknown:
            raise ValueError(f"unknown columns {unknown} in {kind} row; expected names from {list(COLUMNS)}")
        missing = [name for name in REQUIRED if row.get(name) in (None, "")]
        if missing:
            raise ValueError(f"{kind} row {dict(row)} lacks {missing}")
    if not rows:
        return
    path = Path(directory) / f"{kind}.csv"
    if path.exists() and path.stat().st_size:
        with path.open(newline="") as f:
            header = next(csv.reader(f), [])
        if tuple(header) != COLUMNS:
            raise ValueError(f"{path} has the columns {header}, not {list(COLUMNS)}: append to a table of the "
                             "same columns only")
        new = False
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        new = True
    environments = {}
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
        if new:
            writer.writeheader()
        for row in rows:
            device = row.get("device") or "cpu"
            if device not in environments and any(name not in row for name in ENVIRONMENT):
                environments[device] = environment(device)
            full = {**environments.get(device, {}), **row}
            if full.get("ratio") in (None, "") and full.get("baseline_value") not in (None, "") \
                    and float(full["candidate_value"]) != 0:
                full["ratio"] = f"{float(full['baseline_value']) / float(full['candidate_value']):.3f}"
            writer.writerow({name: _cell(full.get(name)) for name in COLUMNS})
