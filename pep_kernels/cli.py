"""The `pep` command: search, retrain, evaluate, export, bench, demo."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

DATASETS = "synthetic[=N] | ml-100k | ml-100k-noids | ml-1m=DIR | criteo=FILE | avazu=FILE | table=FILE"
ENCODED = ("criteo", "avazu", "table")  # datasets read by the column-wise encoder: --min-count, --on-error, a cache
TABLE_OPTIONS = ("label", "numeric", "bag", "bag_separator", "dense", "ignore")


def load_data(spec, seed=0, cache_dir=None, *, label=None, numeric=(), bag=(), bag_separator="|", dense=(),
              ignore=(), min_count=None, on_error="raise"):
    """A dataset named on the command line (see DATASETS); the keywords are its data options."""
    from . import data

    name, _, path = spec.partition("=")
    if name == "synthetic":
        if path and not path.isdigit():
            raise ValueError(f"synthetic=N needs a number of examples, got {path!r}")
        return data.synthetic_ctr_data(int(path or 100_000), seed)
    encoded = dict(min_count=10 if min_count is None else min_count, cache_dir=cache_dir, on_error=on_error)
    loaders = {
        "ml-100k": lambda: data.load_movielens_100k(include_ids=True),
        "ml-100k-noids": lambda: data.load_movielens_100k(include_ids=False),
        "ml-1m": lambda: data.load_movielens_1m(path),
        "criteo": lambda: data.load_criteo(path, **encoded),
        "avazu": lambda: data.load_avazu(path, **encoded),
        "table": lambda: data.load_table(path, label, numeric=numeric, bags=bag, dense=dense, ignore=ignore,
                                         bag_separator=bag_separator, **encoded),
    }
    if name not in loaders or bool(path) != (name in ("ml-1m", *ENCODED)):
        raise ValueError(f"unknown dataset {spec!r}; expected one of: {DATASETS}")
    if name == "table" and label is None:
        raise ValueError("table=FILE needs --label COL, the column of 0/1 labels")
    return loaders[name]()


def _load(args):
    """The dataset of a command's --data and data options."""
    return load_data(args.data, args.seed, args.cache_dir, min_count=args.min_count, on_error=args.on_error,
                     **{name: getattr(args, name) for name in TABLE_OPTIONS})


def log(message):
    """Progress goes to stderr; results to stdout."""
    print(message, file=sys.stderr)


def _splits(args):
    """The dataset's field sizes and its (x, y) train, validation and test splits."""
    from .data import split

    data = _load(args)
    return data.field_dims, [(part.x, part.y) for part in split(data, args.seed)]


def _data_options(parser, default=None):
    parser.add_argument("--data", required=default is None,
                        help=f"{DATASETS}{f' (default: {default})' if default else ''}; table=FILE: a CSV or TSV "
                             "file with a header line (.gz, .bz2, .zst, .lz4 too), a Parquet file or a folder of "
                             "Parquet parts, with --label")
    parser.add_argument("--cache-dir", type=Path,
                        help="where criteo, avazu and table data keep their encoded arrays (reused while the file "
                             "and the options stay the same)")
    parser.add_argument("--min-count", type=int,
                        help="criteo, avazu, table: values seen fewer times share one id (default 10)")
    parser.add_argument("--on-error", default="raise", choices=["raise", "skip"],
                        help="criteo, avazu, table: a malformed line or row ends the command (raise, the default) "
                             "or is skipped and counted (skip)")
    table = parser.add_argument_group(
        "table=FILE columns", "every column but the label is a categorical field unless named below")
    table.add_argument("--label", metavar="COL", help="the column of 0/1 labels (required with table=FILE)")
    table.add_argument("--numeric", nargs="+", default=[], metavar="COL",
                       help="integer columns, bucketed as Criteo's I1-I13 (int(ln(v)^2)); empty is a bucket")
    table.add_argument("--ignore", nargs="+", default=[], metavar="COL", help="columns not read")
    table.add_argument("--bag", nargs="+", default=[], metavar="COL",
                       help="multi-hot columns (values separated by --bag-separator, or Parquet lists), for models "
                            "with an EmbeddingBag: pep demo --model dlrm (the other built-in models take single-id "
                            "fields only)")
    table.add_argument("--bag-separator", default="|", metavar="SEP", help="between the values of a --bag column")
    table.add_argument("--dense", nargs="+", default=[], metavar="COL",
                       help="numbers kept as they are, for models with a bottom MLP: pep demo --model dlrm (not "
                            "the other built-in models)")


def _common(parser, epochs):
    _data_options(parser)
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-5)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")


def cmd_search(args):
    from .train import search
    from .train.report import planned_vs_reached_lines, plot_planned_vs_reached
    from .train.spec import RunSpec

    field_dims, ((x, y), _, _) = _splits(args)
    spec = RunSpec(args.model, field_dims, args.embedding_dim, threshold_mode=args.threshold_mode,
                   threshold_init=args.threshold_init, threshold_slope=args.threshold_slope)
    if args.pruning == "faithful" and args.steps is not None:
        raise ValueError("--steps plans the budget pruning; --pruning faithful has no plan")
    training, count_every = _table_training(spec.num_embeddings * spec.embedding_dim, args.training, args.count_every)
    summary = search(spec, x, y, args.out, args.budgets, epochs=args.epochs, lr=args.lr,
                     weight_decay=args.weight_decay, batch_size=args.batch_size, seed=args.seed,
                     device=args.device, backend=args.backend, training=training,
                     count_every=count_every, pruning=args.pruning, steps=args.steps,
                     min_occurrences=args.min_occurrences, log=log)
    for snap in summary["snapshots"]:
        print(f"step {snap['step']:>7}  non-zeros {snap['nnz']:>10}  sparsity {snap['sparsity']:.2%}  {snap['path']}")
    print("\n".join(planned_vs_reached_lines(summary)))
    plot_planned_vs_reached(summary, args.out / "planned_vs_reached.png")
    print(f"plot: {args.out / 'planned_vs_reached.png'}")
    if summary["unreached"]:
        print(f"budgets not reached in {args.epochs} epochs: {summary['unreached']}")


# Above this many table entries a step that updates every row (faithful training) and reads the
# whole table to count it costs a multiple of one that touches the looked-up rows (1.7x on a
# 193K x 16 FM table, issue 26); below, the published recipe's settings cost little.
LARGE_TABLE_ENTRIES = 1_000_000
LARGE_TABLE_COUNT_EVERY = 20


def _table_training(entries, training, count_every):
    """--training and --count-every, with their defaults for a table of `entries` entries."""
    large = entries > LARGE_TABLE_ENTRIES
    chosen = (training or ("fast" if large else "faithful"),
              count_every or (LARGE_TABLE_COUNT_EVERY if large else 1))
    if large and (training is None or count_every is None):
        log(f"a table of {entries:,} entries: --training {chosen[0]} --count-every {chosen[1]} (the defaults above "
            f"{LARGE_TABLE_ENTRIES:,} entries; faithful training updates and counting reads every row)")
    return chosen


def cmd_retrain(args):
    from .train import retrain

    _, (train, val, test) = _splits(args)
    snapshots = args.snapshot or sorted(p.name for p in Path(args.run).glob("snapshot-step*.safetensors"))[1:]
    if not snapshots:
        raise ValueError(f"{args.run} has no snapshot past step 0")
    for snapshot in snapshots:
        out = Path(args.run) / f"retrained-{Path(snapshot).stem}{'-control' if args.control else ''}.safetensors"
        checkpoints = (args.checkpoint_dir or Path(args.run) / "retrain-checkpoints") / out.stem
        result = retrain(args.run, snapshot, train, val, test, rewind=not args.control, epochs=args.epochs,
                         patience=args.patience, lr=args.lr, weight_decay=args.weight_decay,
                         batch_size=args.batch_size, seed=args.seed, device=args.device, save_path=out,
                         checkpoint_dir=checkpoints, checkpoint_every=args.checkpoint_every, log=log)
        print(json.dumps(result))


def cmd_evaluate(args):
    from .train import evaluate, evaluate_per_batch
    from .train.retrain import load_retrained

    _, (_, _, test) = _splits(args)
    model, meta = load_retrained(args.model_file)
    served = {}
    if args.store is not None:
        model.embedding = _store_embedding(args.store, model.embedding, meta)
        served = {"store": str(args.store), "store_bytes": model.embedding.store.nbytes}
    metric = evaluate_per_batch if args.per_batch else evaluate
    result = metric(model.to(args.device), *test, device=args.device)
    print(json.dumps(dict(result, nnz=model.embedding.nnz(), sparsity=model.embedding.sparsity(), **served)))


def _store_embedding(path, table, meta):
    """A PrunedEmbedding over the store at `path`, in place of the retrained model's `table`."""
    from .modules import PrunedEmbedding
    from .store import SparseRowStore
    from .train.spec import RunSpec

    store = SparseRowStore.load(path)
    shape = (table.num_embeddings, table.embedding_dim)
    if (store.num_embeddings, store.embedding_dim) != shape:
        raise ValueError(f"the store holds a {store.num_embeddings} x {store.embedding_dim} table; the model's "
                         f"is {shape[0]} x {shape[1]}")
    return PrunedEmbedding(store, field_dims=RunSpec.from_dict(meta["spec"]).field_dims)


def cmd_export(args):
    from .store import SparseRowStore
    from .train.retrain import load_retrained

    model, _ = load_retrained(args.model_file)
    store = SparseRowStore.from_module(model.embedding, values=args.values, encoding=args.encoding)
    store.save(args.out)
    stats = store.stats()
    del stats["dims_per_row_histogram"]
    print(json.dumps(dict(stats, out=str(args.out))))


BENCH_SUITES = ("lookup", "train_step", "bags", "store")


def cmd_bench(args):
    root = Path(__file__).resolve().parent.parent / "benchmarks"
    suites = [root / f"test_{name}.py" for name in args.suites]
    if not all(suite.exists() for suite in suites):
        raise SystemExit(f"pep bench: the benchmark suites are not here ({root}); run it from a source checkout")
    command = [sys.executable, "-m", "pytest", *map(str, suites), "-q", "-p", "no:cacheprovider",
               "--benchmark-group-by=group"]
    raise SystemExit(subprocess.call(command + (["-k", args.k] if args.k else []), cwd=root.parent))


def cmd_demo(args):
    from .demo import run_demo, run_dlrm_demo

    data = None if args.data is None else (_load(args), args.data)
    if args.model == "dlrm":
        run_dlrm_demo(out_dir=args.out, data=data, epochs=args.epochs, device=args.device, backend=args.backend,
                      seed=args.seed)
        return
    run_demo(out_dir=args.out, data=data, model=args.model, epochs=args.epochs, device=args.device,
             backend=args.backend, seed=args.seed)


def main(argv=None):
    from .models import MODELS

    parser = argparse.ArgumentParser(prog="pep", description="PEP: learnable embedding sizes, fast.")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("search", help="budgeted PEP search: snapshots of the pruned table at each budget")
    _common(p, epochs=10)
    p.add_argument("--out", required=True, type=Path, help="run folder (an existing one resumes)")
    p.add_argument("--budgets", required=True, nargs="+",
                   help="sparsity targets in (0, 1), non-zero counts or sparse-store bytes (24000B), e.g. 0.8 0.9 0.95")
    p.add_argument("--pruning", default="budget", choices=["budget", "faithful"],
                   help="budget: a controller passes each budget on a planned schedule (default); faithful: the "
                        "published recipe, pruning at the thresholds' own pace")
    p.add_argument("--steps", type=int,
                   help="step budget of the plan: the last budget is planned for this step (default: every step "
                        "of --epochs)")
    p.add_argument("--min-occurrences", type=int, default=0,
                   help="cut (zero before the first step) the rows of features seen fewer than this many times in "
                        "the training split, so that the budget goes to features the data can train (10 is the "
                        "setting docs/RESULTS.md measures; 0: keep every row)")
    p.add_argument("--model", default="fm", choices=sorted(MODELS))
    p.add_argument("--embedding-dim", type=int, default=16)
    p.add_argument("--threshold-mode", default="feature_dim")
    p.add_argument("--threshold-init", type=float, default=-15.0)
    p.add_argument("--threshold-slope", type=float, default=0.0,
                   help="dimension j's thresholds start at threshold-init + j * slope, so every row prunes its high "
                        "dimensions first and the kept ones line up across rows (per-dimension modes; 1 with "
                        "--threshold-init -30 is the recommended setting for FM)")
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "cpu"])
    p.add_argument("--training", choices=["faithful", "fast"],
                   help="table updates: every row every step (the published recipe) or looked-up rows with "
                        "skipped steps replayed (same numbers); default: faithful up to "
                        f"{LARGE_TABLE_ENTRIES:,} table entries, fast above")
    p.add_argument("--count-every", type=int,
                   help=f"count non-zeros every N steps (default: 1 up to {LARGE_TABLE_ENTRIES:,} table entries, "
                        f"{LARGE_TABLE_COUNT_EVERY} above)")
    p.set_defaults(handler=cmd_search)

    p = commands.add_parser("retrain", help="lottery-ticket retrain of a run's snapshots")
    _common(p, epochs=10)
    p.add_argument("--run", required=True, type=Path, help="the search's run folder")
    p.add_argument("--snapshot", nargs="*", help="snapshot files in the run (default: every one past step 0)")
    p.add_argument("--control", action="store_true", help="random re-initialisation instead of the winning ticket")
    p.add_argument("--patience", type=int, default=2)
    p.add_argument("--checkpoint-dir", type=Path,
                   help="where each retrain checkpoints, in a folder of its own, and resumes from "
                        "(default: RUN/retrain-checkpoints)")
    p.add_argument("--checkpoint-every", type=int, default=1000, help="checkpoint every N steps (and every epoch)")
    p.set_defaults(handler=cmd_retrain)

    p = commands.add_parser("evaluate", help="test AUC and log-loss of a retrained model")
    _common(p, epochs=0)
    p.add_argument("--model-file", required=True, type=Path, help="a retrained-*.safetensors file")
    p.add_argument("--per-batch", action="store_true", help="the reference's mean of per-batch metrics")
    p.add_argument("--store", type=Path,
                   help="serve the table from this store (written by pep export) instead of the model file's")
    p.set_defaults(handler=cmd_evaluate)

    p = commands.add_parser("export", help="write a retrained model's pruned table as a serving store")
    p.add_argument("--model-file", required=True, type=Path, help="a retrained-*.safetensors file")
    p.add_argument("--out", required=True, type=Path, help="the store file to write")
    p.add_argument("--values", default="fp32", choices=["fp32", "fp16", "bf16", "int8"],
                   help="value type: fp32 (exact) or lossy fp16, bf16, int8 with a per-row scale")
    p.add_argument("--encoding", default="auto", choices=["auto", "columns", "bitmask"],
                   help="row layout (auto: the smaller)")
    p.set_defaults(handler=cmd_export)

    p = commands.add_parser("bench", help="run the CPU benchmark suites, print the ratio tables and append the "
                                          "measurements to benchmarks/data/*.csv")
    p.add_argument("suites", nargs="*", default=list(BENCH_SUITES), choices=BENCH_SUITES,
                   help="lookup (soft-threshold op), train_step (a table's training step), bags (pooled bags), store "
                        "(serving)")
    p.add_argument("-k", help="pytest -k expression selecting benchmarks")
    p.set_defaults(handler=cmd_bench)

    p = commands.add_parser("demo", help="baseline, PEP search and retrain on MovieLens-100K (or synthetic data)")
    p.add_argument("--out", type=Path, default=Path("pep-demo"), help="output folder (default: pep-demo)")
    _data_options(p, default="ml-100k when recbole is installed, else synthetic; for dlrm, ml-100k with genres "
                             "as a multi-hot bag and age and year as dense features")
    p.add_argument("--model", default="fm", choices=sorted(MODELS) + ["dlrm"],
                   help="a built-in (B, F) model, or dlrm: a plain PyTorch DLRM with one nn.EmbeddingBag per "
                        "feature (and a bottom MLP for --dense columns), converted by pep_kernels.convert and "
                        "searched to byte budgets of all its tables")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "cpu", "reference"])
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=cmd_demo)

    args = parser.parse_args(argv)
    _check_options(parser, args)
    try:
        args.handler(args)
    except (ValueError, OSError) as e:  # OSError: a file that cannot be read or written
        parser.exit(2, f"pep {args.command}: error: {e}\n")


def _check_options(parser, args):
    """Option values that would fail deep inside a command end it here, naming the option."""
    import math

    import torch

    def fail(message):
        parser.exit(2, f"pep {args.command}: error: {message}\n")

    if getattr(args, "epochs", 1) < 0 or (args.command != "evaluate" and getattr(args, "epochs", 1) < 1):
        fail(f"--epochs must be >= 1, got {args.epochs}")
    for name in ("batch_size", "embedding_dim", "count_every", "patience", "checkpoint_every"):
        if getattr(args, name, None) is not None and getattr(args, name) < 1:
            fail(f"{option(name)} must be >= 1, got {getattr(args, name)}")
    _check_data_options(args, fail)
    if getattr(args, "min_occurrences", 0) < 0:
        fail(f"--min-occurrences must be >= 0, got {args.min_occurrences}")
    if getattr(args, "seed", 0) < 0:
        fail(f"--seed must be >= 0, got {args.seed}")
    numbers = {"lr": (lambda v: v > 0, "> 0"), "weight_decay": (lambda v: v >= 0, ">= 0"),
               "threshold_init": (lambda v: True, ""), "threshold_slope": (lambda v: True, "")}
    for name, (ok, what) in numbers.items():
        value = getattr(args, name, None)
        if value is not None and not (math.isfinite(value) and ok(value)):
            fail(f"{option(name)} must be a finite number {what}, got {value}".replace(" ,", ","))
    if getattr(args, "device", None) is not None:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            fail(f"--device must be cpu or cuda[:N], got {args.device!r}")
        if device.type not in ("cpu", "cuda"):
            fail(f"--device must be cpu or cuda[:N], got {args.device!r}")
        if device.type == "cuda" and not torch.cuda.is_available():
            fail(f"--device {args.device}: no CUDA device is available")
    for name in ("model_file", "store"):  # files that must exist
        path = getattr(args, name, None)
        if path is not None and not path.is_file():
            fail(f"{option(name)} {path}: " + ("is a folder, expected a file" if path.is_dir() else "no such file"))
    folders = {"run": True, "cache_dir": False, "checkpoint_dir": False}  # name: must exist
    if args.command in ("search", "demo"):
        folders["out"] = False
    for name, must_exist in folders.items():
        path = getattr(args, name, None)
        if path is None or path.is_dir() or (not must_exist and not path.exists()):
            continue
        fail(f"{option(name)} {path}: " + ("is a file, expected a folder" if path.exists() else "no such folder"))
    if args.command == "export" and args.out.is_dir():
        fail(f"--out {args.out}: is a folder, expected the store file to write")


def _check_data_options(args, fail):
    """Data options that do not fit the dataset, or that the built-in models cannot use."""
    if not hasattr(args, "data"):
        return
    name = (args.data or "").partition("=")[0]
    given = [name for name in TABLE_OPTIONS if getattr(args, name) not in (None, [], "|")]
    if given and name != "table":
        fail(f"{', '.join(option(g) for g in given)} name columns of table=FILE, not of "
             f"{'--data ' + args.data if args.data else 'the default dataset'}")
    encoded_given = [option(o) for o in ("min_count", "on_error") if getattr(args, o) not in (None, "raise")]
    if encoded_given and name not in ENCODED:
        fail(f"{', '.join(encoded_given)} apply to {', '.join(ENCODED)} data, not to "
             f"{'--data ' + args.data if args.data else 'the default dataset'}")
    if args.min_count is not None and args.min_count < 1:
        fail(f"--min-count must be >= 1, got {args.min_count}")
    if getattr(args, "model", None) == "dlrm":  # pep demo's DLRM takes bags and dense columns
        return
    if args.bag:
        fail(f"the built-in models take single-id fields only, and --bag {' '.join(args.bag)} are multi-hot: load "
             "them with pep_kernels.data.load_table(..., bags=[...]) for a model with an EmbeddingBag (as pep demo "
             "--model dlrm does), or read each list as one categorical value (leave out --bag), or --ignore them")
    if args.dense:
        fail(f"the built-in models take single-id fields only, and --dense {' '.join(args.dense)} are raw numbers: "
             "load them with pep_kernels.data.load_table(..., dense=[...]) for a model with a bottom MLP, or "
             "bucketize integer columns with --numeric, or --ignore them")


def option(name):
    return "--" + name.replace("_", "-")


if __name__ == "__main__":
    main()
