"""GPU benchmarks (run by benchmarks/gpu_check.sh; issue 24's measurements): every table in
benchmarks/RESULTS.md form, each candidate against baselines timed in the same run, and appended
to benchmarks/data/*.csv.

- `device`: the device, its datasheet peak HBM bandwidth (by name: H100 3.35 TB/s, H200 4.8 TB/s),
  and a device-to-device copy measured here.
- `lookup`: the lookup (forward, forward+backward with dense gradients) of `PEPEmbedding` on
  `wide` and `criteo`: kernel time (torch.profiler) and end-to-end time (`do_bench` over
  back-to-back module calls, no sync between them) against the eager reference, torch.compile of
  it and the floor (index_select of the W and threshold rows); bandwidth as a share of the peak.
- `step`: a training step of the table (forward, backward, optimizer) on `criteo` and `skewed`:
  `fast` Adam eagerly and replayed from a CUDA graph, `faithful` Adam, against the eager reference
  with torch's Adam on dense gradients (the published recipe), torch.compile of it, and a plain
  `nn.Embedding(sparse=True)` with `torch.optim.SparseAdam` on the same ids; each call takes the
  next of 16 id batches.
- `serve`: the CUDA store's lookup against `index_select` of the dense pruned table at 3% density
  (benchmarks/test_store.py's table and ids), with their bytes.
- `profile`: kernel time, launches and host syncs per call of the lookup and of the `fast` step,
  and the kernels that take the time.

    python benchmarks/bench_gpu.py {device,lookup,step,serve,profile} [--shapes ...] [--smoke] [--no-record]

`--smoke` runs tiny shapes on the CPU (the C++ kernels), to check the script without a GPU.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import append_rows, environment  # noqa: E402
from shapes import SHAPES, Shape, make_ids, make_inputs  # noqa: E402

from pep_kernels import PEPEmbedding, SparseRowStore, reference  # noqa: E402
from pep_kernels.optim import Adam  # noqa: E402

DATASHEET_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12}
SMOKE = {name: Shape(name, 2000, s.dim, 32, 4, zipf=s.zipf) for name, s in SHAPES.items()}


class Bench:
    """Timers and context of one run: CUDA (do_bench, profiler kernel time) or the CPU smoke run."""

    def __init__(self, smoke, record):
        self.smoke, self.record = smoke, record
        self.device = "cpu" if smoke else "cuda"
        self.env = environment(self.device)
        self.name = "cpu (smoke)" if smoke else torch.cuda.get_device_name()
        self.peak = next((v for k, v in DATASHEET_BYTES_PER_S.items() if k in self.name), None)

    def shape(self, name):
        return SMOKE[name] if self.smoke else SHAPES[name]

    def sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()

    def ms(self, fn):
        """Median ms per call: CUDA `do_bench` (L2 flushed between calls, no sync between them), or
        perf_counter on the CPU."""
        fn()  # compiles, autotunes, allocates outside the timed calls
        self.sync()
        if self.device == "cuda":
            import triton.testing  # noqa: PLC0415

            return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
        times = []
        for _ in range(5):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    def kernel_ms(self, fn, calls=10):
        """(kernel ms per call, kernels per call, syncs and copies per call) under torch.profiler."""
        from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

        for _ in range(3):
            fn()
        self.sync()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(calls):
                fn()
            self.sync()
        events = prof.key_averages()
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        syncs = sum(e.count for e in events if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize",
                                                           "cudaMemcpy", "cudaEventSynchronize"))
        kernel_ms = sum(e.self_device_time_total for e in kernels) / 1e3 / calls
        return kernel_ms, sum(e.count for e in kernels) / calls, syncs / calls, events

    def percent(self, nbytes, ms):
        return "-" if self.peak is None else f"{100 * nbytes / (ms * 1e-3) / self.peak:.1f}"

    def append(self, kind, rows):
        if self.record and not self.smoke:
            append_rows(kind, [{**self.env, **row} for row in rows])


def ratio(value, base):
    return f"{value:.3f} ({value / base:.2f}x)"


# --- device ---------------------------------------------------------------------------------------

def device_table(bench):
    lines = ["| device | datasheet HBM | measured copy |", "|---|---|---|"]
    if bench.smoke:
        return lines + ["| cpu (smoke) | - | - |"]
    src = torch.empty(1 << 28, dtype=torch.float32, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    ms = bench.ms(lambda: dst.copy_(src))
    copy = 2 * src.nbytes / (ms * 1e-3)
    peak = "unknown (not an H100 or H200)" if bench.peak is None else f"{bench.peak / 1e12:.2f} TB/s"
    lines.append(f"| {bench.name} | {peak} | {copy / 1e12:.2f} TB/s |")
    if bench.peak is None:
        bench.peak = copy  # the share of peak is then of the measured copy
    return lines


# --- lookup ---------------------------------------------------------------------------------------

def moved_bytes(shape, mode, elem, training):
    """Bytes the op must move: ids, the rows of W and of per-row thresholds, the output; with
    training also the upstream gradient, the rows again, and the dense gradients written (the zero
    fill of the (N, .) tables and the looked-up rows)."""
    n, d = shape.lookups, shape.dim
    s_cols = {"feature_dim": d, "feature": 1}.get(mode, 0)
    forward = n * 8 + n * d * elem + n * s_cols * 4 + n * d * elem
    if not training:
        return forward
    rows_again = n * d * elem + n * s_cols * 4
    gradients = shape.rows * (d + s_cols) * 4 + n * (d + s_cols) * 4
    return forward + n * d * elem + rows_again + gradients


def lookup_candidates(shape, mode, bench, training):
    ids, weight, threshold, gk = make_inputs(shape, mode, device=bench.device)
    table = PEPEmbedding(shape.rows, shape.dim, threshold_mode=mode, gk=gk, device=bench.device)
    with torch.no_grad():
        table.weight.copy_(weight)
        table.threshold.copy_(threshold.reshape(table.threshold.shape))
    w, s = weight.clone().requires_grad_(training), threshold.clone().requires_grad_(training)
    upstream = torch.randn(ids.shape + (shape.dim,), device=bench.device)
    compiled = torch.compile(reference.soft_threshold_embedding)
    flat = ids.reshape(-1)
    per_row = mode in ("feature", "feature_dim")

    def floor(ids, w, s, mode, gk):
        rows = torch.index_select(w, 0, flat)
        return (rows, torch.index_select(s, 0, flat)) if per_row else (rows,)

    def run(fn, params):
        def call():
            outs = fn()
            if training:
                for p in params:
                    p.grad = None
                outs = outs if isinstance(outs, tuple) else (outs,)
                torch.autograd.backward(outs, [upstream.view(o.shape) if o.numel() == upstream.numel()
                                               else torch.ones_like(o) for o in outs])
        return call

    table_params = [table.weight, table.threshold]
    return {
        "pep": run(lambda: table(ids), table_params),
        "reference": run(lambda: reference.soft_threshold_embedding(ids, w, s, mode, gk), [w, s]),
        "compiled reference": run(lambda: compiled(ids, w, s, mode, gk), [w, s]),
        "floor": run(lambda: floor(ids, w, s, mode, gk), [w, s]),
    }


def lookup_table(bench, shapes):
    cases = [(s, m) for s in shapes for m in (["feature_dim", "feature", "global"] if s == "criteo" else ["feature_dim"])]
    lines = ["| shape | mode | pass | pep kernel ms | % of peak (kernel) | pep ms | % of peak | reference ms (x) | "
             "torch.compile(reference) ms (x) | floor ms (x) |", "|---|---|---|---|---|---|---|---|---|---|"]
    rows = []
    for name, mode in cases:
        shape = bench.shape(name)
        for training in (False, True):
            fns = lookup_candidates(shape, mode, bench, training)
            times = {label: bench.ms(fn) for label, fn in fns.items()}
            kernel, launches, syncs, _ = bench.kernel_ms(fns["pep"])
            nbytes = moved_bytes(shape, mode, 4, training)
            pep = times["pep"]
            label = "fwd+bwd" if training else "fwd"
            lines.append(f"| {name} | {mode} | {label} | {kernel:.3f} | {bench.percent(nbytes, kernel)} | {pep:.3f} | "
                         f"{bench.percent(nbytes, pep)} | {ratio(times['reference'], pep)} | "
                         f"{ratio(times['compiled reference'], pep)} | {ratio(times['floor'], pep)} |")
            print(lines[-1], flush=True)
            common = {"pass": "forward+backward" if training else "forward", "shape": name, "mode": mode,
                      "dtype": "float32", "metric": "time", "unit": "ms", "candidate": "pep", "candidate_value": pep}
            rows += [{**common, "baseline": b, "baseline_value": times[b]} for b in times if b != "pep"]
            rows.append({**common, "metric": "kernel time", "candidate_value": kernel,
                         "note": f"{launches:.0f} kernels, {syncs:.0f} syncs per call; {nbytes} bytes moved"})
    bench.append("lookup", rows)
    return lines


# --- training step ----------------------------------------------------------------------------------

def step_candidates(shape, bench):
    """One training step of the table each (the upstream gradient fixed, so the steps differ only
    in the table's own work); each call takes the next of 16 id batches."""
    _, weight, threshold, gk = make_inputs(shape, "feature_dim", device=bench.device)
    batches = make_ids(shape, torch.Generator().manual_seed(1), 16).to(bench.device)
    target = torch.randn(shape.batch, shape.fields, shape.dim, device=bench.device)
    cursor = [0]

    def next_ids():
        cursor[0] = (cursor[0] + 1) % len(batches)
        return batches[cursor[0]]

    def pep_table(mode):
        table = PEPEmbedding(shape.rows, shape.dim, gk=gk, optimizer=Adam(weight_decay=1e-5, mode=mode),
                             device=bench.device)
        with torch.no_grad():
            table.weight.copy_(weight)
            table.threshold.copy_(threshold)
        return table

    def pep_step(mode):
        table = pep_table(mode)
        return lambda: table(next_ids()).backward(target)

    def pep_graph_step():
        """The `fast` step captured once in a CUDA graph on a static ids buffer and replayed."""
        table = pep_table("fast")
        static = batches[0].clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                table(static).backward(target)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            table(static).backward(target)

        def replay():
            static.copy_(next_ids())
            graph.replay()
        return replay

    def eager_step(compiled):
        w = weight.clone().requires_grad_(True)
        s = threshold.clone().requires_grad_(True)
        adam = torch.optim.Adam([w, s], lr=1e-3, weight_decay=1e-5)
        lookup = lambda ids: reference.soft_threshold_embedding(ids, w, s, "feature_dim", gk)  # noqa: E731
        lookup = torch.compile(lookup) if compiled else lookup

        def step():
            adam.zero_grad(set_to_none=True)
            lookup(next_ids()).backward(target)
            adam.step()
        return step

    def plain_step():
        emb = torch.nn.Embedding(shape.rows, shape.dim, sparse=True, device=bench.device)
        adam = torch.optim.SparseAdam(emb.parameters(), lr=1e-3)

        def step():
            adam.zero_grad(set_to_none=True)
            emb(next_ids()).backward(target)
            adam.step()
        return step

    steps = {"pep fast": pep_step("fast"), "pep faithful": pep_step("faithful"), "eager (dense Adam)":
             eager_step(False), "compiled eager": eager_step(True), "plain sparse": plain_step()}
    if bench.device == "cuda":
        steps["pep fast (CUDA graph)"] = pep_graph_step()
    return steps


def step_table(bench, shapes):
    labels = ["pep fast (CUDA graph)", "pep faithful", "eager (dense Adam)", "compiled eager", "plain sparse"]
    lines = ["Training step of the table (forward, backward, update; feature_dim; Adam lr 1e-3, coupled L2 1e-5; "
             "plain sparse: nn.Embedding(sparse=True) + torch.optim.SparseAdam), ms (x: the baseline's time over "
             "pep fast's):", "",
             "| shape | pep fast ms | " + " | ".join(f"{label} ms (x)" for label in labels) + " |",
             "|---|---|" + "---|" * len(labels)]
    rows = []
    for name in shapes:
        steps = step_candidates(bench.shape(name), bench)
        times = {label: bench.ms(fn) for label, fn in steps.items()}
        fast = times["pep fast"]
        cells = [ratio(times[label], fast) if label in times else "-" for label in labels]
        lines.append(f"| {name} | {fast:.3f} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
        common = {"pass": "train step", "shape": name, "mode": "feature_dim", "dtype": "float32", "metric": "time",
                  "unit": "ms", "candidate": "pep fast", "candidate_value": fast}
        rows += [{**common, "baseline": label, "baseline_value": t} for label, t in times.items() if label != "pep fast"]
    bench.append("train_step", rows)
    return lines


# --- serving ----------------------------------------------------------------------------------------

def serve_table(bench, dims=(32, 64), density=0.03):
    import test_store  # noqa: PLC0415 - its table and ids

    lines = ["| table | store ms | dense index_select ms (x) | store bytes | dense bytes | store / dense bytes |",
             "|---|---|---|---|---|---|"]
    rows = []
    for dim in dims:
        table = test_store.pruned_table(dim, density)
        ids = test_store.batch_ids()
        if bench.smoke:
            table, ids = table[:2000], ids % 2000
        store = SparseRowStore.from_dense(table).to(bench.device)
        dense, ids = table.to(bench.device), ids.to(bench.device)
        times = {"store": bench.ms(lambda: store.lookup(ids)),
                 "dense": bench.ms(lambda: torch.index_select(dense, 0, ids))}
        name = f"{table.shape[0]} x {dim}, {density:.0%} kept"
        lines.append(f"| {name} | {times['store']:.3f} | {ratio(times['dense'], times['store'])} | {store.nbytes} | "
                     f"{dense.nbytes} | {store.nbytes / dense.nbytes:.3f} |")
        print(lines[-1], flush=True)
        rows.append({"pass": "serve", "shape": name, "mode": "store fp32", "dtype": "float32", "metric": "time",
                     "unit": "ms", "candidate": "store fp32", "candidate_value": times["store"],
                     "baseline": "dense index_select", "baseline_value": times["dense"],
                     "note": f"{store.nbytes} store bytes, {dense.nbytes} dense bytes"})
    bench.append("store", rows)
    return lines


# --- profile ----------------------------------------------------------------------------------------

def profile_table(bench, shapes):
    lines = ["| shape | call | kernel ms/call | kernels/call | syncs/call |", "|---|---|---|---|---|"]
    tables, rows = [], []
    for name in shapes:
        shape = bench.shape(name)
        calls = {"pep fast step": step_candidates(shape, bench)["pep fast"],
                 "pep lookup": lookup_candidates(shape, "feature_dim", bench, False)["pep"]}
        for label, fn in calls.items():
            kernel, launches, syncs, events = bench.kernel_ms(fn)
            lines.append(f"| {name} | {label} | {kernel:.3f} | {launches:.0f} | {syncs:.0f} |")
            print(lines[-1], flush=True)
            rows.append({"pass": label, "shape": name, "mode": "feature_dim", "dtype": "float32",
                         "metric": "kernel time", "unit": "ms", "candidate": label, "candidate_value": kernel,
                         "note": f"{launches:.0f} kernels, {syncs:.0f} syncs per call"})
            sort = "self_cuda_time_total" if bench.device == "cuda" else "self_cpu_time_total"
            tables += ["", f"{name}, {label}:", "", events.table(sort_by=sort, row_limit=15)]
    bench.append("step_profile", rows)
    return lines + tables


PARTS = {"device": device_table, "lookup": lookup_table, "step": step_table, "serve": serve_table,
         "profile": profile_table}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parts", nargs="+", choices=list(PARTS))
    parser.add_argument("--shapes", nargs="+", default=None, choices=sorted(SHAPES),
                        help="lookup: wide criteo; step and profile: criteo skewed")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the script only")
    parser.add_argument("--no-record", action="store_true", help="do not append to benchmarks/data/*.csv")
    args = parser.parse_args(argv)
    bench = Bench(args.smoke, not args.no_record)
    print(f"{bench.name}, torch {torch.__version__}, {bench.env['date']}", flush=True)
    defaults = {"lookup": ["wide", "criteo"], "step": ["criteo", "skewed"], "profile": ["criteo"]}
    for part in args.parts:
        lines = PARTS[part](bench, args.shapes or defaults[part]) if part in defaults else PARTS[part](bench)
        print(f"\n## {part}\n\n" + "\n".join(lines) + "\n", flush=True)


if __name__ == "__main__":
    main()
