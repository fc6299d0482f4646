"""benchmarks/results.py: the append-only results tables the benchmark harness writes."""

import csv
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("benchmark_results", ROOT / "benchmarks" / "results.py")
results = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(results)

ROW = {"pass": "train step", "shape": "criteo", "mode": "feature_dim", "dtype": "float32", "metric": "time",
       "unit": "ms", "candidate": "pep fast", "candidate_value": 2.0, "baseline": "eager", "baseline_value": 5.0}


def read(path):
    with path.open(newline="") as f:
        return list(csv.reader(f))


def test_rows_are_appended_under_one_header(tmp_path):
    results.append_rows("train_step", [ROW], directory=tmp_path)
    results.append_rows("train_step", [dict(ROW, baseline="floor", baseline_value=1.0, ratio="0.49")],
                        directory=tmp_path)
    header, first, second = read(tmp_path / "train_step.csv")
    assert tuple(header) == results.COLUMNS
    first, second = dict(zip(header, first)), dict(zip(header, second))
    assert first["ratio"] == "2.500"  # baseline / candidate, computed where not given
    assert second["ratio"] == "0.49"  # a recorded ratio is kept as it was recorded
    assert (first["candidate"], first["candidate_value"], first["baseline_value"]) == ("pep fast", "2", "5")
    # The environment comes from this process where the row does not give it.
    assert first["device"] == "cpu" and first["date"] and first["torch"] and int(first["threads"]) >= 1


def test_given_environment_columns_are_kept(tmp_path):
    recorded = dict(ROW, date="2026-11-30T17:09Z", machine="NVIDIA H200", device="cuda", torch="2.11.0+cu130",
                    command="bash benchmarks/gpu_check.sh", cpu_capability="", threads="")
    results.append_rows("train_step", [recorded], directory=tmp_path)
    header, row = read(tmp_path / "train_step.csv")
    row = dict(zip(header, row))
    assert {k: row[k] for k in results.ENVIRONMENT} == {k: str(recorded[k]) for k in results.ENVIRONMENT}


def test_bad_rows_and_tables_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown benchmark kind 'lookups'"):
        results.append_rows("lookups", [ROW], directory=tmp_path)
    with pytest.raises(ValueError, match=r"unknown columns \['speed'\]"):
        results.append_rows("lookup", [dict(ROW, speed=1)], directory=tmp_path)
    with pytest.raises(ValueError, match=r"lacks \['candidate_value'\]"):
        results.append_rows("lookup", [dict(ROW, candidate_value=None)], directory=tmp_path)
    assert not list(tmp_path.iterdir())  # nothing written by a refused call
    (tmp_path / "lookup.csv").write_text("date,ms\n")
    with pytest.raises(ValueError, match="has the columns"):
        results.append_rows("lookup", [ROW], directory=tmp_path)


def test_the_committed_tables_have_the_columns_and_known_kinds():
    tables = sorted(results.DATA.glob("*.csv"))
    assert {t.stem for t in tables} == set(results.KINDS)
    for table in tables:
        header, *rows = read(table)
        assert tuple(header) == results.COLUMNS, table
        assert rows and all(len(row) == len(header) for row in rows), table
        for row in map(dict, (zip(header, r) for r in rows)):
            assert row["date"] and row["machine"] and row["command"] and row["candidate"], (table, row)
            float(row["candidate_value"])
