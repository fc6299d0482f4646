"""Files of a search run: safetensors for tensors, JSON metadata inside them, no pickle.

Writes are atomic (temporary file in the same folder, fsync, rename), so a crash mid-save leaves
the previous file intact. A write killed between creating its temporary file and the rename
leaves `.<name>.<random>.tmp` behind; whoever writes `<name>` removes such leftovers when it
starts (`remove_stale_temporaries`). Every file carries a sha256 of its metadata and tensors
(names, dtypes, shapes and bytes), checked on load: a flipped bit anywhere is a ValueError.
"""

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file


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


def save(path, tensors, meta):
    """Atomically writes `tensors` (name -> tensor) and a JSON-serialisable `meta` dict."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta_text = json.dumps(meta)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"pep_kernels": meta_text, "pep_kernels_checksum": checksum(meta_text, tensors)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_text(path, text):
    """Atomically writes a text file (a run's JSON summary), as `save` writes tensors."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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
                shape = f.get_slice(name).get_shape()
                if math.prod(max(n, 1) for n in shape) >= 2**63:
                    raise ValueError(f"tensor {name!r} has shape {shape}, beyond int64")
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
    """Removes the temporary files that killed writes of `names` (file names or glob patterns)
    left in `folder` (`.<name>.<random>.tmp`, see `save`); returns their names. Only the writer
    of those files may call it, when it starts: a temporary file of a write in progress looks the same."""
    folder = Path(folder)
    removed = []
    for name in names:
        for tmp in sorted(folder.glob(f".{name}.*.tmp")):
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
