"""Id checks: the strict ones, as custom ops so that they stay in compiled and exported graphs,
and the deferred one of the GPU kernels (`DeferredIdErrors`).

Strict checks raise before any kernel reads a row; on a GPU they cost a host synchronisation
(the ids are read back). Deferred checks cost none: the kernels mask an out-of-range id (it is
never read; its output row is zeros and it gets no gradient) and record it in a small device
tensor, and the caller raises the `IndexError` later, once a non-blocking copy of that record
has reached the host (as FBGEMM's `bounds_check_mode` leaves the choice between a checked and a
fast path).
"""

import torch
from torch import nn

from .._validation import check_ids_in_range

BOUNDS_CHECKS = ("strict", "deferred")

# Layout of an error record (int64): what went wrong (NO_ERROR while nothing did), the position of
# the lookup in the flattened ids, the id, its field (-1 for global ids) and the number of ids
# valid there (the field's size or the table's rows); for a bag offset, its index, its value and
# the number of ids. The first error stays until it is raised:
# later ones do not overwrite it.
NO_ERROR, BAD_ID, SCHEDULE_EXHAUSTED, BAD_OFFSET = -1, 0, 1, 2
RECORD_SIZE = 5


@torch.library.custom_op("pep_kernels::checked_ids", mutates_args=())
def checked_ids(indices: torch.Tensor, num_embeddings: int) -> torch.Tensor:
    """`indices` flattened to 1-D; IndexError if any id is outside [0, num_embeddings)."""
    check_ids_in_range(indices, num_embeddings)
    return indices.reshape(-1).clone()


@checked_ids.register_fake
def _(indices, num_embeddings):
    return indices.new_empty(indices.numel())


def check_field_ids(local_ids, field_dims):
    """IndexError naming the field and the id when a local id is outside [0, field_dims[f]); one
    host sync. ValueError unless `local_ids` has shape (..., F)."""
    if local_ids.dim() == 0 or local_ids.shape[-1] != field_dims.numel():
        raise ValueError(
            f"ids must have shape (..., {field_dims.numel()}) (one id per field), got {tuple(local_ids.shape)}"
        )
    bad = (local_ids < 0) | (local_ids >= field_dims)
    if bool(bad.any()):
        position = bad.nonzero()[0]
        field = int(position[-1])
        value = int(local_ids[tuple(position)])
        raise IndexError(field_id_message(value, field, int(field_dims[field])))


def field_id_message(value, field, size):
    return (f"id {value} in field {field} is out of range: that field has {size} values "
            f"(valid local ids are 0..{size - 1})")


@torch.library.custom_op("pep_kernels::offset_field_ids", mutates_args=())
def offset_field_ids(local_ids: torch.Tensor, field_dims: torch.Tensor) -> torch.Tensor:
    """Per-field local ids (..., F) -> global row ids, each field's block after the previous.

    IndexError names the field and the id when a local id is outside [0, field_dims[f]).
    """
    check_field_ids(local_ids, field_dims)
    offsets = torch.cumsum(field_dims, 0) - field_dims
    return local_ids + offsets.to(local_ids.dtype)


@offset_field_ids.register_fake
def _(local_ids, field_dims):
    return torch.empty_like(local_ids)


class DeferredIdErrors(nn.Module):
    """A table's record of the first id its kernels could not read, and the non-blocking road of
    that record to the host.

    `after_launch()` queues a copy of the record to pinned host memory behind the kernels (on a
    GPU; a CPU record is host memory already); `poll()` raises the `IndexError` once a copy that
    shows an error has landed, without waiting for one; `wait()` waits and raises (what `sync()`,
    `nnz()` and `state_dict()` of a table call). An error is never lost: the device record keeps
    the first one until it is raised. Nothing here reads device memory on the lookup's path, and
    inside a CUDA graph capture or a torch.compile trace only the device record is written.
    """

    def __init__(self, device=None):
        super().__init__()
        self.register_buffer("record", torch.full((RECORD_SIZE,), NO_ERROR, dtype=torch.int64, device=device),
                             persistent=False)
        self._mirror = None  # (record it mirrors, host tensor, its numpy view, CUDA event or None)

    def _host_view(self):
        """A numpy view of the host copy of the record (for a CPU record, of the record itself),
        made once per record tensor: reading it is a read of host memory, not of the device."""
        if self._mirror is None or self._mirror[0] is not self.record:
            if self.record.device.type == "cuda":
                host = torch.empty(RECORD_SIZE, dtype=torch.int64, pin_memory=True).fill_(NO_ERROR)
                self._mirror = (self.record, host, host.numpy(), torch.cuda.Event())
            else:
                self._mirror = (self.record, self.record, self.record.numpy(), None)
        return self._mirror

    def after_launch(self):
        """Behind kernels that may have written the record: queue its copy to the host (GPU), or
        raise at once (a CPU record, as the Triton interpreter writes it, is already here)."""
        if torch.compiler.is_compiling():
            return
        _, host, _, event = self._host_view()
        if event is None:
            self.poll()
        elif not torch.cuda.is_current_stream_capturing():
            host.copy_(self.record, non_blocking=True)
            event.record()

    def poll(self):
        """Raises the recorded error if a copy of the record that shows one has landed."""
        if torch.compiler.is_compiling():
            return
        _, _, view, event = self._host_view()
        if (event is None or event.query()) and view[0] != NO_ERROR:
            self._raise(view.copy())

    def wait(self):
        """Waits for the kernels and raises the recorded error, if any (one host sync)."""
        values = self.record.tolist()
        if values[0] != NO_ERROR:
            self._raise(values)

    def _raise(self, values):
        kind, position, value, field, size = (int(v) for v in values)
        self.record.fill_(NO_ERROR)
        _, host, _, _ = self._host_view()
        host.fill_(NO_ERROR)
        if kind == SCHEDULE_EXHAUSTED:
            raise RuntimeError(f"the optimizer step {value} is past the Adam schedule the kernels were given "
                               "(a CUDA graph replayed more steps than it was captured for: capture it again)")
        if kind == BAD_OFFSET:
            raise ValueError(f"bag offsets must start at 0, be non-decreasing and end at the number of ids {size}, "
                             f"got offsets[{position}] = {value} (found by the kernels after the lookup ran)")
        where = f" (position {position} of the flattened ids, found by the kernels after the lookup ran)"
        if field >= 0:
            raise IndexError(field_id_message(value, field, size) + where)
        raise IndexError(f"index {value} is out of range for a table of {size} rows (valid ids are 0..{size - 1})"
                         f"{where}")
