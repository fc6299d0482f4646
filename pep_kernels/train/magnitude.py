"""Magnitude pruning, the simple baseline PEP is compared with at equal non-zero counts.

Train the full table, keep its `nnz` largest-magnitude entries, then retrain from the
full model's initial weights under that mask, exactly as a PEP snapshot is retrained.
"""

import torch

from .retrain import masked_model


def magnitude_mask(weight, nnz):
    """Boolean mask of the `nnz` largest |weight| entries (ties broken by position)."""
    if not 0 <= nnz <= weight.numel():
        raise ValueError(f"nnz must be in [0, {weight.numel()}], got {nnz}")
    keep = torch.zeros(weight.numel(), dtype=torch.bool)
    keep[torch.topk(weight.detach().abs().flatten().cpu(), nnz).indices] = True
    return keep.view(weight.shape)


def magnitude_ticket(spec, initial_state, trained_weight, nnz):
    """The retrain model of magnitude pruning: initial weights, mask from the trained table."""
    mask = magnitude_mask(trained_weight, nnz)
    return masked_model(spec, initial_state["embedding.embedding.weight"], mask, initial_state)
