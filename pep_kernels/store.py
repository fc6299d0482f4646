"""SparseRowStore: a pruned embedding table stored row by row (each row's non-zero entries only),
for serving; its safetensors file format and the checks that make a corrupted or hostile file a
ValueError. Format and export: docs/design/store_format.md; byte layout: csrc/store_format.h.
"""

import hashlib
import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .ops import store as _store_fakes  # noqa: F401  (registers the ops' fake kernels)
from .ops.indices import checked_ids

VALUE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}
VALUE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
ENCODINGS = ("columns", "bitmask")
MAX_DIM = 65536  # csrc/store_format.h kMaxDim
FORMAT = "pep_kernels.SparseRowStore"
VERSION = 1
_INT32_MAX = 2**31 - 1
BLOCK_ENTRIES = 1 << 18  # entries encoded at a time by from_dense (1 MiB of fp32: see _FieldTable.BLOCK_ENTRIES)

_ops = torch.ops.pep_kernels


def component_bytes(num_rows, nnz, rows_kept, dim, values, encoding, offset_bytes):
    """Bytes of each part of a store of `num_rows` rows, `rows_kept` of which keep entries,
    `nnz` entries in all: offsets, column ids or masks, values and int8 scales."""
    if encoding == "columns":
        index = {"column_ids": nnz * (1 if dim <= 256 else 2)}
    else:
        index = {"masks": rows_kept * math.ceil(dim / 8)}
    return {
        "offsets": (num_rows + 1) * offset_bytes,
        **index,
        "values": nnz * VALUE_BYTES[values],
        "scales": rows_kept * 4 if values == "int8" else 0,
    }


def encoded_nbytes(num_rows, dim, nnz, rows_kept, values="fp32"):
    """`nbytes` of the store that `from_dense(table, values)` (encoding auto) makes of a table of
    `num_rows` x `dim` holding `nnz` entries in `rows_kept` rows, without making it."""
    size = min(sum(component_bytes(num_rows, nnz, rows_kept, dim, values, e, 4).values()) for e in ENCODINGS)
    return size + 4 * (num_rows + 1) if size - 4 * (num_rows + 1) > _INT32_MAX else size  # int64 offsets


def checksum(meta, offsets, payload):
    """sha256 of the metadata (less the checksum itself) and the bytes of both tensors."""
    digest = hashlib.sha256(json.dumps({k: v for k, v in meta.items() if k != "checksum"}, sort_keys=True).encode())
    for tensor in (offsets, payload):
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy())
    return "sha256:" + digest.hexdigest()


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(choices)}")


class SparseRowStore(nn.Module):
    """A pruned (N, d) table holding only its non-zero entries, for serving: per row its column
    ids or a bitmask, then its values (docs/design/store_format.md). `store(ids)` is
    `store.lookup(ids)`; C++ on CPU, a CUDA kernel on GPU builds; any number of threads may share
    one. The tensors are non-persistent buffers: `.to(device)` moves them, a model's state_dict
    leaves them out; the store's own file (`save`, `load`) is how it travels.

    Args:
        offsets: (N + 1,) int32 or int64 byte offsets of the rows in `payload`.
        payload: 1-D uint8, the encoded rows.
        embedding_dim: d.
        values: "fp32" (exact), "fp16", "bf16" or "int8" (with a per-row scale).
        encoding: "columns" or "bitmask".
        max_error: the largest absolute difference from the table it was made from.

    Build one with `from_dense`, `from_module` or `load` rather than by hand.

    Raises:
        ValueError: a malformed row, an unknown `values` or `encoding` (every row is checked).
        IndexError: (lookup) an id out of range.

    Example:
        >>> store = SparseRowStore.from_module(model.embedding, values="fp16")
        >>> store.save("table.store"); store = SparseRowStore.load("table.store")
        >>> rows = store.lookup(torch.tensor([3, 17])); store.nbytes, store.stats()["ratio_to_dense"]
    """

    def __init__(self, offsets: torch.Tensor, payload: torch.Tensor, *, embedding_dim: int, values: str = "fp32",
                 encoding: str = "columns", max_error: float = 0.0):
        super().__init__()
        _check_choice("values", values, tuple(VALUE_BYTES))
        _check_choice("encoding", encoding, ENCODINGS)
        for name, t in (("offsets", offsets), ("payload", payload)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        row_dims = _ops.store_row_dims(offsets.cpu(), payload.cpu(), embedding_dim, encoding, values)
        self.register_buffer("offsets", offsets, persistent=False)
        self.register_buffer("payload", payload, persistent=False)
        self.num_embeddings, self.embedding_dim = offsets.numel() - 1, embedding_dim
        self.values, self.encoding = values, encoding
        # count_nonzero, not (row_dims > 0).sum(): summing a bool tensor makes an int64 copy of it
        self.nnz, self.rows_kept = int(row_dims.sum()), int(torch.count_nonzero(row_dims))
        self.max_error = float(max_error)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, values: str = "fp32", encoding: str = "auto") -> "SparseRowStore":
        """The store of a pruned dense table (N, d): its entries != 0, as `values` (fp32, fp16,
        bf16 or int8), in `encoding` (columns, bitmask, or auto: the smaller). `max_error` is the
        largest absolute difference between the store's rows and `weight` (0 for an fp32 store
        of an fp32 table: its lookups are bit-exact)."""
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            got = weight.dtype if isinstance(weight, torch.Tensor) else type(weight).__name__
            raise TypeError(f"weight must be a floating-point tensor, got {got}")
        if weight.dim() != 2 or weight.shape[0] < 1 or not 1 <= weight.shape[1] <= MAX_DIM:
            raise ValueError(f"weight must be (N, d) with N >= 1 and 1 <= d <= {MAX_DIM}, got {tuple(weight.shape)}")
        source = weight.detach()
        step = max(1, BLOCK_ENTRIES // source.shape[1])

        def blocks():
            for start in range(0, source.shape[0], step):
                yield start, min(start + step, source.shape[0]), source[start:start + step]

        return cls._from_row_blocks(source.shape[0], source.shape[1], blocks, values, encoding)

    @classmethod
    def from_module(cls, module: nn.Module, values: str = "fp32", encoding: str = "auto") -> "SparseRowStore":
        """The store of a table module's pruned table (`PEPEmbedding`, `MaskedEmbedding`: anything
        with `pruned_row_blocks()`), built block by block: no dense pruned copy of the table."""
        return cls._from_row_blocks(module.num_embeddings, module.embedding_dim, module.pruned_row_blocks, values,
                                    encoding)

    @classmethod
    def _from_row_blocks(cls, num_rows, dim, blocks, values, encoding):
        """The store of the table that `blocks()` yields as (start, end, rows start..end-1), in
        order. Three passes (the number of entries and of rows kept, which size the payload, and
        checks; encoding; the error of lossy values), each holding one block at a time: the memory
        is the store's and a block's."""
        _check_choice("values", values, tuple(VALUE_BYTES))
        _check_choice("encoding", encoding, ("auto", *ENCODINGS))
        nnz, kept, nonfinite, beyond_range, all_fp32 = 0, 0, 0, 0.0, True
        for start, end, rows in blocks():
            if not rows.is_floating_point():
                raise TypeError(f"weight must be a floating-point tensor, got {rows.dtype}")
            all_fp32 &= rows.dtype == torch.float32
            dense = rows.cpu().float()
            if values != "fp32":
                finite = torch.isfinite(dense)
                nonfinite += int((~finite).sum())
                if values in VALUE_DTYPES and nonfinite == 0 and not bool(torch.isfinite(dense.to(VALUE_DTYPES[values])).all()):
                    beyond_range = max(beyond_range, float(dense.abs().max()))
            row_dims = (dense != 0).sum(1, dtype=torch.int32)
            nnz, kept = nnz + int(row_dims.sum()), kept + int(row_dims.count_nonzero())
        if nonfinite:
            raise ValueError(f"{values} values need a finite table; it holds {nonfinite} inf or NaN entries")
        if beyond_range:
            raise ValueError(f"the table holds values beyond the {values} range (max |w| = {beyond_range})")
        candidates = ENCODINGS if encoding == "auto" else (encoding,)
        sizes = {e: sum(component_bytes(num_rows, nnz, kept, dim, values, e, 4).values()) for e in candidates}
        encoding = min(sizes, key=sizes.get)
        payload_bytes = sizes[encoding] - (num_rows + 1) * 4
        offsets = torch.zeros(num_rows + 1, dtype=torch.int64 if payload_bytes > _INT32_MAX else torch.int32)
        payload = torch.empty(payload_bytes, dtype=torch.uint8)
        written = 0
        for start, end, rows in blocks():  # rows are independent byte ranges: blocks encode apart
            block_offsets, block_payload = _ops.store_encode(rows.cpu().float(), encoding, values, True)
            payload[written:written + block_payload.numel()] = block_payload
            offsets[start + 1:end + 1] = block_offsets[1:] + written
            written += block_payload.numel()
        if written != payload_bytes:
            raise RuntimeError(f"the table changed while it was encoded ({written} bytes, {payload_bytes} planned)")
        store = cls(offsets, payload, embedding_dim=dim, values=values, encoding=encoding)
        if values != "fp32" or not all_fp32:
            store.max_error = max(float((store.lookup(torch.arange(start, end)).double() - rows.cpu().double())
                                        .abs().max()) for start, end, rows in blocks())
        return store

    @property
    def nbytes(self):
        """Bytes of the store's tensors (offsets and payload)."""
        return self.offsets.nbytes + self.payload.nbytes

    def dims_per_row(self):
        """Stored entries of each row, int64 (N,) on the CPU."""
        return _ops.store_row_dims(self.offsets.cpu(), self.payload.cpu(), self.embedding_dim, self.encoding,
                                   self.values)

    def stats(self):
        """Rows kept, the histogram of dims per row (entry k: rows keeping k dims), bytes by
        component, and the ratio of the store's bytes to the dense fp32 table's."""
        row_dims = self.dims_per_row()
        dense_bytes = self.num_embeddings * self.embedding_dim * 4
        return {
            "num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim, "values": self.values,
            "encoding": self.encoding, "nnz": self.nnz, "rows_kept": self.rows_kept,
            "dims_per_row_histogram": torch.bincount(row_dims, minlength=self.embedding_dim + 1).tolist(),
            "bytes": component_bytes(self.num_embeddings, self.nnz, self.rows_kept, self.embedding_dim, self.values,
                                     self.encoding, self.offsets.element_size()),
            "nbytes": self.nbytes, "dense_fp32_bytes": dense_bytes, "ratio_to_dense": self.nbytes / dense_bytes,
            "max_error": self.max_error,
        }

    def _ids(self, indices):
        if not isinstance(indices, torch.Tensor):
            raise TypeError(f"indices must be a torch.Tensor, got {type(indices).__name__}")
        if self.payload.device.type == "cpu":
            return indices.reshape(-1)  # the C++ op checks the ids itself
        return checked_ids(indices, self.num_embeddings)  # a CUDA kernel cannot raise

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Rows `indices` (int32/int64, any shape) as float32 `indices.shape + (d,)`, zeros where
        pruned; IndexError for an id outside [0, N)."""
        out = _ops.store_lookup(self.offsets, self.payload, self._ids(indices), self.embedding_dim, self.encoding,
                                self.values)
        return out.view(*indices.shape, self.embedding_dim)

    forward = lookup

    def lookup_bag(self, indices, offsets=None, mode="sum", per_sample_weights=None):
        """`torch.nn.functional.embedding_bag` on the store's table: `indices` (B, L) are B bags
        of L ids; 1-D `indices` with `offsets` (B,) are bags starting at each offset. `mode`
        "sum" (the default here; torch's is "mean") or "mean"; `per_sample_weights` (the shape of
        `indices`) scale rows (sum only). Float32 (B, d); an empty bag is zeros."""
        if not isinstance(indices, torch.Tensor):
            raise TypeError(f"indices must be a torch.Tensor, got {type(indices).__name__}")
        if indices.dim() == 2:
            if offsets is not None:
                raise ValueError("offsets must be None when indices is 2-D (B, L)")
            bag_offsets = torch.arange(indices.shape[0] + 1, device=indices.device) * indices.shape[1]
        elif indices.dim() == 1:
            if offsets is None or offsets.dim() != 1:
                raise ValueError("1-D indices need 1-D offsets (B,): the start of each bag")
            bag_offsets = torch.cat([offsets.long(), offsets.new_tensor([indices.numel()], dtype=torch.long)])
            if self.payload.device.type != "cpu":  # the CPU op checks them itself
                self._check_bag_offsets(bag_offsets)
        else:
            raise ValueError(f"indices must be 1-D (with offsets) or 2-D (B, L), got shape {tuple(indices.shape)}")
        if per_sample_weights is not None:
            if tuple(per_sample_weights.shape) != tuple(indices.shape):
                raise ValueError(f"per_sample_weights must have the shape of indices {tuple(indices.shape)}, "
                                 f"got {tuple(per_sample_weights.shape)}")
            per_sample_weights = per_sample_weights.reshape(-1)
        return _ops.store_lookup_bag(self.offsets, self.payload, self._ids(indices), bag_offsets, per_sample_weights,
                                     self.embedding_dim, self.encoding, self.values, mode)

    @staticmethod
    def _check_bag_offsets(bag_offsets):
        """ValueError unless the B + 1 bag offsets start at 0 and never decrease (one host sync)."""
        if int(bag_offsets[0]) != 0 or bool((bag_offsets[1:] < bag_offsets[:-1]).any()):
            raise ValueError("bag offsets must start at 0, be non-decreasing and at most the number of ids")

    @torch.no_grad()
    def to_dense(self):
        """The whole table, decoded: float32 (N, d)."""
        return self.lookup(torch.arange(self.num_embeddings, device=self.payload.device))

    def metadata(self):
        """What `save` writes beside the tensors, checksum included."""
        meta = {
            "format": FORMAT, "version": VERSION, "num_embeddings": self.num_embeddings,
            "embedding_dim": self.embedding_dim, "values": self.values, "encoding": self.encoding, "nnz": self.nnz,
            "max_error": self.max_error, "offsets_dtype": str(self.offsets.dtype).removeprefix("torch."),
        }
        meta["checksum"] = checksum(meta, self.offsets, self.payload)
        return meta

    def save(self, path: str | Path) -> None:
        """Writes the store to `path` (safetensors) atomically: a failed save leaves any old file as it was."""
        # Imported here: pep_kernels.train brings scikit-learn and the training loop, which
        # serving does not otherwise need.
        from .train.checkpoint import save as atomic_save

        atomic_save(path, {"offsets": self.offsets, "payload": self.payload}, self.metadata())

    @classmethod
    def load(cls, path: str | Path, device="cpu", mmap: bool = True) -> "SparseRowStore":
        """A store written by `save`, checked (metadata, tensor shapes, checksum, every row)
        before use; ValueError for anything else. With `mmap` the tensors map the file (which
        must then not be modified in place while the store lives; `save` replaces files, it does
        not modify them); without, they are read into memory."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no store file at {path}")
        try:
            with safe_open(str(path), framework="pt", device="cpu", backend="mmap" if mmap else "pread") as f:
                meta = _parse_metadata(path, (f.metadata() or {}).get("pep_kernels"))
                names = sorted(f.keys())
                if names != ["offsets", "payload"]:
                    raise ValueError(f"{path} must hold the tensors offsets and payload, it holds {names}")
                # Checked before reading: an empty tensor passes safetensors' size checks whatever
                # its other dims are, and torch cannot make one whose sizes leave int64.
                for name in names:
                    shape = f.get_slice(name).get_shape()
                    if len(shape) != 1:
                        what = "the payload must be 1-D uint8" if name == "payload" else "offsets must be 1-D"
                        raise ValueError(f"{path}: {what}, got shape {shape}")
                offsets, payload = f.get_tensor("offsets"), f.get_tensor("payload")
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ValueError(f"{path} is not a readable store file: {e}") from None
        n = meta["num_embeddings"]
        if offsets.dtype != getattr(torch, meta["offsets_dtype"]) or tuple(offsets.shape) != (n + 1,):
            raise ValueError(f"{path}: offsets must be {meta['offsets_dtype']} of shape ({n + 1},), got "
                             f"{offsets.dtype} of shape {tuple(offsets.shape)}")
        if payload.dtype != torch.uint8 or payload.dim() != 1:
            raise ValueError(f"{path}: the payload must be 1-D uint8, got {payload.dtype} of shape "
                             f"{tuple(payload.shape)}")
        if checksum(meta, offsets, payload) != meta["checksum"]:
            raise ValueError(f"{path}: checksum mismatch, the file is corrupted")
        try:
            store = cls(offsets, payload, embedding_dim=meta["embedding_dim"], values=meta["values"],
                        encoding=meta["encoding"], max_error=meta["max_error"])
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        if store.nnz != meta["nnz"]:
            raise ValueError(f"{path}: the rows hold {store.nnz} entries, the metadata says {meta['nnz']}")
        return store.to(device)

    def extra_repr(self):
        return (f"{self.num_embeddings}, {self.embedding_dim}, values={self.values!r}, encoding={self.encoding!r}, "
                f"nnz={self.nnz}, nbytes={self.nbytes}")


def _parse_metadata(path, text):
    """The store metadata of a file, every field checked for type and range."""
    if text is None:
        raise ValueError(f"{path} has no pep_kernels metadata: not a store file")
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: unreadable metadata ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} file")
    if meta.get("version") != VERSION:
        raise ValueError(f"{path}: store format version {meta.get('version')!r} is not supported (this is {VERSION})")

    def integer(name, low, high):
        value = meta.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"{path}: metadata {name} must be an integer in [{low}, {high}], got {value!r}")

    integer("num_embeddings", 1, 2**62)
    integer("embedding_dim", 1, MAX_DIM)
    integer("nnz", 0, meta["num_embeddings"] * meta["embedding_dim"])
    choices = {"values": tuple(VALUE_BYTES), "encoding": ENCODINGS, "offsets_dtype": ("int32", "int64")}
    for name, allowed in choices.items():
        if meta.get(name) not in allowed:
            raise ValueError(f"{path}: metadata {name} must be one of {', '.join(allowed)}, got {meta.get(name)!r}")
    if isinstance(meta.get("max_error"), bool) or not isinstance(meta.get("max_error"), (int, float)):
        raise ValueError(f"{path}: metadata max_error must be a number, got {meta.get('max_error')!r}")
    if not isinstance(meta.get("checksum"), str):
        raise ValueError(f"{path}: metadata has no checksum")
    return meta
