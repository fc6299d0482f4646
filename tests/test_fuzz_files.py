"""Fuzzing the run-file reader, `pep_kernels.train.checkpoint.load`.

Files of a run (checkpoints, snapshots, initial states, retrained models) may come from anywhere,
so `load` must turn any damage into a ValueError (a missing file stays FileNotFoundError): never a
crash, a hang, an absurd allocation or another exception. The cases are mutations of a valid
file: truncations, bit flips, spliced bytes, and edits of the JSON header (offsets, shapes,
dtype names, the header length, the metadata string). A mutation may also leave a valid file
(say F32 -> U32: safetensors has no checksum); then `load` must return a dict of tensors that
fit the file and a dict of metadata.

    pytest tests/test_fuzz_files.py                              # "ci" profile, about 20 s
    HYPOTHESIS_PROFILE=long pytest tests/test_fuzz_files.py      # about 30x the cases

While the fuzz tests run, the process may not allocate more than 1 GiB over what it had (a
RLIMIT_DATA cap: an absurd allocation fails as MemoryError, which is not a ValueError), and a
watchdog ends the process with a traceback if a case hangs. tests/corpus/checkpoint/ holds the
files that found bugs (see its README.md); every one must raise ValueError.
"""

import faulthandler
import json
import resource
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import given, note, settings
from hypothesis import strategies as st

from pep_kernels.train import checkpoint

CORPUS = Path(__file__).resolve().parent / "corpus" / "checkpoint"
EXAMPLES = settings.default.max_examples
DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "U16", "U32", "U64", "BOOL", "F8_E4M3",
          "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "C64", "f32", "float32", "", "F32 ", "I128"]
HUGE = [2**31 - 1, 2**31, 2**32, 2**40, 2**53 + 1, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**30]
CASES = {"count": 0}  # fuzz cases run by this process (reported at the end of the session by the test below)


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


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "valid.safetensors"
    tensors, meta = valid_file()
    checkpoint.save(path, tensors, meta)
    return path.read_bytes()


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz") / "case.safetensors"


@pytest.fixture(scope="module")
def guarded():
    """While the fuzz tests run: at most 1 GiB more data memory, and a watchdog against hangs."""
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    vm_data = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmData:"))
    cap = vm_data + 2**30
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (cap, hard))
    faulthandler.dump_traceback_later(600, exit=True)  # no fuzz test runs 10 minutes unless a case hangs
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


def split(data):
    """(header dict, body bytes) of a safetensors file."""
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def join(header, body, length_delta=0, raw_header=None):
    raw = raw_header if raw_header is not None else json.dumps(header).encode()
    return struct.pack("<Q", max(0, len(raw) + length_delta) % 2**64) + raw + body


def check_load(path, data):
    """`load` on `data`: a ValueError, or tensors and metadata that make sense."""
    CASES["count"] += 1
    path.write_bytes(data)
    try:
        tensors, meta = checkpoint.load(path)
    except ValueError:
        return "error"
    assert isinstance(meta, dict)
    assert isinstance(tensors, dict) and all(isinstance(t, torch.Tensor) for t in tensors.values())
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    assert total <= len(data), f"{total} tensor bytes from a file of {len(data)} bytes"
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
    tensors, meta = checkpoint.load(target)
    expected, expected_meta = valid_file()
    assert meta == expected_meta and set(tensors) == set(expected)
    assert all(tensors[k].dtype == v.dtype and tensors[k].shape == v.shape for k, v in expected.items())


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


def test_report_case_count(capsys):
    """Runs last in this module: prints how many fuzz cases this session ran (shown with pytest -s)."""
    with capsys.disabled():
        print(f"\n[test_fuzz_files] {CASES['count']} load() cases run")
