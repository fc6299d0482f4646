"""The `pep` command end to end on small synthetic runs."""

import json

import pytest

from pep_kernels.cli import load_data, main

DATA = ["--data", "synthetic=3000"]


def test_search_retrain_evaluate(tmp_path, capsys):
    run = tmp_path / "run"
    main(["search", *DATA, "--out", str(run), "--budgets", "0.5", "0.7", "--epochs", "3", "--lr", "0.01",
          "--threshold-init", "-3", "--embedding-dim", "8", "--training", "fast", "--count-every", "2"])
    out = capsys.readouterr().out
    assert "step       0" in out and "sparsity" in out
    assert (run / "search.json").exists() and (run / "initial.safetensors").exists()
    summary = json.loads((run / "search.json").read_text())
    assert summary["training"] == "fast" and all(s["step"] % 2 == 0 for s in summary["snapshots"])
    reached = summary["snapshots"][1:]
    assert reached, "the small run should reach at least one budget"

    main(["retrain", *DATA, "--run", str(run), "--epochs", "2", "--lr", "0.01"])
    results = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert len(results) == len(reached)
    model_file = run / f"retrained-{reached[0]['path'].removesuffix('.safetensors')}.safetensors"
    assert model_file.exists()

    main(["evaluate", *DATA, "--model-file", str(model_file)])
    scores = json.loads(capsys.readouterr().out)
    assert scores["auc"] == pytest.approx(results[0]["test_auc"])
    assert scores["nnz"] == results[0]["nnz"]


def test_demo_writes_table_and_plots(tmp_path, capsys):
    main(["demo", *DATA, "--epochs", "2", "--out", str(tmp_path / "demo")])
    out = capsys.readouterr().out
    assert "full table" in out and "test AUC" in out and "published recipe" in out
    for name in ("auc_vs_parameters.png", "planned_vs_reached.png", "demo.json"):
        assert (tmp_path / "demo" / name).stat().st_size > 0


@pytest.mark.parametrize("spec", ["nope", "criteo", "synthetic=abc", "ml-100k=extra"])
def test_bad_dataset_names(spec):
    with pytest.raises(ValueError, match="expected one of|needs a number"):
        load_data(spec)


def test_errors_exit_with_a_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["search", "--data", "nope", "--out", str(tmp_path), "--budgets", "0.5"])
    assert exit_info.value.code == 2
    assert "pep search: error: unknown dataset 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["search", *DATA, "--out", str(tmp_path), "--budgets", "1.5"])
    assert "budget 1.5 is neither" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--epochs", "0"])
    assert "--epochs must be >= 1" in capsys.readouterr().err


def test_bench_runs_the_named_suites():
    with pytest.raises(SystemExit) as stop:
        main(["bench", "lookup", "train_step", "-k", "no_such_benchmark"])
    assert stop.value.code == 5  # pytest: the suites were collected and nothing matched -k
