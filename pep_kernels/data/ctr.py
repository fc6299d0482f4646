"""The one in-memory form every CTR loader returns, and the train/validation/test split."""

import dataclasses
import math
from dataclasses import dataclass

import torch

from .synthetic import SyntheticCTR, make_synthetic_ctr


@dataclass
class CTRData:
    """Examples of a CTR task as per-field local ids.

    ``x[:, f]`` holds ids in ``0 .. field_dims[f] - 1``; a model adds its own field offsets. The
    invariants are checked on construction, so a loader bug surfaces here rather than as an
    out-of-range embedding lookup deep inside training.
    """

    x: torch.Tensor  # (n, F) int64 per-field local ids
    y: torch.Tensor  # (n,) float32 labels in {0, 1}
    field_dims: list  # list[int], F entries
    field_names: list  # list[str], F entries
    skipped_lines: int = 0  # malformed input lines a loader skipped with on_error="skip"

    def __post_init__(self):
        self.field_dims = [int(d) for d in self.field_dims]
        self.field_names = [str(name) for name in self.field_names]
        if self.x.dtype != torch.int64 or self.x.dim() != 2:
            raise ValueError(f"x must be a 2-D int64 tensor, got {self.x.dtype} of shape {tuple(self.x.shape)}")
        if self.y.dtype != torch.float32 or self.y.shape != (self.x.shape[0],):
            raise ValueError(
                f"y must be a float32 tensor of shape ({self.x.shape[0]},), got {self.y.dtype} of shape "
                f"{tuple(self.y.shape)}"
            )
        num_fields = self.x.shape[1]
        if len(self.field_dims) != num_fields or len(self.field_names) != num_fields:
            raise ValueError(
                f"x has {num_fields} fields but there are {len(self.field_dims)} field_dims and "
                f"{len(self.field_names)} field_names"
            )
        if min(self.field_dims, default=1) < 1:
            raise ValueError(f"every field needs at least one id, got field_dims {self.field_dims}")
        if len(self.x) == 0:
            return
        below = self.x.amin(0) < 0
        above = self.x.amax(0) >= torch.tensor(self.field_dims)
        if (below | above).any():
            f = int((below | above).nonzero()[0])
            raise ValueError(
                f"field {self.field_names[f]!r} has ids in [{int(self.x[:, f].min())}, {int(self.x[:, f].max())}], "
                f"expected 0 .. {self.field_dims[f] - 1}"
            )
        if not ((self.y == 0) | (self.y == 1)).all():
            raise ValueError(f"labels must be 0 or 1, got values {self.y.unique()[:10].tolist()}")

    def __len__(self):
        return len(self.x)

    @classmethod
    def from_synthetic(cls, synthetic: SyntheticCTR) -> "CTRData":
        """Wrap a :class:`SyntheticCTR` (its fields are named ``field_0``, ``field_1``, ...)."""
        names = [f"field_{f}" for f in range(len(synthetic.field_dims))]
        return cls(synthetic.x, synthetic.y, list(synthetic.field_dims), names)


def split(data: CTRData, seed: int = 0, fractions=(0.8, 0.1, 0.1)):
    """Split into (train, val, test) by one random permutation drawn from ``seed``.

    The same seed gives the same split on any machine (a dedicated ``torch.Generator``, independent
    of the global RNG). Boundaries are taken on cumulative fractions, so the three parts always
    cover every example exactly once and a zero fraction gives an empty part.
    """
    if len(fractions) != 3 or min(fractions) < 0 or not math.isclose(sum(fractions), 1.0, abs_tol=1e-9):
        raise ValueError(f"fractions must be 3 non-negative numbers summing to 1, got {tuple(fractions)}")
    n = len(data)
    # The epsilon keeps e.g. 0.29 * 100 = 28.999999999999996 from losing an example.
    train_end = min(n, math.floor(n * fractions[0] + 1e-9))
    val_end = min(n, math.floor(n * (fractions[0] + fractions[1]) + 1e-9))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    parts = order[:train_end], order[train_end:val_end], order[val_end:]
    return tuple(dataclasses.replace(data, x=data.x[rows], y=data.y[rows]) for rows in parts)


def synthetic_ctr_data(num_samples, seed=0, field_dims=(2000, 1000, 500, 200, 100, 50, 20, 10), embedding_dim=8):
    """The synthetic task (pep_kernels.data.synthetic) as a CTRData: for demos, tests and scale runs."""
    return CTRData.from_synthetic(make_synthetic_ctr(num_samples, list(field_dims), embedding_dim, seed=seed))
