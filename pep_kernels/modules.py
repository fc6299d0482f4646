"""nn.Modules over the functional layer: they hold parameters, the functional ops do the work."""

import torch
import torch.nn.functional as F
from torch import nn

from . import reference
from ._validation import PER_FIELD, check_gk, check_ids_in_range, mode_layout, threshold_shape
from .functional import resolve_backend, soft_threshold_embedding
from .ops.indices import offset_field_ids


class _FieldTable(nn.Module):
    """What every table module shares: the per-field id contract and the counts of its pruned table."""

    def _set_field_dims(self, field_dims, num_rows, device):
        """Validates `field_dims` against the table and keeps it as a buffer (None: global ids)."""
        if field_dims is None:
            self.field_dims = None
            return
        field_dims = [int(f) for f in field_dims]
        if not field_dims or min(field_dims) < 1:
            raise ValueError(f"field_dims must be a non-empty list of positive sizes, got {field_dims}")
        if sum(field_dims) != num_rows:
            raise ValueError(f"sum(field_dims) = {sum(field_dims)} must equal num_embeddings = {num_rows}")
        self.register_buffer("field_dims", torch.tensor(field_dims, device=device), persistent=False)

    def mask(self):
        """Boolean (N, d): the entries of the pruned table that are non-zero."""
        return self.pruned_weight() != 0

    def nnz(self):
        """Number of non-zero entries of the pruned table."""
        return int(torch.count_nonzero(self.pruned_weight()))

    def sparsity(self):
        """Fraction of the table that is pruned, in [0, 1]."""
        return 1.0 - self.nnz() / (self.num_embeddings * self.embedding_dim)

    def dims_per_row(self):
        """The learned embedding size of each feature: non-zero dims per row, int64 (N,)."""
        return (self.pruned_weight() != 0).sum(1)


class PEPEmbedding(_FieldTable):
    """A drop-in for `nn.Embedding` whose table is soft-thresholded by learnable thresholds (PEP).

    With `field_dims` the input holds per-field local ids of shape `(..., F)` and each field's
    rows follow the previous field's, as in torchfm's FeaturesEmbedding; `num_embeddings` must
    equal `sum(field_dims)`, and the field modes need it. The table is Xavier-uniform over
    `(N, d)` and every threshold starts at `threshold_init`, as in the reference code.
    """

    def __init__(
        self, num_embeddings, embedding_dim, *, threshold_mode="feature_dim", threshold_init=-15.0, gk=1.0,
        field_dims=None, sparse=False, deterministic=False, backend="auto", device=None, dtype=None,
    ):
        super().__init__()
        for name, value in (("num_embeddings", num_embeddings), ("embedding_dim", embedding_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if field_dims is None and mode_layout(threshold_mode)[0] == PER_FIELD:
            raise ValueError(f"threshold_mode {threshold_mode!r} needs field_dims")
        self._set_field_dims(field_dims, num_embeddings, device)
        resolve_backend(backend, torch.device("cpu") if device is None else torch.device(device))
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.threshold_mode, self.gk = threshold_mode, check_gk(gk)
        self.sparse, self.deterministic, self.backend = sparse, deterministic, backend
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, device=device, dtype=dtype))
        num_fields = None if self.field_dims is None else self.field_dims.numel()
        shape = threshold_shape(threshold_mode, num_embeddings, embedding_dim, num_fields)
        self.threshold = nn.Parameter(torch.full(shape, float(threshold_init), device=device, dtype=dtype))
        nn.init.xavier_uniform_(self.weight)

    def forward(self, indices):
        if self.field_dims is not None:
            indices = offset_field_ids(indices, self.field_dims)
        return soft_threshold_embedding(
            indices, self.weight, self.threshold, mode=self.threshold_mode, gk=self.gk,
            sparse=self.sparse, deterministic=self.deterministic, backend=self.backend,
        )

    @torch.no_grad()
    def pruned_weight(self):
        """The whole soft-thresholded table S(V, s), shape (N, d)."""
        field_dims = None if self.field_dims is None else self.field_dims.tolist()
        return reference.soft_threshold(self.weight, self.threshold, self.threshold_mode, self.gk, field_dims)

    def extra_repr(self):
        fields = "" if self.field_dims is None else f", fields={self.field_dims.numel()}"
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, threshold_mode={self.threshold_mode!r}, "
            f"gk={self.gk}{fields}, sparse={self.sparse}, deterministic={self.deterministic}, backend={self.backend!r}"
        )


class MaskedEmbedding(_FieldTable):
    """The retrain stage of PEP (lottery ticket): a fixed mask, no threshold.

    Pruned entries stay exactly zero: their outputs are masked, so their loss gradient is zero,
    and Adam with coupled L2 leaves a zero entry with zero gradient where it is. Built from the
    initial weights and a search snapshot's mask (`mask = snapshot != 0`), with the same
    `field_dims` contract as `PEPEmbedding`.
    """

    def __init__(self, weight, mask, *, field_dims=None):
        super().__init__()
        if weight.dim() != 2 or tuple(mask.shape) != tuple(weight.shape):
            raise ValueError(f"weight must be 2-D and mask of its shape, got {tuple(weight.shape)} and {tuple(mask.shape)}")
        self._set_field_dims(field_dims, weight.shape[0], weight.device)
        self.num_embeddings, self.embedding_dim = weight.shape
        self.register_buffer("keep", mask.to(torch.bool))
        self.weight = nn.Parameter(weight.detach() * self.keep)

    def forward(self, indices):
        if self.field_dims is not None:
            indices = offset_field_ids(indices, self.field_dims)
        else:
            check_ids_in_range(indices, self.num_embeddings)
        return F.embedding(indices, self.weight) * F.embedding(indices, self.keep).to(self.weight.dtype)

    @torch.no_grad()
    def pruned_weight(self):
        return self.weight * self.keep

    def mask(self):
        """The fixed mask (an entry it keeps may still have trained to exactly zero)."""
        return self.keep.clone()

    def extra_repr(self):
        fields = "" if self.field_dims is None else f", fields={self.field_dims.numel()}"
        return f"{self.num_embeddings}, {self.embedding_dim}, kept={int(self.keep.sum())}{fields}"
