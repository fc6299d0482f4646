"""Id validation as custom ops, so the checks stay in compiled and exported graphs.

A Triton kernel cannot raise, and a device-side assert kills the CUDA context, so ids are
checked before any kernel reads a row. Each op returns a fresh flat (or offset) copy of the ids
that the lookup consumes, which keeps the check from being dead-code eliminated.
`distinct_ids` is the eager check of a table's training step, done once with its deduplication.
"""

import torch

from .._validation import check_id_bounds, check_ids_in_range


@torch.library.custom_op("pep_kernels::checked_ids", mutates_args=())
def checked_ids(indices: torch.Tensor, num_embeddings: int) -> torch.Tensor:
    """`indices` flattened to 1-D; IndexError if any id is outside [0, num_embeddings)."""
    check_ids_in_range(indices, num_embeddings)
    return indices.reshape(-1).clone()


@checked_ids.register_fake
def _(indices, num_embeddings):
    return indices.new_empty(indices.numel())


@torch.library.custom_op("pep_kernels::offset_field_ids", mutates_args=())
def offset_field_ids(local_ids: torch.Tensor, field_dims: torch.Tensor) -> torch.Tensor:
    """Per-field local ids (..., F) -> global row ids, each field's block after the previous.

    IndexError names the field and the id when a local id is outside [0, field_dims[f]).
    """
    if local_ids.dim() == 0 or local_ids.shape[-1] != field_dims.numel():
        raise ValueError(
            f"ids must have shape (..., {field_dims.numel()}) (one id per field), got {tuple(local_ids.shape)}"
        )
    bad = (local_ids < 0) | (local_ids >= field_dims)
    if bool(bad.any()):
        position = bad.nonzero()[0]
        field = int(position[-1])
        value = int(local_ids[tuple(position)])
        size = int(field_dims[field])
        raise IndexError(
            f"id {value} in field {field} is out of range: that field has {size} values "
            f"(valid local ids are 0..{size - 1})"
        )
    offsets = torch.cumsum(field_dims, 0) - field_dims
    return local_ids + offsets.to(local_ids.dtype)


@offset_field_ids.register_fake
def _(local_ids, field_dims):
    return torch.empty_like(local_ids)


def distinct_ids(ids, num_embeddings):
    """(rows, inverse) of the 1-D `ids`: their distinct values sorted (int64) and each id's index
    among them; IndexError if an id is outside [0, num_embeddings). One host sync, torch.unique's
    own, plus the read of the two ends of `rows`: what a training step of a table on GPU needs
    for the range check, the catch-up of its rows and the row gradients of its backward."""
    rows, inverse = torch.unique(ids, return_inverse=True)
    if rows.numel():
        check_id_bounds(*torch.stack((rows[0], rows[-1])).tolist(), num_embeddings)
    return rows.long(), inverse
