"""SparseRowStore and PrunedEmbedding: exact round trips in every value type and row layout,
embedding_bag parity, model swaps, store files (atomic saves, every kind of damage), threads,
torch.library registration, torch.compile and export, `pep export`, and the CUDA source."""

import concurrent.futures
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from utils import out_tol
from pep_kernels import MaskedEmbedding, PEPEmbedding, PrunedEmbedding, SparseRowStore
from pep_kernels.cli import load_data, main
from pep_kernels.models import build_model
from pep_kernels.store import checksum
from pep_kernels.train import checkpoint
from pep_kernels.train.spec import RunSpec

ops = torch.ops.pep_kernels
ROOT = Path(__file__).resolve().parent.parent
DIMS = (1, 3, 17, 33, 128, 300)  # uint8 column ids up to 256, 2-byte ids past it; masks of 1..38 bytes
VALUES = ("fp32", "fp16", "bf16", "int8")
ENCODINGS = ("columns", "bitmask")
LOSSY = {"fp16": torch.float16, "bf16": torch.bfloat16}


def pruned_table(rows, dim, density=0.4, seed=0):
    """A pruned table: about `density` of the entries kept, every 4th row empty, row 0 full, no
    negative zeros (a store reads a pruned entry as +0.0)."""
    gen = torch.Generator().manual_seed(seed)
    keep = torch.rand(rows, dim, generator=gen) < density
    keep[0] = True
    keep[1::4] = False
    return torch.where(keep, torch.randn(rows, dim, generator=gen), torch.zeros(()))


def random_ids(rows, shape, seed=1, dtype=torch.int64):
    return torch.randint(0, rows, shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def bits(t):
    return t.contiguous().view(torch.int32)


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_fp32_lookups_are_bit_exact(dim, encoding):
    table = pruned_table(41, dim)
    store = SparseRowStore.from_dense(table, encoding=encoding)
    assert (store.encoding, store.num_embeddings, store.embedding_dim) == (encoding, 41, dim)
    assert store.nnz == int(torch.count_nonzero(table)) and store.max_error == 0.0
    assert store.rows_kept == int((table != 0).any(1).sum())
    for dtype in (torch.int64, torch.int32):
        ids = random_ids(41, (5, 7), dtype=dtype)
        out = store.lookup(ids)
        assert out.shape == (5, 7, dim) and out.dtype == torch.float32
        assert torch.equal(bits(out), bits(table[ids.long()]))
    assert torch.equal(bits(store.to_dense()), bits(table))
    assert torch.equal(store.dims_per_row(), (table != 0).sum(1))
    assert torch.equal(store(ids), store.lookup(ids))


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("values", VALUES[1:])
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_lossy_values_stay_within_their_error(dim, values, encoding):
    table = pruned_table(37, dim) * 3
    store = SparseRowStore.from_dense(table, values=values, encoding=encoding)
    decoded = store.to_dense()
    assert (decoded[table == 0] == 0).all(), "pruned entries read as exact zeros"
    error = (decoded.double() - table.double()).abs()
    assert float(error.max()) == store.max_error
    assert store.max_error > 0 or (values == "int8" and dim == 1)  # one value per row: +-127 steps, exact
    row_max = table.double().abs().amax(1, keepdim=True)
    if values in LOSSY:
        # Round to nearest: exactly torch's conversion, within half an ulp.
        assert torch.equal(decoded, table.to(LOSSY[values]).float())
        ulp = {"fp16": 2.0**-10, "bf16": 2.0**-7}[values]
        assert (error <= row_max * ulp / 2 * (1 + 1e-6)).all()
    else:
        # int8 with a per-row scale max|w| / 127: within half a step of its row (and float rounding).
        assert (error <= row_max / 254 * (1 + 1e-4)).all()
    ids = random_ids(37, (9,))
    assert torch.equal(store.lookup(ids), decoded[ids])


@pytest.mark.parametrize("values", VALUES)
@pytest.mark.parametrize("dim", (16, 21, 64))
def test_bitmask_rows_near_the_end_of_the_payload(values, dim):
    """The AVX2 lookup expands a bitmask row 8 columns at a time from 8 values that may run past
    the row: past the payload's end it must decode value by value (rows of 1-3 values last)."""
    gen = torch.Generator().manual_seed(3)
    table = torch.zeros(6, dim)
    table[0] = torch.randn(dim, generator=gen)  # every column kept
    table[1, ::3] = torch.randn(len(range(0, dim, 3)), generator=gen)
    for row, columns in ((3, [dim - 1]), (4, [0, 9, dim - 2]), (5, [7, 8])):
        table[row, columns] = torch.randn(len(columns), generator=gen)
    store = SparseRowStore.from_dense(table, values=values, encoding="bitmask")
    expected = table if values == "fp32" else store.to_dense()
    if values in LOSSY:
        assert torch.equal(expected, table.to(LOSSY[values]).float())
    ids = torch.tensor([5, 4, 3, 2, 1, 0, 5, 5, 4])
    assert torch.equal(bits(store.lookup(ids)), bits(expected[ids]))
    assert torch.equal(bits(store.lookup(ids[:1])), bits(expected[5:6]))


def test_every_half_value_round_trips():
    halves = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16)
    finite = halves[torch.isfinite(halves) & (halves != 0)].float()  # NaN and inf cannot be stored as fp16
    table = torch.nn.functional.pad(finite, (0, -finite.numel() % 64)).view(-1, 64)
    assert torch.equal(SparseRowStore.from_dense(table, values="fp16").to_dense(), table)


def test_empty_rows_tables_and_batches():
    empty = SparseRowStore.from_dense(torch.zeros(6, 5))
    assert (empty.nnz, empty.rows_kept, empty.payload.numel()) == (0, 0, 0)
    assert torch.equal(empty.lookup(torch.tensor([[0, 5], [3, 3]])), torch.zeros(2, 2, 5))
    assert empty.stats()["dims_per_row_histogram"] == [6, 0, 0, 0, 0, 0]
    store = SparseRowStore.from_dense(pruned_table(8, 3))
    assert store.lookup(torch.zeros(0, dtype=torch.long)).shape == (0, 3)
    assert store.lookup(torch.zeros(4, 0, dtype=torch.long)).shape == (4, 0, 3)
    assert torch.equal(store.lookup(torch.tensor([1, 5])), torch.zeros(2, 3))  # rows 1 and 5 are empty
    assert store.lookup_bag(torch.zeros(3, 0, dtype=torch.long)).shape == (3, 3)


def test_auto_encoding_picks_the_smaller_layout():
    dense_rows = pruned_table(50, 64, density=0.9)  # a mask (8 bytes) beats 58 column ids
    sparse_rows = pruned_table(50, 64, density=0.03)  # a couple of ids beat an 8-byte mask
    for table, expected in ((dense_rows, "bitmask"), (sparse_rows, "columns")):
        sizes = {e: SparseRowStore.from_dense(table, encoding=e).nbytes for e in ENCODINGS}
        store = SparseRowStore.from_dense(table)
        assert store.encoding == expected and store.nbytes == min(sizes.values())


@pytest.mark.parametrize("dim", (17, 300))
@pytest.mark.parametrize("values", VALUES)
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_stats_account_for_every_byte(dim, values, encoding):
    table = pruned_table(30, dim)
    store = SparseRowStore.from_dense(table, values=values, encoding=encoding)
    stats = store.stats()
    assert sum(stats["bytes"].values()) == stats["nbytes"] == store.nbytes
    assert stats["rows_kept"] == store.rows_kept and stats["nnz"] == store.nnz
    histogram = stats["dims_per_row_histogram"]
    assert len(histogram) == dim + 1 and sum(histogram) == 30
    assert sum(k * count for k, count in enumerate(histogram)) == store.nnz
    assert stats["ratio_to_dense"] == store.nbytes / (30 * dim * 4)
    index = "column_ids" if encoding == "columns" else "masks"
    per_entry = 1 if dim <= 256 else 2
    assert stats["bytes"][index] == (store.nnz * per_entry if encoding == "columns" else store.rows_kept * -(-dim // 8))


def test_fp32_size_meets_the_target():
    table = pruned_table(5000, 32, density=0.1)
    store = SparseRowStore.from_dense(table)
    assert store.nbytes <= 1.1 * (4 * (5000 + 1) + 5 * store.nnz)


def test_bad_tables_and_options():
    with pytest.raises(TypeError, match="floating-point"):
        SparseRowStore.from_dense(torch.ones(3, 2, dtype=torch.long))
    for shape in ((4,), (0, 3), (2, 70000)):
        with pytest.raises(ValueError, match=r"\(N, d\)"):
            SparseRowStore.from_dense(torch.ones(shape))
    with pytest.raises(ValueError, match="unknown values 'fp8'"):
        SparseRowStore.from_dense(torch.ones(2, 2), values="fp8")
    with pytest.raises(ValueError, match="unknown encoding 'csr'"):
        SparseRowStore.from_dense(torch.ones(2, 2), encoding="csr")
    with pytest.raises(ValueError, match="beyond the fp16 range"):
        SparseRowStore.from_dense(torch.tensor([[1e6, 0.0]]), values="fp16")
    for values in ("int8", "bf16"):
        with pytest.raises(ValueError, match="finite table"):
            SparseRowStore.from_dense(torch.tensor([[float("nan"), 1.0]]), values=values)
    special = torch.tensor([[float("inf"), float("-inf"), 0.0, 1e-45]])  # fp32 keeps them all exactly
    assert torch.equal(SparseRowStore.from_dense(special).to_dense(), special)


@pytest.mark.parametrize("values, encoding", [("fp32", "columns"), ("int8", "bitmask"), ("bf16", "columns")])
def test_stores_built_block_by_block_equal_one_block(monkeypatch, values, encoding):
    """from_dense and from_module encode a few rows at a time (no dense copy of a big table):
    the blocks' offsets and payloads join into exactly the one-block store."""
    table = pruned_table(50, 17, density=0.3).double()
    whole = SparseRowStore.from_dense(table, values=values, encoding=encoding)
    monkeypatch.setattr("pep_kernels.store.BLOCK_ENTRIES", 40)  # blocks of 2 rows
    blocks = SparseRowStore.from_dense(table, values=values, encoding=encoding)
    assert torch.equal(blocks.offsets, whole.offsets) and torch.equal(blocks.payload, whole.payload)
    assert blocks.max_error == whole.max_error
    emb = PEPEmbedding(150, 17, threshold_mode="feature", threshold_init=-1.5, field_dims=[20, 130])
    masked = MaskedEmbedding(torch.randn(150, 17), torch.rand(150, 17) < 0.3)
    for module in (emb, masked):
        expected = SparseRowStore.from_dense(module.pruned_weight(), values=values, encoding=encoding)
        monkeypatch.setattr(type(module), "BLOCK_ENTRIES", 1)  # blocks of 64 rows
        store = SparseRowStore.from_module(module, values=values, encoding=encoding)
        assert torch.equal(store.offsets, expected.offsets) and torch.equal(store.payload, expected.payload)
        assert store.max_error == expected.max_error


@pytest.mark.parametrize("mode", ["global", "dimension", "feature", "feature_dim", "field", "field_dim"])
def test_pruned_weight_is_what_lookups_return_in_blocks_of_any_size(monkeypatch, mode):
    """Built one row at a time or in one block, across field boundaries, the pruned table is
    bitwise what the lookups return (one formula, whatever the blocks or the CPU's vector
    width), and the reference's to its tolerance (torch's sigmoid rounds the last bit its own way)."""
    from pep_kernels import reference

    fields = [70, 60, 70]
    emb = PEPEmbedding(200, 6, threshold_mode=mode, threshold_init=-1.0, field_dims=fields)
    with torch.no_grad():
        emb.threshold.uniform_(-3, 0)
        emb.weight.mul_(50)
    one_pass = emb.pruned_weight()
    monkeypatch.setattr(PEPEmbedding, "BLOCK_ENTRIES", 1)
    assert torch.equal(emb.pruned_weight(), one_pass)
    local = torch.minimum(torch.arange(max(fields)).unsqueeze(1), torch.tensor(fields) - 1)  # every row of every field
    global_ids = local + torch.tensor([0, 70, 130])
    assert torch.equal(emb(local).detach(), one_pass[global_ids])
    expected = reference.soft_threshold(emb.weight, emb.threshold, mode, emb.gk, fields)
    assert 0 < int((expected != 0).sum()) < expected.numel()
    torch.testing.assert_close(one_pass, expected.detach(), **out_tol(emb.gk))


def test_float64_tables_report_their_rounding():
    table = pruned_table(9, 5).double() / 3
    store = SparseRowStore.from_dense(table)
    assert torch.equal(store.to_dense(), table.float())
    assert store.max_error == float((table.float().double() - table).abs().max()) > 0


# ---------------------------------------------------------------- bags and ids


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_lookup_bag_matches_embedding_bag(encoding, mode):
    table = pruned_table(60, 33)
    store = SparseRowStore.from_dense(table, encoding=encoding)
    ids2d = random_ids(60, (6, 5))
    torch.testing.assert_close(store.lookup_bag(ids2d, mode=mode), F.embedding_bag(ids2d, table, mode=mode),
                               rtol=1e-6, atol=1e-6)
    flat = random_ids(60, (11,), seed=2)
    offsets = torch.tensor([0, 3, 3, 8])  # bag 1 is empty
    torch.testing.assert_close(store.lookup_bag(flat, offsets, mode=mode),
                               F.embedding_bag(flat, table, offsets, mode=mode), rtol=1e-6, atol=1e-6)
    if mode == "sum":
        weights = torch.rand(6, 5)
        torch.testing.assert_close(store.lookup_bag(ids2d, per_sample_weights=weights),
                                   F.embedding_bag(ids2d, table, per_sample_weights=weights, mode="sum"),
                                   rtol=1e-6, atol=1e-6)
        weights = torch.rand(11)
        torch.testing.assert_close(store.lookup_bag(flat, offsets, per_sample_weights=weights),
                                   F.embedding_bag(flat, table, offsets, per_sample_weights=weights, mode="sum"),
                                   rtol=1e-6, atol=1e-6)


def test_bad_bags():
    store = SparseRowStore.from_dense(pruned_table(10, 4))
    ids = torch.tensor([1, 2, 3])
    with pytest.raises(ValueError, match="need mode 'sum'"):
        store.lookup_bag(ids[None], mode="mean", per_sample_weights=torch.ones(1, 3))
    with pytest.raises(ValueError, match="unknown bag mode 'max'"):
        store.lookup_bag(ids[None], mode="max")
    with pytest.raises(ValueError, match="run from 0"):
        store.lookup_bag(ids, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="must be non-decreasing and at most the number of ids 3, got 2 then 1"):
        store.lookup_bag(ids, torch.tensor([0, 2, 1]))
    with pytest.raises(ValueError, match="at most the number of ids 3, got 4 then 3"):
        store.lookup_bag(ids, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="1-D indices need"):
        store.lookup_bag(ids)
    with pytest.raises(ValueError, match="shape of indices"):
        store.lookup_bag(ids[None], per_sample_weights=torch.ones(3))
    with pytest.raises(TypeError, match="float32"):
        store.lookup_bag(ids[None], per_sample_weights=torch.ones(1, 3, dtype=torch.float64))


@pytest.mark.parametrize("bad", [-1, 10, 2**40])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_out_of_range_ids_raise_index_error(bad, dtype):
    bad = min(bad, 2**31 - 1) if dtype == torch.int32 else bad
    store = SparseRowStore.from_dense(pruned_table(10, 4))
    ids = torch.tensor([[0, 3], [bad, 1]], dtype=dtype)
    message = rf"index {bad} is out of range for a store of 10 rows \(valid ids are 0\.\.9\)"
    with pytest.raises(IndexError, match=message):
        store.lookup(ids)
    with pytest.raises(IndexError, match=rf"index {bad} is out of range"):
        store.lookup_bag(ids)
    with pytest.raises(TypeError, match="ids must be int32 or int64"):
        store.lookup(ids.float())
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        store.lookup([0, 1])


# ---------------------------------------------------------------- models


def field_model(embedding, field_dims):
    torch.manual_seed(3)
    return build_model("fm", field_dims, embedding).eval()


FIELD_DIMS = [5, 7, 3, 9]


def field_ids(batch=64, seed=4):
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, f, (batch,), generator=gen) for f in FIELD_DIMS], 1)


@pytest.mark.parametrize("values", ["fp32", "int8"])
def test_pruned_embedding_swaps_into_a_trained_model(values):
    n, d = sum(FIELD_DIMS), 8
    gen = torch.Generator().manual_seed(5)
    masked = MaskedEmbedding(torch.randn(n, d, generator=gen), torch.rand(n, d, generator=gen) < 0.3,
                             field_dims=FIELD_DIMS)
    model = field_model(masked, FIELD_DIMS)
    x = field_ids()
    with torch.no_grad():
        expected = model(x)
        store = SparseRowStore.from_module(masked, values=values)
        model.embedding = PrunedEmbedding(store, field_dims=FIELD_DIMS)
        served = model(x)
    if values == "fp32":
        assert torch.equal(served, expected)
    else:
        torch.testing.assert_close(served, expected, rtol=0.05, atol=0.05)
    embedding = model.embedding
    assert embedding.nnz() == store.nnz and not list(embedding.parameters())
    assert embedding.sparsity() == 1 - store.nnz / (n * d)
    assert "store." not in " ".join(model.state_dict())  # the store travels in its own file
    with pytest.raises(IndexError, match="id 7 in field 0 is out of range"):
        embedding(torch.tensor([[7, 0, 0, 0]]))


def test_pruned_embedding_matches_pep_embedding():
    n, d = sum(FIELD_DIMS), 6
    torch.manual_seed(6)
    for mode, backend in (("global", "reference"), ("feature_dim", "cpu")):
        pep = PEPEmbedding(n, d, threshold_mode=mode, threshold_init=-1.0, gk=0.5, field_dims=FIELD_DIMS,
                           backend=backend)
        model = field_model(pep, FIELD_DIMS)
        x = field_ids()
        with torch.no_grad():
            expected = model(x)
            model.embedding = PrunedEmbedding(SparseRowStore.from_module(pep), field_dims=FIELD_DIMS)
            served = model(x)
        assert 0 < model.embedding.nnz() < n * d
        if mode == "global":  # one sigmoid on one threshold, in the lookup and in the whole table: same bits
            assert torch.equal(served, expected)
        else:  # the C++ lookup's sigmoid may differ from the table's by an ulp
            torch.testing.assert_close(served, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.compile
def test_compile_and_export_a_model_serving_from_a_store():
    table = pruned_table(sum(FIELD_DIMS), 8)
    model = field_model(PrunedEmbedding(SparseRowStore.from_dense(table), field_dims=FIELD_DIMS), FIELD_DIMS)
    x = field_ids()
    with torch.no_grad():
        expected = model(x)
        torch._dynamo.reset()
        assert torch.equal(torch.compile(model.embedding, fullgraph=True)(x), model.embedding(x))
        # Inductor fuses the FM's sums its own way: the same scores up to float rounding.
        torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), expected, rtol=1e-6, atol=1e-6)
        bag = SparseRowStore.from_dense(table)
        compiled_bag = torch.compile(lambda ids: bag.lookup_bag(ids, mode="mean"), fullgraph=True)
        assert torch.equal(compiled_bag(x), bag.lookup_bag(x, mode="mean"))
        exported = torch.export.export(model, (x,))
        assert torch.equal(exported.module()(x), expected)


# ---------------------------------------------------------------- files


@pytest.mark.parametrize("mmap", [True, False])
@pytest.mark.parametrize("values", VALUES)
def test_save_load_round_trip(tmp_path, mmap, values):
    table = pruned_table(40, 17)
    store = SparseRowStore.from_dense(table, values=values)
    path = tmp_path / "store.safetensors"
    store.save(path)
    loaded = SparseRowStore.load(path, mmap=mmap)
    for name in ("num_embeddings", "embedding_dim", "values", "encoding", "nnz", "rows_kept", "max_error", "nbytes"):
        assert getattr(loaded, name) == getattr(store, name), name
    assert torch.equal(loaded.offsets, store.offsets) and torch.equal(loaded.payload, store.payload)
    ids = random_ids(40, (8, 3))
    assert torch.equal(loaded.lookup(ids), store.lookup(ids))
    assert loaded.metadata() == store.metadata()
    if not mmap:
        path.unlink()  # read into memory: the file is no longer needed
        assert torch.equal(loaded.lookup(ids), store.lookup(ids))


def test_int64_offsets_round_trip(tmp_path):
    table = pruned_table(12, 9)
    store = SparseRowStore.from_dense(table)
    offsets, payload = ops.store_encode(table, store.encoding, "fp32", True)
    wide = SparseRowStore(offsets, payload, embedding_dim=9, encoding=store.encoding)
    assert wide.offsets.dtype == torch.int64 and torch.equal(wide.to_dense(), table)
    wide.save(tmp_path / "wide.safetensors")
    assert torch.equal(SparseRowStore.load(tmp_path / "wide.safetensors").to_dense(), table)


def test_failed_save_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "store.safetensors"
    old = SparseRowStore.from_dense(pruned_table(10, 4))
    old.save(path)
    before = path.read_bytes()

    def failing_write(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", failing_write)
    with pytest.raises(OSError, match="disk full"):
        SparseRowStore.from_dense(pruned_table(20, 4, seed=9)).save(path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [path.name]
    assert torch.equal(SparseRowStore.load(path).to_dense(), old.to_dense())


def write_store(path, offsets, payload, **meta_changes):
    """A store file holding these tensors, its checksum recomputed after `meta_changes`: what a
    hostile writer (who knows the format) would produce."""
    meta = {"format": "pep_kernels.SparseRowStore", "version": 1, "num_embeddings": offsets.numel() - 1,
            "embedding_dim": 17, "values": "fp32", "encoding": "columns", "nnz": 0, "max_error": 0.0,
            "offsets_dtype": str(offsets.dtype).removeprefix("torch.")}
    meta.update(meta_changes)
    meta["checksum"] = checksum(meta, offsets, payload)
    save_file({"offsets": offsets.contiguous(), "payload": payload.contiguous()}, str(path),
              metadata={"pep_kernels": json.dumps(meta)})


@pytest.fixture
def columns_store():
    """An fp32 columns store (d = 17) and its nnz: row 0 holds all 17 entries, row 1 none."""
    store = SparseRowStore.from_dense(pruned_table(12, 17), encoding="columns")
    return store.offsets.clone(), store.payload.clone(), store.nnz


def test_the_clean_fixture_loads(tmp_path, columns_store):
    offsets, payload, nnz = columns_store
    write_store(tmp_path / "s", offsets, payload, nnz=nnz)
    assert SparseRowStore.load(tmp_path / "s").nnz == nnz


def hostile_cases(offsets, payload, nnz):
    """(name, offsets, payload, metadata changes, expected message) of files with a valid checksum."""
    o, p = offsets, payload
    swapped = o.clone()
    swapped[2], swapped[3] = o[3], o[2]
    past_end = o.clone()
    past_end[-1] += 5
    shifted = o.clone()
    shifted[0] = 1
    column_past_dim = p.clone()
    column_past_dim[int(o[2])] = 17  # row 2's first column id
    not_increasing = p.clone()
    not_increasing[1] = 0  # row 0's second id equals its first
    return [
        ("non-monotone offsets", swapped, p, {"nnz": nnz}, "out of order or past the end"),
        ("offsets past the payload", past_end, p, {"nnz": nnz}, "must run from 0 to the payload size"),
        ("offsets not from 0", shifted, p, {"nnz": nnz}, "must run from 0"),
        ("column id >= d", o, column_past_dim, {"nnz": nnz}, "column ids are not increasing or not below"),
        ("column ids not increasing", o, not_increasing, {"nnz": nnz}, "column ids are not increasing"),
        ("wrong nnz", o, p, {"nnz": nnz + 1}, "the metadata says"),
        ("wrong dim", o, p, {"nnz": nnz, "embedding_dim": 300}, "byte count does not fit"),
        ("huge N", o, p, {"nnz": nnz, "num_embeddings": 2**60}, r"offsets must be int32 of shape"),
        ("N past the format", o, p, {"nnz": nnz, "num_embeddings": 2**70}, "num_embeddings must be an integer"),
        ("huge d", o, p, {"nnz": nnz, "embedding_dim": 10**9}, "embedding_dim must be an integer"),
        ("huge nnz", o, p, {"nnz": 10**30}, "nnz must be an integer"),
        ("negative nnz", o, p, {"nnz": -1}, "nnz must be an integer"),
        ("bool dim", o, p, {"nnz": nnz, "embedding_dim": True}, "embedding_dim must be an integer"),
        ("unknown values", o, p, {"nnz": nnz, "values": "fp64"}, "values must be one of"),
        ("unknown encoding", o, p, {"nnz": nnz, "encoding": "csr"}, "encoding must be one of"),
        ("offsets dtype lie", o, p, {"nnz": nnz, "offsets_dtype": "int64"}, "offsets must be int64"),
        ("float offsets", o.float(), p, {"nnz": nnz, "offsets_dtype": "int32"}, "offsets must be int32"),
        ("2-D payload", o, p[: p.numel() // 2 * 2].view(2, -1), {"nnz": nnz}, "payload must be 1-D uint8"),
        ("newer version", o, p, {"nnz": nnz, "version": 2}, "version 2 is not supported"),
        ("another format", o, p, {"nnz": nnz, "format": "other"}, "is not a pep_kernels.SparseRowStore file"),
        ("max_error not a number", o, p, {"nnz": nnz, "max_error": "0"}, "max_error must be a number"),
    ]


def test_hostile_files_raise_value_error(tmp_path, columns_store):
    for name, offsets, payload, meta, message in hostile_cases(*columns_store):
        path = tmp_path / name.replace(" ", "_")
        write_store(path, offsets, payload, **meta)
        with pytest.raises(ValueError, match=message):
            SparseRowStore.load(path)


def set_a_clear_bit(offsets, payload):
    """Sets a clear bit (a column < 8) of row 2's mask: one more set bit than values."""
    at = int(offsets[2])
    byte = int(payload[at])
    payload[at] = byte | 1 << next(b for b in range(8) if not byte >> b & 1)


def write_scale(value):
    return lambda offsets, payload: payload[0:4].copy_(torch.tensor([value]).view(torch.uint8))  # row 0's scale


@pytest.mark.parametrize("values, corrupt, message", [
    ("fp32", lambda o, p: p.__setitem__(2, p[2] | 0x02), "mask has bits set past"),  # row 0's mask bit 17
    ("fp32", set_a_clear_bit, "byte count does not fit"),
    ("int8", write_scale(float("nan")), "int8 scale is negative or not finite"),
    ("int8", write_scale(-1.0), "int8 scale is negative or not finite"),
])
def test_hostile_bitmask_and_int8_rows(tmp_path, values, corrupt, message):
    store = SparseRowStore.from_dense(pruned_table(12, 17), values=values, encoding="bitmask")
    offsets, payload = store.offsets.clone(), store.payload.clone()
    corrupt(offsets, payload)
    path = tmp_path / "store.safetensors"
    write_store(path, offsets, payload, values=values, encoding="bitmask", nnz=store.nnz)
    with pytest.raises(ValueError, match=message):
        SparseRowStore.load(path)


def test_missing_tensors_and_metadata(tmp_path):
    store = SparseRowStore.from_dense(pruned_table(12, 17))
    tensors = {"offsets": store.offsets, "payload": store.payload}
    meta = json.dumps(store.metadata())
    for saved, metadata, message in (
        ({"offsets": store.offsets}, {"pep_kernels": meta}, r"it holds \['offsets'\]"),
        ({"payload": store.payload}, {"pep_kernels": meta}, r"it holds \['payload'\]"),
        ({**tensors, "extra": store.offsets.clone()}, {"pep_kernels": meta},
         r"it holds \['extra', 'offsets', 'payload'\]"),
        (tensors, None, "has no pep_kernels metadata"),
        (tensors, {"pep_kernels": "{not json"}, "unreadable metadata"),
        (tensors, {"pep_kernels": "[1, 2]"}, "is not a pep_kernels.SparseRowStore file"),
    ):
        save_file(saved, str(tmp_path / "bad"), metadata=metadata)
        with pytest.raises(ValueError, match=message):
            SparseRowStore.load(tmp_path / "bad")
    with pytest.raises(FileNotFoundError):
        SparseRowStore.load(tmp_path / "nowhere")


@pytest.mark.parametrize("mmap", [True, False])
def test_truncated_and_flipped_files_raise_value_error(tmp_path, mmap):
    path = tmp_path / "store.safetensors"
    SparseRowStore.from_dense(pruned_table(30, 17, density=0.5)).save(path)
    data = path.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    damaged = tmp_path / "damaged.safetensors"
    for cut in (0, 4, 8, header // 2, header, header + 10, len(data) - 1):
        damaged.write_bytes(data[:cut])
        with pytest.raises(ValueError):
            SparseRowStore.load(damaged, mmap=mmap)
    for position in range(header, len(data), 7):  # every 7th byte of the tensors, one at a time
        flipped = bytearray(data)
        flipped[position] ^= 0x10
        damaged.write_bytes(bytes(flipped))
        with pytest.raises(ValueError, match="checksum mismatch"):
            SparseRowStore.load(damaged, mmap=mmap)
    for position in range(8, header, 5):  # the header: bad JSON, other sizes, other metadata
        flipped = bytearray(data)
        flipped[position] ^= 0x01
        damaged.write_bytes(bytes(flipped))
        try:
            SparseRowStore.load(damaged, mmap=mmap)
        except ValueError:
            continue
        # A flip the format tolerates (a space in the JSON, say) must leave the store intact.
        assert torch.equal(SparseRowStore.load(damaged).to_dense(), SparseRowStore.load(path).to_dense())
    damaged.write_bytes(bytes(range(256)) * 3)
    with pytest.raises(ValueError):
        SparseRowStore.load(damaged, mmap=mmap)


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("values", ["fp32", "int8"])
def test_random_damage_never_escapes_the_checks(encoding, values):
    """Random bytes written into the tensors of a store: its validation and, bypassing it, the
    lookup ops themselves either raise ValueError or return rows; they never read out of bounds
    (which here would be a crash or, with luck, garbage that the last check catches)."""
    store = SparseRowStore.from_dense(pruned_table(20, 17), values=values, encoding=encoding)
    gen = torch.Generator().manual_seed(7)
    all_ids = torch.arange(20)
    for trial in range(300):
        offsets, payload = store.offsets.clone(), store.payload.clone()
        target = payload if trial % 3 else offsets.view(torch.uint8)
        for _ in range(1 + trial % 4):
            target[int(torch.randint(0, target.numel(), (1,), generator=gen))] = int(
                torch.randint(0, 256, (1,), generator=gen))
        args = (offsets, payload, 17, encoding, values)
        try:
            SparseRowStore(offsets, payload, embedding_dim=17, values=values, encoding=encoding)
            valid = True
        except ValueError:
            valid = False
        for op_call in (lambda: ops.store_lookup(*args[:2], all_ids, *args[2:]),
                        lambda: ops.store_lookup_bag(*args[:2], all_ids, torch.tensor([0, 7, 20]), None, *args[2:],
                                                     "sum")):
            try:
                out = op_call()
            except ValueError:
                assert not valid, "a valid store's lookups do not raise"
                continue
            assert out.shape[1] == 17


# ---------------------------------------------------------------- threads, registration


def test_concurrent_lookups_agree():
    table = pruned_table(3000, 33, density=0.2)
    store = SparseRowStore.from_dense(table)
    batches = [random_ids(3000, (256, 13), seed=s) for s in range(32)]
    offsets = torch.arange(0, 256 * 13, 13)
    expected = [(table[ids], F.embedding_bag(ids.reshape(-1), table, offsets, mode="sum")) for ids in batches]

    def serve(k):
        ids = batches[k % len(batches)]
        return k, store.lookup(ids), store.lookup_bag(ids.reshape(-1), offsets, mode="sum")

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        for k, rows, bags in pool.map(serve, range(128)):
            assert torch.equal(rows, expected[k % len(batches)][0])
            torch.testing.assert_close(bags, expected[k % len(batches)][1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("values", VALUES)
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_opcheck_store_ops(values, encoding):
    table = pruned_table(9, 10)
    offsets, payload = ops.store_encode(table, encoding, values, False)
    ids = torch.tensor([0, 3, 8, 3, 1])
    format_args = (10, encoding, values)
    torch.library.opcheck(ops.store_lookup.default, (offsets, payload, ids, *format_args))
    torch.library.opcheck(ops.store_lookup.default, (offsets, payload, ids.int()[:0], *format_args))
    bag_offsets = torch.tensor([0, 2, 2, 5])
    torch.library.opcheck(ops.store_lookup_bag.default,
                          (offsets, payload, ids, bag_offsets, None, *format_args, "mean"))
    torch.library.opcheck(ops.store_lookup_bag.default,
                          (offsets, payload, ids, bag_offsets, torch.rand(5), *format_args, "sum"))
    torch.library.opcheck(ops.store_row_dims.default, (offsets, payload, *format_args))
    # Data-dependent payload size: the fake-tensor checks cannot run the op symbolically.
    torch.library.opcheck(ops.store_encode.default, (table, encoding, values, True),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


# ---------------------------------------------------------------- command line

DATA = ["--data", "synthetic=3000"]


def retrained_model_file(path):
    """A retrained-model file as `pep retrain` writes it, without the training."""
    field_dims = load_data("synthetic=3000").field_dims
    spec = RunSpec("fm", list(field_dims), 8)
    gen = torch.Generator().manual_seed(8)
    n = spec.num_embeddings
    embedding = MaskedEmbedding(torch.randn(n, 8, generator=gen) * 0.3, torch.rand(n, 8, generator=gen) < 0.2,
                                field_dims=spec.field_dims)
    checkpoint.save(path, spec.build(embedding).state_dict(), {"spec": spec.to_dict(), "retrain": {}})
    return spec


def test_cli_export_and_evaluate_from_the_store(tmp_path, capsys):
    model_file, store_file = tmp_path / "retrained.safetensors", tmp_path / "table.store"
    spec = retrained_model_file(model_file)
    main(["export", "--model-file", str(model_file), "--out", str(store_file)])
    exported = json.loads(capsys.readouterr().out)
    assert exported["out"] == str(store_file) and exported["values"] == "fp32" and exported["max_error"] == 0.0
    assert exported["nbytes"] == sum(exported["bytes"].values()) < exported["dense_fp32_bytes"]
    main(["evaluate", *DATA, "--model-file", str(model_file)])
    dense = json.loads(capsys.readouterr().out)
    main(["evaluate", *DATA, "--model-file", str(model_file), "--store", str(store_file)])
    served = json.loads(capsys.readouterr().out)
    assert served["auc"] == dense["auc"] and served["logloss"] == dense["logloss"]  # same scores, bit for bit
    assert served["nnz"] == dense["nnz"] == exported["nnz"] and served["store_bytes"] == exported["nbytes"]

    main(["export", "--model-file", str(model_file), "--out", str(store_file), "--values", "int8"])
    assert json.loads(capsys.readouterr().out)["max_error"] > 0
    main(["evaluate", *DATA, "--model-file", str(model_file), "--store", str(store_file)])
    assert json.loads(capsys.readouterr().out)["auc"] == pytest.approx(dense["auc"], abs=0.01)

    SparseRowStore.from_dense(torch.ones(spec.num_embeddings, 4)).save(store_file)
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", *DATA, "--model-file", str(model_file), "--store", str(store_file)])
    assert exit_info.value.code == 2
    assert f"the store holds a {spec.num_embeddings} x 4 table; the model's is" in capsys.readouterr().err
    store_file.write_bytes(b"junk")
    with pytest.raises(SystemExit):
        main(["evaluate", *DATA, "--model-file", str(model_file), "--store", str(store_file)])
    assert "pep evaluate: error:" in capsys.readouterr().err


# ---------------------------------------------------------------- CUDA


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_cuda_source_compiles(tmp_path):
    command = ["nvcc", "-c", str(ROOT / "csrc" / "cuda" / "store.cu"), "-o", str(tmp_path / "store.o"),
               "-std=c++17", "-arch=sm_90", "-Xcompiler=-Wall,-Wextra"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr.lower(), result.stderr


@pytest.mark.gpu
@pytest.mark.parametrize("values", VALUES)
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_cuda_lookups_match_the_cpu(values, encoding):
    table = pruned_table(300, 40)
    store = SparseRowStore.from_dense(table, values=values, encoding=encoding)
    gpu = SparseRowStore.from_dense(table, values=values, encoding=encoding).to("cuda")
    ids = random_ids(300, (64, 9))
    assert torch.equal(gpu.lookup(ids.cuda()).cpu(), store.lookup(ids))
    assert torch.equal(gpu.lookup(ids.int().cuda()).cpu(), store.lookup(ids))
    weights = torch.rand(64, 9)
    torch.testing.assert_close(gpu.lookup_bag(ids.cuda(), per_sample_weights=weights.cuda()).cpu(),
                               store.lookup_bag(ids, per_sample_weights=weights), rtol=1e-6, atol=1e-6)
    offsets = torch.tensor([0, 5, 5, 100])
    torch.testing.assert_close(gpu.lookup_bag(ids.reshape(-1).cuda(), offsets.cuda(), mode="mean").cpu(),
                               store.lookup_bag(ids.reshape(-1), offsets, mode="mean"), rtol=1e-6, atol=1e-6)
    with pytest.raises(IndexError, match="index 300 is out of range"):
        gpu.lookup(torch.tensor([300], device="cuda"))


def test_empty_tensor_with_a_huge_shape_is_refused(tmp_path):
    """A zero-size tensor passes safetensors' size checks whatever its other dims; one beyond
    int64 used to escape as a TypeError."""
    import json
    import struct

    path = tmp_path / "huge.store"
    SparseRowStore.from_dense(torch.eye(4)).save(path)
    raw = path.read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + size])
    end = header["payload"]["data_offsets"][0]
    header["payload"].update(shape=[0, 2**63], data_offsets=[end, end])
    body = raw[8 + size:8 + size + end]
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + body)
    with pytest.raises(ValueError, match="must be 1-D"):
        SparseRowStore.load(path)
