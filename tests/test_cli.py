"""The `pep` command end to end on small synthetic runs."""

import json

import pytest
import torch

from pep_kernels.cli import load_data, main

DATA = ["--data", "synthetic=3000"]


def test_search_retrain_evaluate(tmp_path, capsys):
    run = tmp_path / "run"
    main(["search", *DATA, "--out", str(run), "--budgets", "0.5", "0.7", "--epochs", "3", "--lr", "0.01",
          "--threshold-init", "-6", "--threshold-slope", "0.5", "--embedding-dim", "8", "--training", "fast",
          "--count-every", "2"])
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
    assert (run / "retrain-checkpoints" / model_file.stem / "checkpoint.safetensors").exists()

    # run again: every retrain resumes from its finished checkpoint, to the same results
    main(["retrain", *DATA, "--run", str(run), "--epochs", "2", "--lr", "0.01"])
    captured = capsys.readouterr()
    assert [json.loads(line) for line in captured.out.strip().splitlines()] == results
    assert captured.err.count("retrain: resumed") == len(reached)
    with pytest.raises(SystemExit):  # not the same run
        main(["retrain", *DATA, "--run", str(run), "--epochs", "3", "--lr", "0.01"])
    assert "belongs to another run (epochs differ)" in capsys.readouterr().err

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


def cli_errors(tmp_path):
    """(argv, message) of bad command lines, each ending with exit code 2 and the message."""
    afile = tmp_path / "afile"
    afile.write_text("not a model")
    search = ["search", *DATA, "--out", str(tmp_path / "run"), "--budgets", "0.5"]
    retrain = ["retrain", *DATA, "--run", str(tmp_path)]
    return [
        (search + ["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (search + ["--embedding-dim", "-2"], "--embedding-dim must be >= 1, got -2"),
        (search + ["--count-every", "0"], "--count-every must be >= 1, got 0"),
        (search + ["--lr", "-0.1"], "--lr must be a finite number > 0, got -0.1"),
        (search + ["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
        (search + ["--weight-decay", "-1"], "--weight-decay must be a finite number >= 0, got -1.0"),
        (search + ["--threshold-init", "inf"], "--threshold-init must be a finite number, got inf"),
        (search + ["--threshold-slope", "nan"], "--threshold-slope must be a finite number, got nan"),
        (search + ["--threshold-mode", "feature", "--threshold-slope", "1"],
         "threshold_slope 1.0 needs a threshold per dimension"),
        (search + ["--seed", "-1"], "--seed must be >= 0, got -1"),
        (search + ["--device", "tpu"], "--device must be cpu or cuda[:N], got 'tpu'"),
        (search + ["--device", "cuda:0"] if not torch.cuda.is_available() else search + ["--device", "xla"],
         "no CUDA device is available" if not torch.cuda.is_available() else "--device must be cpu or cuda"),
        (search + ["--threshold-mode", "rows"], "unknown threshold mode 'rows'"),
        (search + ["--model", "gpt"], "argument --model: invalid choice: 'gpt'"),
        (search + ["--budgets", "0.5", "nan"], "budget nan is neither"),
        (search + ["--budgets", "-3"], "budget -3.0 is neither"),
        (search + ["--budgets", "lots"], "budget 'lots' is neither a sparsity in (0, 1)"),
        (search + ["--epochs", "-1"], "--epochs must be >= 1, got -1"),
        (search + ["--min-occurrences", "-1"], "--min-occurrences must be >= 0, got -1"),
        (search + ["--cache-dir", str(afile)], f"--cache-dir {afile}: is a file, expected a folder"),
        (["search", *DATA, "--out", str(afile), "--budgets", "0.5"], f"--out {afile}: is a file, expected a folder"),
        (["search", "--data", "synthetic=0", "--out", str(tmp_path / "r"), "--budgets", "0.5"], "num_samples >= 1"),
        (["search", "--data", f"criteo={tmp_path / 'missing.txt'}", "--out", str(tmp_path / "r"), "--budgets", "0.5"],
         "criteo data file not found"),
        (["search", "--data", f"avazu={tmp_path}", "--out", str(tmp_path / "r"), "--budgets", "0.5"],
         "is a folder; expected the data file itself"),
        (["search", "--data", f"ml-1m={afile}", "--out", str(tmp_path / "r"), "--budgets", "0.5"],
         "needs the folder of the unzipped ml-1m archive"),
        (["retrain", *DATA, "--run", str(tmp_path / "nowhere")], "--run {}: no such folder".format(tmp_path / "nowhere")),
        (["retrain", *DATA, "--run", str(afile)], f"--run {afile}: is a file, expected a folder"),
        (retrain, f"{tmp_path} has no snapshot past step 0"),
        (retrain + ["--snapshot", "snapshot-step0000009.safetensors"], "is not a search run folder: it has no initial"),
        (retrain + ["--patience", "0"], "--patience must be >= 1, got 0"),
        (retrain + ["--checkpoint-every", "0"], "--checkpoint-every must be >= 1, got 0"),
        (retrain + ["--checkpoint-dir", str(afile)], f"--checkpoint-dir {afile}: is a file, expected a folder"),
        (["evaluate", *DATA, "--model-file", str(tmp_path / "none")], "--model-file {}: no such file".format(
            tmp_path / "none")),
        (["evaluate", *DATA, "--model-file", str(tmp_path)], f"--model-file {tmp_path}: is a folder, expected a file"),
        (["evaluate", *DATA, "--model-file", str(afile)], f"{afile} is not a readable pep_kernels file"),
        (["evaluate", *DATA, "--model-file", str(afile), "--store", str(tmp_path)],
         f"--store {tmp_path}: is a folder, expected a file"),
        (["export", "--model-file", str(afile), "--out", str(tmp_path)],
         f"--out {tmp_path}: is a folder, expected the store file to write"),
        (["export", "--model-file", str(afile), "--out", str(tmp_path / "s"), "--values", "fp8"],
         "argument --values: invalid choice: 'fp8'"),
        (["demo", "--out", str(afile), "--epochs", "1"], f"--out {afile}: is a file, expected a folder"),
        (["demo", "--data", "imagenet", "--epochs", "1", "--out", str(tmp_path / "d")], "unknown dataset 'imagenet'"),
    ]


def test_every_bad_option_exits_with_a_message_naming_it(tmp_path, capsys):
    for argv, message in cli_errors(tmp_path):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        err = capsys.readouterr().err
        assert stop.value.code == 2, (argv, err)
        assert message in err and "Traceback" not in err, (argv, err)
        assert f"pep {argv[0]}" in err, (argv, err)


def test_bench_runs_the_named_suites():
    with pytest.raises(SystemExit) as stop:
        main(["bench", "lookup", "train_step", "-k", "no_such_benchmark"])
    assert stop.value.code == 5  # pytest: the suites were collected and nothing matched -k
