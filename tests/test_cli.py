"""The `pep` command end to end on small synthetic runs."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pep_kernels.cli import LARGE_TABLE_COUNT_EVERY, LARGE_TABLE_ENTRIES, _table_training, load_data, main
from pep_kernels.data import synthetic_ctr_data

DATA = ["--data", "synthetic=3000"]


def synthetic_table(n=3000):
    """The synthetic task as table columns: label `clicked`, fields f0..f7 as text, a count, a note."""
    data = synthetic_ctr_data(n, seed=1)
    columns = {"clicked": data.y.int().tolist()}
    columns |= {f"f{f}": [f"v{v}" for v in data.x[:, f].tolist()] for f in range(data.x.shape[1])}
    columns |= {"count": [str(i % 50) for i in range(n)], "note": ["-"] * n}
    return columns


def write_csv(path, columns):
    lines = [",".join(columns)] + [",".join(map(str, row)) for row in zip(*columns.values())]
    path.write_text("\n".join(lines) + "\n")
    return path


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


def test_search_retrain_export_and_serve_a_parquet_table(tmp_path, capsys):
    path = tmp_path / "clicks.parquet"
    pq.write_table(pa.table(synthetic_table()), path)
    data = ["--data", f"table={path}", "--label", "clicked", "--numeric", "count", "--ignore", "note", "--min-count",
            "2"]
    run = tmp_path / "run"
    main(["search", *data, "--out", str(run), "--budgets", "0.4", "--epochs", "3", "--lr", "0.01",
          "--threshold-init", "-6", "--threshold-slope", "0.5", "--embedding-dim", "8"])
    summary = json.loads((run / "search.json").read_text())
    assert summary["spec"]["field_dims"] == load_data(f"table={path}", label="clicked", numeric=["count"],
                                                      ignore=["note"], min_count=2).field_dims
    assert len(summary["spec"]["field_dims"]) == 9 and summary["snapshots"][1:], "the 40% budget should be reached"
    capsys.readouterr()
    main(["retrain", *data, "--run", str(run), "--epochs", "1", "--lr", "0.01"])
    (result,) = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    model_file = next(run.glob("retrained-*.safetensors"))
    main(["export", "--model-file", str(model_file), "--out", str(tmp_path / "t.store")])
    capsys.readouterr()
    main(["evaluate", *data, "--model-file", str(model_file), "--store", str(tmp_path / "t.store")])
    served = json.loads(capsys.readouterr().out)
    assert served["auc"] == pytest.approx(result["test_auc"], abs=1e-12) and served["nnz"] == result["nnz"]


def test_demo_on_a_csv_table_with_a_cache(tmp_path, capsys):
    path = write_csv(tmp_path / "clicks.csv", synthetic_table())
    main(["demo", "--data", f"table={path}", "--label", "clicked", "--numeric", "count", "--ignore", "note",
          "--cache-dir", str(tmp_path / "cache"), "--epochs", "2", "--out", str(tmp_path / "demo")])
    out = capsys.readouterr().out
    assert "full table" in out and "published recipe" in out
    assert json.loads((tmp_path / "demo" / "demo.json").read_text())["data"] == f"table={path}"
    (entry,) = (tmp_path / "cache").iterdir()
    assert entry.name.startswith("table-clicks.csv-") and (entry / "x.npy").exists()


def test_dlrm_demo_takes_a_tables_bags_and_dense_columns(tmp_path, capsys):
    columns = synthetic_table()
    columns["tags"] = ["|".join(f"t{(i + k) % 7}" for k in range(i % 4)) for i in range(len(columns["clicked"]))]
    columns["score"] = [f"{(i % 13) / 13:.3f}" for i in range(len(columns["clicked"]))]
    path = write_csv(tmp_path / "clicks.csv", columns)
    table = ["--data", f"table={path}", "--label", "clicked", "--bag", "tags", "--dense", "score", "--ignore", "note"]
    main(["demo", "--model", "dlrm", *table, "--epochs", "1", "--out", str(tmp_path / "demo")])
    out = capsys.readouterr().out
    assert "full (fp32, dense)" in out and "tags" in out
    with pytest.raises(SystemExit):  # the FM has no EmbeddingBag
        main(["demo", *table, "--epochs", "1", "--out", str(tmp_path / "fm")])
    assert "the built-in models take single-id fields only, and --bag tags" in capsys.readouterr().err


def test_large_tables_default_to_fast_training_and_sparser_counts(capsys):
    assert _table_training(LARGE_TABLE_ENTRIES, None, None) == ("faithful", 1)
    assert capsys.readouterr().err == ""
    assert _table_training(LARGE_TABLE_ENTRIES + 1, None, None) == ("fast", LARGE_TABLE_COUNT_EVERY)
    assert "--training fast --count-every 20 (the defaults above 1,000,000 entries" in capsys.readouterr().err
    assert _table_training(LARGE_TABLE_ENTRIES + 1, "faithful", 1) == ("faithful", 1)
    assert capsys.readouterr().err == ""  # both given: nothing chosen for the user
    assert _table_training(10, "fast", None) == ("fast", 1)


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
    table = write_csv(tmp_path / "clicks.csv", synthetic_table(20))
    table_search = ["search", "--data", f"table={table}", "--out", str(tmp_path / "run"), "--budgets", "0.5"]
    bad_table = tmp_path / "bad.tsv"
    bad_table.write_text("clicked\tf0\n1\ta\n2\tb\n")
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
        (["demo", "--cache-dir", str(afile)], f"--cache-dir {afile}: is a file, expected a folder"),
        (table_search, "table=FILE needs --label COL, the column of 0/1 labels"),
        (table_search + ["--label", "nope"], "clicks.csv: no column named 'nope'; its columns are: 'clicked', 'f0'"),
        (table_search + ["--label", "clicked", "--numeric", "f9"], "no column named 'f9'"),
        (table_search + ["--label", "clicked", "--ignore", "clicked"], "given more than one role"),
        (table_search + ["--label", "clicked", "--bag", "note", "f0"],
         "the built-in models take single-id fields only, and --bag note f0 are multi-hot"),
        (table_search + ["--label", "clicked", "--dense", "count"],
         "the built-in models take single-id fields only, and --dense count are raw numbers"),
        (table_search + ["--label", "clicked", "--min-count", "0"], "--min-count must be >= 1, got 0"),
        (search + ["--label", "clicked"], "--label name columns of table=FILE, not of --data synthetic=3000"),
        (search + ["--on-error", "skip"], "--on-error apply to criteo, avazu, table data, not to --data synthetic"),
        (["demo", "--numeric", "a", "--epochs", "1"],
         "--numeric name columns of table=FILE, not of the default dataset"),
        (["search", "--data", f"table={tmp_path / 'none.csv'}", "--label", "y", "--out", str(tmp_path / "r"),
          "--budgets", "0.5"], "table data file not found"),
        (["search", "--data", f"table={afile}", "--label", "y", "--out", str(tmp_path / "r"), "--budgets", "0.5"],
         "cannot tell its format from its name"),
        (["search", "--data", f"table={bad_table}", "--label", "clicked", "--out", str(tmp_path / "r"), "--budgets",
          "0.5"], "bad.tsv, line 3: column 'clicked' (label) is '2', expected 0 or 1"),
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
