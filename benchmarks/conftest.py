"""Interleaved timing for ratio tables (../shared/BENCHMARKING.md), and the results tables.

pytest-benchmark times the pep_kernels candidate of each test; the `interleaved` fixture times
the candidate and its baselines round-robin in the same process (median of >= 15 rounds after
warm-up), so that the ratios survive a noisy machine. The ratio table is printed at the end of
the run and written to .benchmarks/ratios.md; every measurement (and what tests hand to the
`recorded` fixture) is appended to benchmarks/data/<kind>.csv (`results.py`), the kind being the
suite's name (test_lookup.py: lookup), unless pytest runs with --no-record.
"""

import shlex
import statistics
import time
from pathlib import Path

import pytest
import torch

from results import append_rows, environment

ROUNDS, WARMUP = 15, 3
_TABLE = []
_ROWS = {}  # kind -> rows for benchmarks/data/<kind>.csv


def pytest_addoption(parser):
    parser.addoption("--no-record", action="store_true",
                     help="do not append this run's measurements to benchmarks/data/*.csv (trial and smoke runs)")


def _kind(request):
    return request.module.__name__.removeprefix("test_")


def _median_seconds(fns, sync):
    samples = {name: [] for name in fns}
    for _ in range(WARMUP):
        for fn in fns.values():
            fn()
    for _ in range(ROUNDS):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in samples.items()}


@pytest.fixture
def recorded():
    """`recorded(kind, rows)`: rows (results.COLUMNS names) for benchmarks/data/<kind>.csv."""
    def record(kind, rows):
        _ROWS.setdefault(kind, []).extend(rows)

    return record


@pytest.fixture
def interleaved(request, recorded):
    """`interleaved(group, candidate, fns, device="cpu", case=None)` times `fns` (name -> callable)
    round-robin and returns their median seconds; `case` (pass, shape, mode, dtype) describes the
    measurement in the results table."""
    def measure(group, candidate, fns, device="cpu", case=None):
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        medians = _median_seconds(fns, sync)
        _TABLE.append((group, candidate, medians, torch.get_num_threads()))
        ours = medians[candidate]
        recorded(_kind(request), [
            dict(case or {}, device=device, metric="time", unit="ms", candidate=candidate, candidate_value=ours * 1e3,
                 baseline=name, baseline_value=m * 1e3, note=f"median of {ROUNDS} interleaved rounds")
            for name, m in medians.items() if name != candidate])
        return medians

    return measure


def pytest_terminal_summary(terminalreporter, config):
    if _ROWS and not config.getoption("no_record"):
        command = shlex.join(["pytest", *config.invocation_params.args])
        devices = {row.get("device", "cpu") for rows in _ROWS.values() for row in rows}
        env = {device: environment(device, command) for device in devices}
        for kind, rows in _ROWS.items():
            append_rows(kind, [{**env[row.get("device", "cpu")], **row} for row in rows])
        terminalreporter.write_line(f"appended to benchmarks/data/: {', '.join(f'{k}.csv' for k in _ROWS)}")
    if not _TABLE:
        return
    lines = [
        "| group | threads | " + "candidate ms | baseline: ms (baseline / candidate) |",
        "|---|---|---|---|",
    ]
    for group, candidate, medians, threads in _TABLE:
        ours = medians[candidate]
        others = ", ".join(
            f"{name}: {m * 1e3:.2f} ({m / ours:.2f}x)" for name, m in medians.items() if name != candidate
        )
        lines.append(f"| {group} | {threads} | {candidate}: {ours * 1e3:.2f} | {others} |")
    text = "\n".join(lines)
    terminalreporter.write_sep("=", "interleaved medians and ratios")
    terminalreporter.write_line(text)
    out = Path(".benchmarks")
    out.mkdir(exist_ok=True)
    (out / "ratios.md").write_text(text + "\n")
