"""Peak resident memory of building a big PEPEmbedding and exporting it (Linux only).

    python experiments/export_memory/peak_rss_export.py [--rows 20000000] [--dim 16] [--mode feature_dim]

Phases, each with its own peak (VmHWM, reset between phases through /proc/self/clear_refs):
building the table (W and s), `nnz()` (the C++ count, no table copy), building the serving
store from the module (`SparseRowStore.from_module`, block by block: no dense pruned copy),
`pruned_weight()` (the whole pruned table S(W, s), block by block) and the count of its
non-zeros. Peaks are reported as bytes and as multiples of the table size N x d x element size;
a phase's peak includes what earlier phases left alive (W and s, the store, then the pruned
table). Not part of the test suite: it needs about 4 GB at the default 20M x 16, fp32.

With `--pep-export FOLDER` it measures `pep export` instead: loading a retrained model file
(`load_retrained`), building the store from its MaskedEmbedding, saving the store.
"""

import argparse
import resource
import time
from pathlib import Path

import torch

from pep_kernels import PEPEmbedding, SparseRowStore


def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def reset_peak():
    """Resets VmHWM to the current resident size (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000_000)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--mode", default="feature_dim")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--pep-export", type=Path, metavar="FOLDER",
                        help="measure `pep export` instead: write a retrained FM model of the table (about 40%% "
                             "kept) in FOLDER, then load it, build the store and save it, as the command does")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    table = args.rows * args.dim * 4
    gib = 2**30
    start_rss = status("VmRSS")
    print(f"table {args.rows:,} x {args.dim} fp32, mode {args.mode}: {table / gib:.2f} GiB; "
          f"resident after imports {start_rss / gib:.2f} GiB; {torch.get_num_threads()} threads")
    rows = []
    state = {}

    def phase(name, fn):
        can_reset = reset_peak()
        before = status("VmRSS")
        t0 = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - t0
        peak = status("VmHWM") if can_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        after = status("VmRSS")
        rows.append((name, seconds, before, peak, after))
        print(f"{name:<28} {seconds:7.2f} s  resident before {before / gib:6.2f} GiB, peak {peak / gib:6.2f} GiB "
              f"({(peak - start_rss) / table:4.2f}x the table over the start), peak - before "
              f"{(peak - before) / gib:5.2f} GiB ({(peak - before) / table:4.2f}x), after {after / gib:6.2f} GiB")
        return result

    if args.pep_export:
        measure_pep_export(args, phase, table)
        return
    torch.manual_seed(0)
    # Xavier-uniform entries are within sqrt(6 / (N + d)) (5.5e-4 at 20M rows); sigmoid(-8) = 3.4e-4
    # prunes a good share of them. The share does not change the memory.
    emb = phase("build PEPEmbedding", lambda: PEPEmbedding(args.rows, args.dim, threshold_mode=args.mode,
                                                           threshold_init=-8.0, backend="cpu"))
    nnz = phase("nnz() (C++ count)", emb.nnz)
    state["store"] = phase("SparseRowStore.from_module", lambda: SparseRowStore.from_module(emb))
    print(f"  store: {state['store'].nbytes / gib:.2f} GiB ({state['store'].nbytes / table:.2f}x the table), "
          f"{state['store'].encoding}")
    assert state["store"].nnz == nnz
    state["pruned"] = phase("pruned_weight() (blocks)", emb.pruned_weight)
    nnz_pruned = phase("count_nonzero(pruned table)", lambda: int(torch.count_nonzero(state["pruned"])))
    assert nnz == nnz_pruned, (nnz, nnz_pruned)
    overall = max(row[3] for row in rows)  # (the peak is reset per phase: ru_maxrss is too)
    print(f"nnz {nnz:,} of {args.rows * args.dim:,}; process peak {overall / gib:.2f} GiB = "
          f"{overall / table:.2f}x the table ({(overall - start_rss) / table:.2f}x over the start)")


def measure_pep_export(args, phase, table):
    """`pep export`: load_retrained, SparseRowStore.from_module, save (the retrained file is
    written first, outside the measured phases)."""
    from pep_kernels import MaskedEmbedding
    from pep_kernels.train import checkpoint
    from pep_kernels.train.retrain import load_retrained
    from pep_kernels.train.spec import RunSpec

    gib = 2**30
    spec = RunSpec("fm", [args.rows], args.dim)
    model_file, store_file = args.pep_export / "retrained.safetensors", args.pep_export / "store.safetensors"
    torch.manual_seed(0)
    weight = torch.randn(args.rows, args.dim)
    model = spec.build(MaskedEmbedding(weight, torch.rand(args.rows, args.dim) < 0.4, field_dims=spec.field_dims))
    del weight
    checkpoint.save(model_file, model.state_dict(), {"spec": spec.to_dict(), "retrain": {}})
    del model
    print(f"wrote {model_file} ({model_file.stat().st_size / gib:.2f} GiB)")
    model, _ = phase("load_retrained", lambda: load_retrained(model_file))
    store = phase("SparseRowStore.from_module", lambda: SparseRowStore.from_module(model.embedding))
    print(f"  store: {store.nbytes / gib:.2f} GiB ({store.nbytes / table:.2f}x the table), {store.encoding}")
    phase("store.save", lambda: store.save(store_file))


if __name__ == "__main__":
    main()
