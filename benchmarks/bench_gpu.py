"""GPU timings of the soft-threshold lookup and of a training step (run by benchmarks/gpu_check.sh).

Triton against the eager reference, torch.compile of the reference and the floor (index_select
of the W and threshold rows), with triton.testing.do_bench (L2 flushed between runs, median of
the timed runs). Effective bandwidth counts the bytes the op must move: ids, the gathered rows of
W and of the thresholds, the output; forward+backward adds the upstream gradient, a second read
of the rows, the read-modify-write of the gradient rows and the zero fill of the dense gradients.

A training step (forward, backward, optimizer) of the table alone: PEPEmbedding with the fused
Adam (`fast` and `faithful`) against the eager reference with torch's Adam on dense gradients
(the published recipe) and torch.compile of its forward and loss; each call takes the next of
16 id batches, so that `fast` pays its replays as in training.

    python benchmarks/bench_gpu.py {lookup,step,profile} [--out results.md] [--shapes wide criteo] [--smoke]
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import SHAPES, Shape, make_inputs  # noqa: E402

from pep_kernels import PEPEmbedding, reference, soft_threshold_embedding  # noqa: E402
from pep_kernels.optim import Adam  # noqa: E402

PEAK_BYTES_PER_S = 4.8e12  # H200 HBM3e


def moved_bytes(shape, mode, elem, training):
    n, d = shape.lookups, shape.dim
    s_cols = {"feature_dim": d, "feature": 1}.get(mode, 0)  # shared thresholds stay in cache
    read = n * 8 + n * d * elem + n * s_cols * 4
    forward = read + n * d * elem
    if not training:
        return forward
    grad_rows = 2 * n * (d * 4 + s_cols * 4)  # atomic read-modify-write of the fp32 gradient rows
    zero_fill = shape.rows * (d * 4 + s_cols * 4)
    return forward + n * d * elem + read + grad_rows + zero_fill


def candidates(ids, weight, threshold, mode, gk, backend):
    flat = ids.reshape(-1)
    per_row = mode in ("feature", "feature_dim")
    compiled = torch.compile(reference.soft_threshold_embedding)

    def floor(ids, w, s, mode, gk):
        rows = torch.index_select(w, 0, flat)
        return (rows, torch.index_select(s, 0, flat)) if per_row else (rows,)

    return {
        "pep": lambda ids, w, s, mode, gk: soft_threshold_embedding(ids, w, s, mode=mode, gk=gk, backend=backend),
        "reference": reference.soft_threshold_embedding,
        "compiled reference": compiled,
        "floor": floor,
    }


def timer(device):
    if device == "cuda":
        import triton.testing

        def cuda_ms(fn):
            fn()  # compile and autotune outside the timed runs
            torch.cuda.synchronize()
            return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

        return cuda_ms

    def cpu_ms(fn):
        fn()
        start = time.perf_counter()
        for _ in range(5):
            fn()
        return (time.perf_counter() - start) / 5 * 1e3

    return cpu_ms


def run_case(shape, mode, dtype, training, device, backend, time_ms):
    ids, weight, threshold, gk = make_inputs(shape, mode, device=device, dtype=dtype)
    weight.requires_grad_(training)
    threshold.requires_grad_(training)
    upstream = torch.randn(ids.shape + (shape.dim,), device=device, dtype=dtype)
    results = {}
    for name, fn in candidates(ids, weight, threshold, mode, gk, backend).items():
        def call(fn=fn):
            outs = fn(ids, weight, threshold, mode, gk)
            if training:
                weight.grad = threshold.grad = None
                outs = outs if isinstance(outs, tuple) else (outs,)
                torch.autograd.backward(outs, [upstream.view(o.shape) if o.numel() == upstream.numel() else
                                               torch.ones_like(o) for o in outs])
        results[name] = time_ms(call)
    return results


def train_steps(shape, device, backend):
    """One training step of the table each: pep fast, pep faithful, eager, compiled eager."""
    _, weight, threshold, gk = make_inputs(shape, "feature_dim", device=device)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, shape.rows, (shape.batch, shape.fields), generator=gen).to(device) for _ in range(16)]
    target = torch.randn(shape.batch, shape.fields, shape.dim, device=device)
    cursor = [0]

    def next_ids():
        cursor[0] = (cursor[0] + 1) % len(batches)
        return batches[cursor[0]]

    def pep_step(mode):
        table = PEPEmbedding(shape.rows, shape.dim, backend=backend, optimizer=Adam(weight_decay=1e-5, mode=mode))
        table.to(device)
        with torch.no_grad():
            table.weight.copy_(weight)
            table.threshold.copy_(threshold)
        return lambda: (table(next_ids()) * target).sum().backward()

    def eager_step(compiled):
        w = weight.clone().requires_grad_(True)
        s = threshold.clone().requires_grad_(True)
        adam = torch.optim.Adam([w, s], lr=1e-3, weight_decay=1e-5)
        loss = lambda ids: (reference.soft_threshold_embedding(ids, w, s, "feature_dim", gk) * target).sum()  # noqa: E731
        loss = torch.compile(loss) if compiled else loss

        def step():
            adam.zero_grad(set_to_none=True)
            loss(next_ids()).backward()
            adam.step()
        return step

    return {"pep fast": pep_step("fast"), "pep faithful": pep_step("faithful"), "eager": eager_step(False),
            "compiled eager": eager_step(True)}


def train_step_case(shape, device, backend, time_ms):
    """ms per training step of the table: pep fast, pep faithful, eager, compiled eager."""
    return {name: time_ms(step) for name, step in train_steps(shape, device, backend).items()}


def lookup_table(shapes, device, backend, time_ms, smoke):
    cases = [(SHAPES[s], "feature_dim", torch.float32) for s in shapes]
    if "wide" in shapes:
        cases.append((SHAPES["wide"], "feature_dim", torch.bfloat16))
    if "criteo" in shapes:
        cases += [(SHAPES["criteo"], "feature", torch.float32), (SHAPES["criteo"], "global", torch.float32)]
    if smoke:
        cases = [(Shape(s.name, 1000, s.dim, 16, 4), m, torch.float32) for s, m, dt in cases if dt == torch.float32]
    lines = [
        "| shape | mode | dtype | pass | pep ms | GB/s | % of 4.8 TB/s | reference ms (x) | compiled ref ms (x) | floor ms (x) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for shape, mode, dtype in cases:
        for training in (False, True):
            r = run_case(shape, mode, dtype, training, device, backend, time_ms)
            gbs = moved_bytes(shape, mode, torch.finfo(dtype).bits // 8, training) / (r["pep"] * 1e-3) / 1e9
            ratio = lambda name: f"{r[name]:.3f} ({r[name] / r['pep']:.2f}x)"  # noqa: E731
            lines.append(
                f"| {shape.name} | {mode} | {str(dtype).removeprefix('torch.')} | {'fwd+bwd' if training else 'fwd'} | "
                f"{r['pep']:.3f} | {gbs:.0f} | {100 * gbs * 1e9 / PEAK_BYTES_PER_S:.1f} | {ratio('reference')} | "
                f"{ratio('compiled reference')} | {ratio('floor')} |"
            )
            print(lines[-1], flush=True)
    return lines


def step_table(shapes, device, backend, time_ms, smoke):
    lines = ["Training step of the table (forward, backward, Adam with coupled L2 1e-5), feature_dim:", "",
             "| shape | pep fast ms | pep faithful ms (x) | eager ms (x) | compiled eager ms (x) |", "|---|---|---|---|---|"]
    for name in shapes:
        shape = Shape(name, 1000, SHAPES[name].dim, 16, 4) if smoke else SHAPES[name]
        r = train_step_case(shape, device, backend, time_ms)
        ratio = lambda key: f"{r[key]:.3f} ({r[key] / r['pep fast']:.2f}x)"  # noqa: E731
        lines.append(f"| {name} | {r['pep fast']:.3f} | {ratio('pep faithful')} | {ratio('eager')} | "
                     f"{ratio('compiled eager')} |")
        print(lines[-1], flush=True)
    return lines


def profile_table(shapes, device, backend, time_ms, smoke, steps=5):
    """Where the time of a pep training step and of a pep lookup (forward, feature_dim) goes:
    torch.profiler over `steps` calls after a warm-up; wall time, kernel time, launches and host
    syncs per call, and the ops that take the most."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    lines = ["| shape | call | wall ms/call (profiled) | kernel ms/call | kernels/call | syncs and copies/call |",
             "|---|---|---|---|---|---|"]
    tables = []
    for name in shapes:
        shape = Shape(name, 1000, SHAPES[name].dim, 16, 4) if smoke else SHAPES[name]
        candidates = train_steps(shape, device, backend)
        ids, weight, threshold, gk = make_inputs(shape, "feature_dim", device=device)
        candidates["pep lookup"] = lambda: soft_threshold_embedding(ids, weight, threshold, gk=gk, backend=backend)
        for label in ("pep fast", "pep faithful", "pep lookup"):
            step = candidates[label]
            for _ in range(3):
                step()
            if device == "cuda":
                torch.cuda.synchronize()
            with profile(activities=activities) as prof:
                start = time.perf_counter()
                for _ in range(steps):
                    step()
                if device == "cuda":
                    torch.cuda.synchronize()
                wall_ms = (time.perf_counter() - start) * 1e3 / steps
            events = prof.key_averages()
            kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
            kernel_ms = sum(e.self_device_time_total for e in kernels) / 1e3 / steps
            launches = sum(e.count for e in kernels) / steps
            syncs = sum(e.count for e in events if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize",
                                                               "cudaMemcpyAsync", "cudaMemcpy")) / steps
            lines.append(f"| {name} | {label} | {wall_ms:.3f} | {kernel_ms:.3f} | {launches:.0f} | {syncs:.0f} |")
            print(lines[-1], flush=True)
            sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
            tables += ["", f"{name}, {label}, {steps} steps:", "", events.table(sort_by=sort, row_limit=25)]
    return lines + tables


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["lookup", "step", "profile"],
                        help="the lookup alone, a training step of the table, or where their time goes")
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    parser.add_argument("--shapes", nargs="+", default=["wide", "criteo"], choices=sorted(SHAPES))
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU backend: checks the script only")
    args = parser.parse_args(argv)
    device = "cpu" if args.smoke else "cuda"
    backend = "cpu" if args.smoke else "triton"
    table = {"lookup": lookup_table, "step": step_table, "profile": profile_table}[args.part]
    lines = [f"GPU: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu (smoke)'}, torch {torch.__version__}", ""]
    lines += table(args.shapes, device, backend, timer(device), args.smoke)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
