"""Interleaved timing for ratio tables (../shared/BENCHMARKING.md).

pytest-benchmark times the pep_kernels candidate of each test; the `interleaved` fixture times
the candidate and its baselines round-robin in the same process (median of >= 15 rounds after
warm-up), so that the ratios survive a noisy machine. The ratio table is printed at the end of
the run and written to .benchmarks/ratios.md.
"""

import statistics
import time
from pathlib import Path

import pytest
import torch

ROUNDS, WARMUP = 15, 3
_TABLE = []


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
def interleaved(request):
    def measure(group, candidate, fns, device="cpu"):
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        medians = _median_seconds(fns, sync)
        _TABLE.append((group, candidate, medians, torch.get_num_threads()))
        return medians

    return measure


def pytest_terminal_summary(terminalreporter):
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
