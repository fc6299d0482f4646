"""Fuzzing the file readers: run files (`pep_kernels.train.checkpoint.load`) and serving stores
(`pep_kernels.SparseRowStore.load`, with and without mmap).

Files of a run (checkpoints, snapshots, initial states, retrained models) may come from anywhere,
so `load` must turn any damage into a ValueError (a missing file stays FileNotFoundError): never a
crash, a hang, an absurd allocation or another exception. The cases are mutations of a valid
file: truncations, bit flips, spliced bytes, and edits of the JSON header (offsets, shapes,
dtype names, the header length, the metadata string). Every file carries a sha256 of its
metadata and tensors, so a mutation that still loads (say extra whitespace in the header) must
give back exactly the original tensors and metadata.

    pytest tests/test_fuzz_files.py                              # "ci" profile, about 60 s
    HYPOTHESIS_PROFILE=long pytest tests/test_fuzz_files.py      # about 30x the cases

While the fuzz tests run, the process may not allocate more than 1 GiB over what it had (a
RLIMIT_DATA cap: an absurd allocation fails as MemoryError, which is not a ValueError), and a
watchdog ends the process with a traceback if a case runs a minute (a hang).
tests/corpus/checkpoint/ holds the files that found bugs (see its README.md); every one must
raise ValueError.

Stores get the same byte-level mutations (truncations, bit flips anywhere, header edits with
huge shapes and offsets) and structural edits made by a writer who knows the format: offsets,
payload bytes (column ids, masks, int8 scales, values), the tensors' dtypes and lengths and the
metadata fields (huge N, d, nnz) changed and the checksum recomputed, so that the row-by-row
validation is what is exercised. A store that loads must then serve every row and every bag.
tests/corpus/store/ holds the regression cases (its README.md).
"""

import contextlib
import faulthandler
import json
import resource
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import given, note, settings
from hypothesis import strategies as st

from safetensors import safe_open
from safetensors.torch import save_file

from pep_kernels.store import SparseRowStore, checksum
from pep_kernels.train import checkpoint

CORPUS = Path(__file__).resolve().parent / "corpus" / "checkpoint"
STORE_CORPUS = CORPUS.parent / "store"
EXAMPLES = settings.default.max_examples
DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "U16", "U32", "U64", "BOOL", "F8_E4M3",
          "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "C64", "f32", "float32", "", "F32 ", "I128"]
HUGE = [2**31 - 1, 2**31, 2**32, 2**40, 2**53 + 1, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**30]
CASES = {"count": 0}  # fuzz cases run by this process (reported at the end of the session by the test below)
STORE_CASES = {"error": 0, "loaded": 0}


def valid_file():
    """A small file as search writes one: several dtypes, a 0-d tensor, an empty tensor, nested metadata."""
    tensors = {
        "model.embedding.weight": torch.randn(5, 3),
        "model.embedding.threshold": torch.full((5, 3), -4.0),
        "model.embedding.optimizer_step": torch.tensor(7),
        "history": torch.arange(12, dtype=torch.float64).reshape(4, 3),
        "rng": torch.get_rng_state()[:64].clone(),
        "empty": torch.zeros(0, 4, dtype=torch.int32),
    }
    meta = {"spec": {"model": "fm", "field_dims": [2, 3]}, "seed": 0, "state": {"step": 7, "snapshots": []}}
    return tensors, meta


torch.manual_seed(0)
VALID = valid_file()


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "valid.safetensors"
    checkpoint.save(path, *VALID)
    return path.read_bytes()


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz") / "case.safetensors"


@pytest.fixture(scope="module")
def guarded():
    """While the fuzz tests run: at most 1 GiB more data memory (each case also runs under `watchdog`)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    vm_data = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmData:"))
    cap = vm_data + 2**30
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


@contextlib.contextmanager
def watchdog():
    """Ends the process with a traceback if one case runs a minute (they take milliseconds)."""
    faulthandler.dump_traceback_later(60, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def split(data):
    """(header dict, body bytes) of a safetensors file."""
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def join(header, body, length_delta=0, raw_header=None):
    raw = raw_header if raw_header is not None else json.dumps(header).encode()
    return struct.pack("<Q", max(0, len(raw) + length_delta) % 2**64) + raw + body


def check_load(path, data):
    """`load` on `data`: a ValueError, or exactly the tensors and metadata of `valid_file`."""
    CASES["count"] += 1
    path.write_bytes(data)
    try:
        with watchdog():
            tensors, meta = checkpoint.load(path)
    except ValueError:
        return "error"
    expected, expected_meta = VALID
    assert meta == expected_meta
    assert set(tensors) == set(expected)
    for name, tensor in expected.items():
        assert tensors[name].dtype == tensor.dtype and torch.equal(tensors[name], tensor), name
    return "loaded"


# --- hypothesis strategies: mutations of the valid file ------------------------------------------

def truncations(data):
    return st.integers(0, len(data) - 1).map(lambda k: ("truncate", k))


def bit_flips(data):
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    position = st.one_of(st.integers(0, header_end - 1), st.integers(0, len(data) - 1))  # header-biased
    return st.lists(st.tuples(position, st.integers(0, 7)), min_size=1, max_size=8).map(lambda f: ("flip", f))


def splices():
    return st.tuples(st.integers(0, 2000), st.integers(0, 64), st.binary(max_size=64)).map(lambda s: ("splice", s))


def header_edits(tensor_names):
    name = st.sampled_from(tensor_names)
    number = st.one_of(st.integers(-5, 200), st.sampled_from(HUGE), st.integers(-(2**70), 2**70))
    json_value = st.recursive(st.one_of(st.none(), st.booleans(), number, st.floats(), st.text(max_size=8)),
                              lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                      st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                              max_leaves=12)
    edit = st.one_of(
        st.tuples(st.just("offsets"), name, st.lists(number, min_size=0, max_size=3)),
        st.tuples(st.just("shape"), name, st.lists(number, min_size=0, max_size=6)),
        st.tuples(st.just("dtype"), name, st.one_of(st.sampled_from(DTYPES), st.text(max_size=10))),
        st.tuples(st.just("field"), name, st.sampled_from(["dtype", "shape", "data_offsets"]), json_value),
        st.tuples(st.just("drop"), name, st.sampled_from(["dtype", "shape", "data_offsets", None])),
        st.tuples(st.just("add_tensor"), st.text(max_size=8), json_value),
        st.tuples(st.just("metadata"), st.one_of(
            st.text(max_size=40),
            json_value.map(json.dumps),
            st.integers(1, 20_000).map(lambda k: "[" * k),  # deep nesting
            st.integers(1, 5_000).map(lambda k: '{"a":' * k + "1" + "}" * k),
            st.integers(4_000, 6_000).map(lambda k: "9" * k),  # over Python's int-string limit
        )),
        st.tuples(st.just("metadata_raw"), json_value),  # __metadata__ itself replaced
        st.tuples(st.just("length"), st.one_of(st.integers(-50, 50), st.sampled_from([-(2**40), 2**40, 2**63]))),
        st.tuples(st.just("whitespace"), st.integers(0, 64)),
    )
    return st.lists(edit, min_size=1, max_size=3).map(lambda edits: ("edit", edits))


def apply(data, mutation):
    kind, arg = mutation
    if kind == "truncate":
        return data[:arg]
    if kind == "flip":
        out = bytearray(data)
        for position, bit in arg:
            out[position] ^= 1 << bit
        return bytes(out)
    if kind == "splice":
        start, removed, inserted = arg
        start = min(start, len(data))
        return data[:start] + inserted + data[start + removed:]
    header, body = split(data)
    length_delta, pad = 0, 0
    for edit in arg:
        op = edit[0]
        if op in ("offsets", "shape", "dtype", "field"):
            key = {"offsets": "data_offsets", "shape": "shape", "dtype": "dtype"}.get(op, edit[2])
            entry = header.get(edit[1])
            if not isinstance(entry, dict):  # dropped or replaced by an earlier edit
                entry = header[edit[1]] = {}
            entry[key] = edit[-1]
        elif op == "drop":
            if edit[2] is None:
                header.pop(edit[1], None)
            elif isinstance(header.get(edit[1]), dict):
                header[edit[1]].pop(edit[2], None)
        elif op == "add_tensor":
            header[edit[1]] = edit[2]
        elif op == "metadata":
            header["__metadata__"] = {"pep_kernels": edit[1]}
        elif op == "metadata_raw":
            header["__metadata__"] = edit[1]
        elif op == "length":
            length_delta = edit[1]
        elif op == "whitespace":
            pad = edit[1]
    raw = json.dumps(header).encode() + b" " * pad
    return struct.pack("<Q", (len(raw) + length_delta) % 2**64) + raw + body


def fuzz(original, target, mutation):
    note(repr(mutation)[:2000])
    check_load(target, apply(original, mutation))


# --- tests ----------------------------------------------------------------------------------------

def test_valid_file_round_trips(original, target):
    assert check_load(target, original) == "loaded"


def test_every_bit_flip_of_the_tensor_data_is_a_checksum_error(original, target):
    """Flips in the data region leave a well-formed file: only the checksum can tell."""
    header_end = 8 + struct.unpack("<Q", original[:8])[0]
    for position in range(header_end, len(original)):
        for bit in (0, 7):
            flipped = bytearray(original)
            flipped[position] ^= 1 << bit
            target.write_bytes(bytes(flipped))
            with pytest.raises(ValueError, match="checksum mismatch"):
                checkpoint.load(target)


def test_a_changed_dtype_or_metadata_is_a_checksum_error(original, target):
    header, body = split(original)
    header["model.embedding.weight"]["dtype"] = "I32"  # same size, another meaning
    target.write_bytes(join(header, body))
    with pytest.raises(ValueError, match="checksum mismatch"):
        checkpoint.load(target)
    header, body = split(original)
    header["__metadata__"]["pep_kernels"] = header["__metadata__"]["pep_kernels"].replace('"seed": 0', '"seed": 1')
    target.write_bytes(join(header, body))
    with pytest.raises(ValueError, match="checksum mismatch"):
        checkpoint.load(target)
    header, body = split(original)
    del header["__metadata__"]["pep_kernels_checksum"]
    target.write_bytes(join(header, body))
    with pytest.raises(ValueError, match="no pep_kernels checksum"):
        checkpoint.load(target)


def test_every_truncation_and_every_header_bit_flip(original, target, guarded):
    """Exhaustive over the small file: each prefix, and each single bit of the 8-byte length and the header."""
    header_end = 8 + struct.unpack("<Q", original[:8])[0]
    outcomes = [check_load(target, original[:k]) for k in range(len(original))]
    assert outcomes.count("loaded") == 0  # a prefix is never a complete file
    for position in range(header_end):
        for bit in range(8):
            flipped = bytearray(original)
            flipped[position] ^= 1 << bit
            check_load(target, bytes(flipped))


@settings(max_examples=EXAMPLES * 10)
@given(data=st.data())
def test_fuzz_truncations_flips_and_splices(original, target, guarded, data):
    mutation = data.draw(st.one_of(truncations(original), bit_flips(original), splices()))
    fuzz(original, target, mutation)


@settings(max_examples=EXAMPLES * 10)
@given(data=st.data())
def test_fuzz_header_edits(original, target, guarded, data):
    names = [k for k in split(original)[0] if k != "__metadata__"]
    fuzz(original, target, data.draw(header_edits(names)))


@pytest.mark.parametrize("path", sorted(CORPUS.glob("*.safetensors")), ids=lambda p: p.name)
def test_regression_corpus(path, guarded):
    """Files that once escaped as another exception (see tests/corpus/checkpoint/README.md)."""
    with pytest.raises(ValueError, match=path.name):
        checkpoint.load(path)


def test_corpus_is_not_empty():
    assert len(list(CORPUS.glob("*.safetensors"))) >= 2


def test_missing_file_stays_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        checkpoint.load(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="not a readable pep_kernels file"):
        checkpoint.load(tmp_path)  # a folder


# --- run files with a valid checksum but hostile contents -----------------------------------------

def hostile_run_files():
    """(name, tensors, metadata, expected message) of retrained-model files a writer who knows
    the format could make: every one is checksummed, so only the content checks can refuse it."""
    from pep_kernels.modules import MaskedEmbedding
    from pep_kernels.train.spec import RunSpec

    spec = RunSpec("fm", [3, 4], 2)
    model = spec.build(MaskedEmbedding(torch.randn(7, 2), torch.rand(7, 2) < 0.5, field_dims=[3, 4]))
    state = dict(model.state_dict())
    good = spec.to_dict()
    return [
        ("spec not an object", state, {"spec": "fm"}, "run spec must be a JSON object, got str"),
        ("no spec", state, {"retrain": {}}, "run spec must be a JSON object, got NoneType"),
        ("spec lacks field_dims", state, {"spec": {"model": "fm", "embedding_dim": 2}}, r"lacks \['field_dims'\]"),
        ("zero field", state, {"spec": dict(good, field_dims=[0, 7])}, "field_dims must be a non-empty list"),
        ("bool dim", state, {"spec": dict(good, embedding_dim=True)}, "embedding_dim must be a positive int"),
        ("unknown field", state, {"spec": dict(good, layers=3)}, r"unknown run spec fields \['layers'\]"),
        ("unknown model", state, {"spec": dict(good, model="gpt")}, "unknown model 'gpt'"),
        ("bad model kwargs", state, {"spec": dict(good, model_kwargs={"heads": 2})}, "cannot be built with model_kwargs"),
        ("fields do not sum to N", state, {"spec": dict(good, field_dims=[3, 5])}, "must equal num_embeddings"),
        ("no keep mask", {k: v for k, v in state.items() if k != "embedding.keep"}, {"spec": good},
         "holds no retrained PEP table"),
        ("int table", {**state, "embedding.weight": torch.ones(7, 2, dtype=torch.int32)}, {"spec": good},
         "must be floating-point with a bool mask, got torch.int32 and torch.bool"),
        ("float mask", {**state, "embedding.keep": torch.ones(7, 2)}, {"spec": good},
         "must be floating-point with a bool mask, got torch.float32 and torch.float32"),
        ("misshapen parameter", {**state, "linear.bias": torch.zeros(3)}, {"spec": good},
         "saved parameters do not fit the fm model"),
        ("extra parameter", {**state, "extra": torch.zeros(1)}, {"spec": good}, "saved parameters do not fit"),
    ]


def test_hostile_retrained_model_files(tmp_path):
    from pep_kernels.train.retrain import load_retrained

    names = set()
    for name, tensors, meta, message in hostile_run_files():
        path = tmp_path / (name.replace(" ", "-") + ".safetensors")
        checkpoint.save(path, tensors, meta)
        with pytest.raises(ValueError, match=message) as error:
            load_retrained(path)
        assert str(error.value).startswith(f"{path}: "), str(error.value)
        names.add(name)
    assert len(names) == 14


def test_hostile_search_run_folders(tmp_path):
    """A retrain refuses a run folder whose initial state or snapshot does not fit its spec."""
    from pep_kernels.train.retrain import load_ticket
    from pep_kernels.train.spec import RunSpec

    spec = RunSpec("fm", [3, 4], 2)
    torch.manual_seed(0)
    initial = spec.build(spec.pep_embedding()).state_dict()
    checkpoint.save(tmp_path / "initial.safetensors", initial, {"spec": spec.to_dict(), "seed": 0})
    for name, tensors, message in (
        ("no-weight", {"table": torch.ones(7, 2)}, r"expected a 7 x 2 table 'weight' \(the run spec's\), got none"),
        ("other-shape", {"weight": torch.ones(7, 3)}, r"expected a 7 x 2 table 'weight'.*got \(7, 3\)"),
    ):
        checkpoint.save(tmp_path / f"{name}.safetensors", tensors, {"step": 1})
        with pytest.raises(ValueError, match=message):
            load_ticket(tmp_path, f"{name}.safetensors")
    checkpoint.save(tmp_path / "ok.safetensors", {"weight": torch.ones(7, 2)}, {"step": 1})
    del initial["embedding.weight"]
    checkpoint.save(tmp_path / "initial.safetensors", initial, {"spec": spec.to_dict(), "seed": 0})
    with pytest.raises(ValueError, match="initial.safetensors: expected a 7 x 2 table 'embedding.weight'"):
        load_ticket(tmp_path, "ok.safetensors")
    checkpoint.save(tmp_path / "initial.safetensors", initial, {"spec": "fm"})
    with pytest.raises(ValueError, match="initial.safetensors: the run spec must be a JSON object"):
        load_ticket(tmp_path, "ok.safetensors")


# --- the store reader -------------------------------------------------------------------------------

def store_table():
    """A (12, 10) pruned table: a full row, empty rows, rows of 1..9 entries."""
    gen = torch.Generator().manual_seed(5)
    table = torch.randn(12, 10, generator=gen)
    table[torch.rand(12, 10, generator=gen) < 0.5] = 0
    table[0], table[3], table[7] = torch.randn(10, generator=gen), 0, 0
    return table


STORE_KINDS = {  # name: (values, encoding)
    "columns-fp32": ("fp32", "columns"), "bitmask-int8": ("int8", "bitmask"), "columns-fp16": ("fp16", "columns")}


@pytest.fixture(scope="module")
def store_files(tmp_path_factory):
    """name -> (file bytes, dense table of the store)."""
    folder = tmp_path_factory.mktemp("stores")
    files = {}
    for name, (values, encoding) in STORE_KINDS.items():
        store = SparseRowStore.from_dense(store_table(), values=values, encoding=encoding)
        store.save(folder / name)
        files[name] = ((folder / name).read_bytes(), store.to_dense())
    return files


def write_fresh(path, data):
    """A new file (a new inode): a store still mapping the previous case keeps its own bytes."""
    path.unlink(missing_ok=True)
    path.write_bytes(data)


def check_store_load(path, data, mmap, original_table=None):
    """`SparseRowStore.load` on `data`: a ValueError, or a store that serves every row and bag
    (and, for a byte mutation, which the checksum guards, exactly the original table)."""
    write_fresh(path, data)
    try:
        with watchdog():
            store = SparseRowStore.load(path, mmap=mmap)
    except ValueError:
        STORE_CASES["error"] += 1
        return "error"
    STORE_CASES["loaded"] += 1
    n, d = store.num_embeddings, store.embedding_dim
    with watchdog():
        table = store.to_dense()
        bags = store.lookup_bag(torch.arange(n), torch.tensor([0, n // 2]))
    assert table.shape == (n, d) and int((table != 0).sum()) <= store.nnz
    assert int(store.dims_per_row().sum()) == store.nnz
    assert bags.shape == (2, d)
    if original_table is not None:
        assert torch.equal(table, original_table)
    return "loaded"


def read_store_file(data, path):
    write_fresh(path, data)
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["pep_kernels"])
        return meta, f.get_tensor("offsets"), f.get_tensor("payload")


def structural_edits():
    """Edits of a store's tensors and metadata (the checksum is recomputed after them)."""
    index = st.integers(0, 10_000)
    number = st.one_of(st.integers(-300, 300), st.sampled_from(HUGE + [-1, -(2**31), -(2**63)]))
    meta_value = st.one_of(number, st.none(), st.booleans(), st.floats(), st.text(max_size=6),
                           st.sampled_from(["fp32", "fp16", "bf16", "int8", "columns", "bitmask", "int32", "int64"]))
    edit = st.one_of(
        st.tuples(st.just("offset"), index, number),
        st.tuples(st.just("offset_shift"), index, st.integers(-20, 20)),  # move one row boundary
        st.tuples(st.just("payload_byte"), index, st.integers(0, 255)),
        st.tuples(st.just("payload_truncate"), index),
        st.tuples(st.just("payload_extend"), st.binary(min_size=1, max_size=40)),
        st.tuples(st.just("offsets_dtype"), st.sampled_from(["int32", "int64", "float32", "uint8"]), st.booleans()),
        st.tuples(st.just("offsets_truncate"), index),
        st.tuples(st.just("meta"), st.sampled_from(["num_embeddings", "embedding_dim", "nnz", "values", "encoding",
                                                   "offsets_dtype", "max_error", "version", "format"]), meta_value),
        st.tuples(st.just("meta_drop"), st.sampled_from(["num_embeddings", "embedding_dim", "nnz", "values",
                                                        "encoding", "offsets_dtype", "max_error"])),
    )
    return st.lists(edit, min_size=1, max_size=4)


def apply_structural(meta, offsets, payload, edits):
    offsets, payload = offsets.clone(), payload.clone()
    for edit in edits:
        op = edit[0]
        if op == "offset" and offsets.numel():
            if offsets.is_floating_point():
                value = float(edit[2])
            else:
                info = torch.iinfo(offsets.dtype)
                value = min(max(edit[2], info.min), info.max)
            offsets[edit[1] % offsets.numel()] = value
        elif op == "offset_shift" and offsets.numel():
            offsets[edit[1] % offsets.numel()] += edit[2]
        elif op == "payload_byte" and payload.numel():
            payload[edit[1] % payload.numel()] = edit[2]
        elif op == "payload_truncate":
            payload = payload[: edit[1] % (payload.numel() + 1)].clone()
        elif op == "payload_extend":
            payload = torch.cat([payload, torch.frombuffer(bytearray(edit[1]), dtype=torch.uint8)])
        elif op == "offsets_dtype":
            offsets = offsets.to(getattr(torch, edit[1]))
            if edit[2]:  # the metadata follows (else it lies)
                meta["offsets_dtype"] = edit[1]
        elif op == "offsets_truncate":
            offsets = offsets[: edit[1] % (offsets.numel() + 1)].clone()
        elif op == "meta":
            meta[edit[1]] = edit[2]
        elif op == "meta_drop":
            meta.pop(edit[1], None)
    meta["checksum"] = checksum(meta, offsets, payload)
    return meta, offsets, payload


@settings(max_examples=EXAMPLES * 4)
@given(data=st.data())
def test_fuzz_store_bytes(store_files, target, guarded, data):
    """Truncations, bit flips (header and metadata JSON included), splices and safetensors header
    edits (huge shapes and offsets) of store files; mmap and read-in loading."""
    name = data.draw(st.sampled_from(sorted(store_files)))
    raw, table = store_files[name]
    mutation = data.draw(st.one_of(truncations(raw), bit_flips(raw), splices(), header_edits(["offsets", "payload"])))
    mmap = data.draw(st.booleans())
    note(f"{name} mmap={mmap} {repr(mutation)[:2000]}")
    check_store_load(target, apply(raw, mutation), mmap, original_table=table)


@settings(max_examples=EXAMPLES * 10)
@given(data=st.data())
def test_fuzz_store_structure(store_files, target, guarded, data):
    """Tensors and metadata edited with the checksum recomputed: the row validation must catch
    what it must (ValueError) and what it lets through must serve every row safely."""
    name = data.draw(st.sampled_from(sorted(store_files)))
    edits = data.draw(structural_edits())
    mmap = data.draw(st.booleans())
    note(f"{name} mmap={mmap} {edits!r}"[:2000])
    meta, offsets, payload = apply_structural(*read_store_file(store_files[name][0], target), edits)
    path = target.with_name("structural.safetensors")
    path.unlink(missing_ok=True)
    save_file({"offsets": offsets.contiguous(), "payload": payload.contiguous()}, str(path),
              metadata={"pep_kernels": json.dumps(meta)})
    check_store_load(target, path.read_bytes(), mmap)


def test_every_store_truncation_and_header_bit_flip(store_files, target, guarded):
    """Exhaustive over the int8 bitmask store: each prefix and each bit of the header, both loaders."""
    raw, table = store_files["bitmask-int8"]
    header_end = 8 + struct.unpack("<Q", raw[:8])[0]
    for mmap in (True, False):
        assert all(check_store_load(target, raw[:k], mmap) == "error" for k in range(len(raw)))
        for position in range(header_end):
            for bit in range(8):
                flipped = bytearray(raw)
                flipped[position] ^= 1 << bit
                check_store_load(target, bytes(flipped), mmap, original_table=table)


@pytest.mark.parametrize("path", sorted(STORE_CORPUS.glob("*.safetensors")), ids=lambda p: p.name)
@pytest.mark.parametrize("mmap", [True, False])
def test_store_regression_corpus(path, mmap, guarded):
    """Hostile store files, each with a valid checksum (see tests/corpus/store/README.md)."""
    with pytest.raises(ValueError, match=path.name):
        SparseRowStore.load(path, mmap=mmap)


def test_store_corpus_is_not_empty():
    assert len(list(STORE_CORPUS.glob("*.safetensors"))) >= 5


def test_report_case_count(capsys):
    """Runs last in this module: prints how many fuzz cases this session ran (shown with pytest -s)."""
    with capsys.disabled():
        print(f"\n[test_fuzz_files] {CASES['count']} checkpoint.load() cases run; SparseRowStore.load() cases: "
              f"{STORE_CASES['error']} ValueError, {STORE_CASES['loaded']} loaded and served")
