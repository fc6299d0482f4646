"""Files of a search run: safetensors for tensors, JSON metadata inside them, no pickle; atomic
writes, and a sha256 of metadata and tensors checked on load (docs/design/search_and_retrain.md).
"""

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

# The safetensors dtypes a file may hold: what models, optimizers and masks are made of.
FILE_DTYPES = ("BOOL", "U8", "I8", "I16", "I32", "I64", "F16", "BF16", "F32", "F64")


def checksum(meta_text, tensors):
    """sha256 of the metadata string and of every tensor's name, dtype, shape and bytes (the
    algorithm of the store files' checksum, pep_kernels.store.checksum)."""
    digest = hashlib.sha256(meta_text.encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        if tensor.numel():
            digest.update(tensor.view(-1).view(torch.uint8).numpy())
    return "sha256:" + digest.hexdigest()


@contextlib.contextmanager
def _atomic_target(path):
    """A path to write the new contents of `path` to, inside a fresh `.<name>.<random>.tmp`
    folder beside it; when the block ends without an error the file is fsynced and renamed to
    `path`. The folder is removed either way."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        tmp = folder / path.name
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def save(path, tensors, meta):
    """Atomically writes `tensors` (name -> tensor) and a JSON-serialisable `meta` dict."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta_text = json.dumps(meta)
    with _atomic_target(path) as tmp:
        save_file(tensors, str(tmp), metadata={"pep_kernels": meta_text,
                                               "pep_kernels_checksum": checksum(meta_text, tensors)})


def save_text(path, text):
    """Atomically writes a text file (a run's JSON summary), as `save` writes tensors."""
    with _atomic_target(path) as tmp:
        tmp.write_text(text)


def load(path):
    """(tensors, meta) of a file written by `save`; ValueError for anything else or a damaged file."""
    path = Path(path)
    try:
        # pread, not mmap: the tensors are read into memory once, without the file's pages
        # counting in the process's memory on top of them (a retrained model is read to export it)
        with safe_open(str(path), framework="pt", device="cpu", backend="pread") as f:
            meta = (f.metadata() or {}).get("pep_kernels")
            stored_checksum = (f.metadata() or {}).get("pep_kernels_checksum")
            for name in f.keys():
                # An empty tensor passes safetensors' size checks whatever its other dims; torch
                # cannot make one whose sizes or strides leave int64.
                tensor_slice = f.get_slice(name)
                shape = tensor_slice.get_shape()
                if math.prod(max(n, 1) for n in shape) >= 2**63:
                    raise ValueError(f"tensor {name!r} has shape {shape}, beyond int64")
                # torch cannot fill every dtype safetensors names (the packed float4 types, say).
                dtype = tensor_slice.get_dtype()
                if dtype not in FILE_DTYPES:
                    raise ValueError(f"tensor {name!r} has dtype {dtype}; expected one of {', '.join(FILE_DTYPES)}")
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"{path} is not a readable pep_kernels file: {e}") from None
    if meta is None:
        raise ValueError(f"{path} has no pep_kernels metadata: not written by pep_kernels")
    meta_text = meta
    try:
        meta = json.loads(meta)
    except (ValueError, RecursionError) as e:  # RecursionError: deeply nested JSON
        raise ValueError(f"{path} has damaged pep_kernels metadata: {str(e)[:200]}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path} has pep_kernels metadata that is not a JSON object: not written by pep_kernels")
    if stored_checksum is None:
        raise ValueError(f"{path} has no pep_kernels checksum: not written by this version of pep_kernels")
    if checksum(meta_text, tensors) != stored_checksum:
        raise ValueError(f"{path}: checksum mismatch, the file is corrupted")
    return tensors, meta


def remove_stale_temporaries(folder, names):
    """Removes what killed writes of `names` (file names or glob patterns) left in `folder`
    (`.<name>.<random>.tmp` folders, see `save`, or files of that name); returns their names.
    Only the writer of those files may call it, when it starts: the temporary folder of a write
    in progress looks the same."""
    folder = Path(folder)
    removed = []
    for name in names:
        for tmp in sorted(folder.glob(f".{name}.*.tmp")):
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
            removed.append(tmp.name)
    return removed


def optimizer_tensors(optimizer):
    """An optimizer's per-parameter state as flat tensors (`optim.<param index>.<name>`)."""
    state = optimizer.state_dict()["state"]
    return {f"optim.{i}.{name}": torch.as_tensor(value) for i, entry in state.items() for name, value in entry.items()}


def load_optimizer(optimizer, tensors):
    state = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    groups = optimizer.state_dict()["param_groups"]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
