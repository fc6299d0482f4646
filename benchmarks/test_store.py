"""Serving lookups from a SparseRowStore on CPU, against the dense pruned table and FBGEMM's
inference TBE (../shared/BENCHMARKING.md), and the store's bytes against its target.

Tables: N = 1M rows, d = 32 and 64, 1%, 3%, 10% and 30% of the entries kept, in a PEP-like
pattern: row r (the Zipf rank of its id) keeps each of its dims with probability
min(1, c / sqrt(r + 1)), c set so that the table reaches its density. Rare rows are empty,
frequent rows dense. Ids: Zipf(1.1) over the row number, B = 2048, F = 39 (the `skewed` ids).

Candidates, each giving the (B * F, d) float32 rows of one batch:
- "store fp32" (the candidate), "store fp16", "store int8": `SparseRowStore.lookup`;
- "dense index_select": `index_select` on the pruned dense fp32 table (4 N d bytes), the floor;
- "fbgemm fp32", "fbgemm fp16", "fbgemm int8": FBGEMM's `IntNBitTableBatchedEmbeddingBagsCodegen`
  (rows on the host, fp32 output) over the table's kept rows, the empty rows pruned by index
  remapping (an int32 array of N entries, -1 for a pruned row), one id per bag. Omitted, with
  a warning, when `fbgemm_gpu` does not import.

    pytest benchmarks/test_store.py --benchmark-group-by=group
    STORE_BENCH_ROWS=100000 pytest benchmarks/test_store.py -k d32-10pct --benchmark-disable  # smoke run

`test_store_bytes` writes the sizes (store, its fp32 target 1.1 * (4 (N + 1) + 5 nnz), dense
table, FBGEMM) to .benchmarks/store_bytes.md, prints them (-s) and records them in
benchmarks/data/store_bytes.csv.
"""

import functools
import os
import warnings
from pathlib import Path

import pytest
import torch

from pep_kernels import SparseRowStore
import fbgemm_baselines as fb
from fbgemm_baselines import FBGEMM_MISSING
from shapes import Shape, make_ids


ROWS = int(os.environ.get("STORE_BENCH_ROWS", 1_000_000))
CASES = [(dim, density) for dim in (32, 64) for density in (0.01, 0.03, 0.10, 0.30)]
SHAPE = Shape("skewed", ROWS, 0, 2048, 39, zipf=1.1)  # the ids; each case sets its own dim


def case_id(case):
    return f"d{case[0]}-{round(case[1] * 100)}pct"


def keep_probabilities(rows, dim, density):
    """min(1, c / sqrt(r + 1)) per row r, c found by bisection so that the expected share of
    kept entries is `density`."""
    decay = torch.arange(1, rows + 1, dtype=torch.float64).rsqrt()
    low, high = 0.0, float(rows)
    for _ in range(60):
        c = (low + high) / 2
        low, high = (c, high) if float((c * decay).clamp(max=1).mean()) < density else (low, c)
    return (high * decay).clamp(max=1).float()


@functools.lru_cache(maxsize=1)  # one 1M x 64 table at a time: cases run table by table
def pruned_table(dim, density):
    gen = torch.Generator().manual_seed(0)
    keep = torch.rand(ROWS, dim, generator=gen) < keep_probabilities(ROWS, dim, density)[:, None]
    return torch.where(keep, torch.randn(ROWS, dim, generator=gen), torch.zeros(()))


@functools.lru_cache(maxsize=1)
def batch_ids():
    return make_ids(SHAPE, torch.Generator().manual_seed(1))[0].reshape(-1)


def fbgemm_table(table, weight_type):
    """FBGEMM's inference TBE over the kept rows of `table`, empty rows pruned by remapping; and its bytes."""
    kept = (table != 0).any(1)
    rows = table[kept]
    remap = torch.full((table.shape[0],), -1, dtype=torch.int32)
    remap[kept] = torch.arange(rows.shape[0], dtype=torch.int32)
    sparse_type = getattr(fb.SparseType, weight_type.upper())
    tbe = fb.IntNBitTableBatchedEmbeddingBagsCodegen(
        [("table", rows.shape[0], table.shape[1], sparse_type, fb.EmbeddingLocation.HOST)], index_remapping=[remap],
        pooling_mode=fb.PoolingMode.SUM, device="cpu", output_dtype=fb.SparseType.FP32)
    tbe.initialize_weights()
    weights, scale_bias = tbe.split_embedding_weights()[0]
    d = table.shape[1]
    if weight_type == "fp32":
        weights[:, : 4 * d].view(torch.float32).copy_(rows)
    elif weight_type == "fp16":
        weights[:, : 2 * d].view(torch.float16).copy_(rows.half())
    else:  # FBGEMM's row-wise int8: value = q * scale + bias, fp16 scale and bias before the row
        low, high = rows.amin(1, keepdim=True), rows.amax(1, keepdim=True)
        scale = ((high - low) / 255).clamp(min=1e-8).half().float()
        bias = low.half().float()
        weights[:, :d].copy_(((rows - bias) / scale).round().clamp(0, 255).to(torch.uint8))
        scale_bias[:, :2].view(torch.float16).copy_(scale.half())
        scale_bias[:, 2:4].view(torch.float16).copy_(bias.half())
    nbytes = tbe.weights_host.numel() * tbe.weights_host.element_size() + remap.nbytes
    return tbe, nbytes


def serving_fns(case):
    table = pruned_table(*case)
    ids = batch_ids()
    stores = {values: SparseRowStore.from_dense(table, values=values) for values in ("fp32", "fp16", "int8")}
    fns = {f"store {values}": (lambda s=store: s.lookup(ids)) for values, store in stores.items()}
    fns["dense index_select"] = lambda: torch.index_select(table, 0, ids)
    if FBGEMM_MISSING is None:
        ids32, bags = ids.int(), torch.arange(ids.numel() + 1, dtype=torch.int32)
        for weight_type in ("fp32", "fp16", "int8"):
            tbe, _ = fbgemm_table(table, weight_type)
            fns[f"fbgemm {weight_type}"] = lambda tbe=tbe: tbe(ids32, bags)
        assert torch.equal(fns["fbgemm fp32"](), fns["dense index_select"]()), "the FBGEMM baseline is wrong"
    else:
        warnings.warn(f"fbgemm_gpu does not import ({FBGEMM_MISSING}): no FBGEMM baseline")
    assert torch.equal(fns["store fp32"](), fns["dense index_select"]())
    return fns


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_serve(benchmark, interleaved, case):
    fns = serving_fns(case)
    benchmark.group = f"serve N={ROWS} {case_id(case)}"
    interleaved(benchmark.group, "store fp32", fns, case={"pass": "lookup", "shape": f"N={ROWS} {case_id(case)}"})
    benchmark(fns["store fp32"])


@pytest.fixture(scope="module")
def bytes_table():
    lines = ["| table | nnz | store fp32 | target 1.1 (4 (N+1) + 5 nnz) | store / target | encoding | "
             "store fp16 | store int8 | dense fp32 | fbgemm fp32 | fbgemm int8 |", "|" + "---|" * 11]
    yield lines
    text = "\n".join(lines)
    print("\n" + text)
    Path(".benchmarks").mkdir(exist_ok=True)
    Path(".benchmarks/store_bytes.md").write_text(text + "\n")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_store_bytes(bytes_table, recorded, case):
    table = pruned_table(*case)
    stores = {values: SparseRowStore.from_dense(table, values=values) for values in ("fp32", "fp16", "int8")}
    fp32 = stores["fp32"]
    target = 1.1 * (4 * (ROWS + 1) + 5 * fp32.nnz)
    fbgemm_bytes = {} if FBGEMM_MISSING else {f"fbgemm {t}": fbgemm_table(table, t)[1] for t in ("fp32", "int8")}
    fbgemm = [f"{value:,}" for value in fbgemm_bytes.values()] or ["-", "-"]
    baselines = {"target 1.1 (4 (N+1) + 5 nnz)": round(target), "store fp16": stores["fp16"].nbytes,
                 "store int8": stores["int8"].nbytes, "dense fp32": table.numel() * 4, **fbgemm_bytes}
    recorded("store_bytes", [
        {"pass": "size", "shape": f"N={ROWS} {case_id(case)}", "metric": "size", "unit": "bytes",
         "candidate": "store fp32", "candidate_value": fp32.nbytes, "baseline": name, "baseline_value": value,
         "note": f"nnz {fp32.nnz}, encoding {fp32.encoding}"} for name, value in baselines.items()])
    bytes_table.append(
        f"| N={ROWS} {case_id(case)} | {fp32.nnz:,} | {fp32.nbytes:,} | {target:,.0f} | {fp32.nbytes / target:.3f} | "
        f"{fp32.encoding} | {stores['fp16'].nbytes:,} | {stores['int8'].nbytes:,} | {table.numel() * 4:,} | "
        f"{' | '.join(fbgemm)} |")
    assert fp32.nbytes <= target
