"""Memory per rank and bytes per step of a PEP table sharded row-wise (pep_kernels.distributed),
against a dense table of uniform dimension. Arithmetic only: nothing is run or timed.

    python experiments/sharded_scaling/scaling.py     # the tables of experiments/sharded_scaling/README.md
    python experiments/sharded_scaling/scaling.py --rows 1e9 --dim 32 --density 0.1 --ranks 8 64 512 \
        [--batch 1024 --fields 39]

Model (per rank, R ranks, row-wise: each rank holds ceil(N / R) rows; fp32 values):
- training: PEP's table row is d weights + t thresholds (t = d for feature_dim, 1 for feature, 0
  for shared modes), padded to a multiple of 4 (FBGEMM), plus the optimizer state of that row
  (Adam 2 values per entry, Adagrad 1, rowwise Adagrad 1 per row, SGD none). PEP's Adam runs on
  pep_kernels' kernels behind TorchRec's DENSE compute kernel, which adds the shard's dense
  gradient (1 value per entry, during the backward) and `fast` mode's last step (8 bytes a row).
  The dense table is d (padded) plus the same state, under a fused optimizer (no gradient table).
  PEP trains a full-width table: its saving comes at serving.
- serving: a SparseRowStore of the shard, `columns` encoding (auto picks the smaller of it and the
  bitmask, so this is an upper bound): 4 (rows + 1) offset bytes + (1 + 4) bytes per non-zero
  (d <= 256). Against the dense fp32 table of dimension d, and the dense table of the uniform
  dimension round(density * d), which has about the same number of parameters.
- communication per training step, each rank sending its own batch of B examples x F ids:
  the id all-to-all (8 bytes per id), the row all-to-all forward and the gradient all-to-all
  backward (table width x 4 bytes per id); a fraction (R - 1) / R of it leaves the rank (uniform
  ids). Shared thresholds add a ring all-reduce of 2 (R - 1) / R x their bytes. Serving sends ids
  and d-wide rows.
"""

import argparse
import math

STATE_PER_ENTRY = {"adam": 2, "adagrad": 1, "rowwise_adagrad": 0, "sgd": 0}
THRESHOLD_COLUMNS = {"feature_dim": lambda d: d, "feature": lambda d: 1}  # other modes: shared
ID_BYTES, VALUE_BYTES = 8, 4
LAST_STEP_BYTES = 8  # Adam `fast`: the step each row was last brought up to

# (name, rows, d, fields per example): Avazu as the PEP paper's table, Criteo with the feature
# count commonly reported for Kaggle Criteo (d = 24, the PEP recipe), and a 1-billion-row table.
STANDARD = (
    ("criteo", 1_086_810, 24, 39),
    ("avazu", 645_394, 24, 22),
    ("1B rows", 1_000_000_000, 32, 100),
)


def padded(width):
    return -(-width // 4) * 4


def table_bytes(rows, d, density, ranks, *, mode="feature_dim", optimizer="adam", batch=1024, fields=39):
    """Bytes per rank: {'train_pep', 'train_dense', 'serve_pep', 'serve_dense', 'serve_uniform',
    'comm_pep', 'comm_dense', 'comm_serve', 'rows_per_rank', 'uniform_dim'}."""
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    shard_rows = math.ceil(rows / ranks)
    t = THRESHOLD_COLUMNS.get(mode, lambda d: 0)(d)
    shared = 0 if mode in THRESHOLD_COLUMNS else (d if mode in ("dimension", "field_dim") else 1) * fields
    width_pep, width_dense = padded(d + t), padded(d)

    def train(width, dense_kernel=False):
        state = STATE_PER_ENTRY[optimizer] * width + (1 if optimizer == "rowwise_adagrad" else 0)
        gradient = width if dense_kernel else 0
        return shard_rows * ((width + state + gradient) * VALUE_BYTES + (LAST_STEP_BYTES if dense_kernel else 0))

    uniform_dim = max(1, round(density * d))
    nnz = density * shard_rows * d
    leaving = (ranks - 1) / ranks
    lookups = batch * fields

    def comm(width):
        return leaving * lookups * (ID_BYTES + 2 * width * VALUE_BYTES)

    return {
        "rows_per_rank": shard_rows, "uniform_dim": uniform_dim,
        "train_pep": train(width_pep, dense_kernel=optimizer == "adam"), "train_dense": train(width_dense),
        "serve_pep": VALUE_BYTES * (shard_rows + 1) + (1 + VALUE_BYTES) * nnz,
        "serve_dense": shard_rows * d * VALUE_BYTES, "serve_uniform": shard_rows * uniform_dim * VALUE_BYTES,
        "comm_pep": comm(width_pep) + 2 * leaving * shared * VALUE_BYTES,
        "comm_dense": comm(width_dense),
        "comm_serve": leaving * lookups * (ID_BYTES + d * VALUE_BYTES),
    }


def human(n):
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1000


def table(rows, d, density, ranks_list, *, mode, optimizer, batch, fields, name=None):
    title = name or f"{rows:,} rows"
    lines = [
        f"**{title}**: {rows:,} x {d}, density {density:g} ({mode}, {optimizer}; B = {batch} examples x "
        f"{fields} ids per rank and step)",
        "",
        "| ranks | rows/rank | train PEP | train dense | serve PEP store | serve dense d | "
        "serve dense d_u | step comm PEP | step comm dense | serve comm |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for ranks in ranks_list:
        b = table_bytes(rows, d, density, ranks, mode=mode, optimizer=optimizer, batch=batch, fields=fields)
        lines.append(
            f"| {ranks} | {b['rows_per_rank']:,} | {human(b['train_pep'])} | {human(b['train_dense'])} | "
            f"{human(b['serve_pep'])} | {human(b['serve_dense'])} | {human(b['serve_uniform'])} (d_u = "
            f"{b['uniform_dim']}) | {human(b['comm_pep'])} | {human(b['comm_dense'])} | {human(b['comm_serve'])} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=float, help="table rows N (default: the standard tables)")
    parser.add_argument("--dim", type=int, default=24)
    parser.add_argument("--density", type=float, default=0.1, help="non-zero fraction of the pruned table")
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 64, 512])
    parser.add_argument("--batch", type=int, default=1024, help="examples per rank and step")
    parser.add_argument("--fields", type=int, default=39, help="ids per example")
    parser.add_argument("--mode", default="feature_dim")
    parser.add_argument("--optimizer", default="adam", choices=sorted(STATE_PER_ENTRY))
    args = parser.parse_args(argv)
    common = dict(mode=args.mode, optimizer=args.optimizer, batch=args.batch)
    if args.rows is not None:
        print(table(int(args.rows), args.dim, args.density, args.ranks, fields=args.fields, **common))
        return
    for name, rows, d, fields in STANDARD:
        print(table(rows, d, args.density, args.ranks, fields=fields, name=name, **common))
        print()


if __name__ == "__main__":
    main()
