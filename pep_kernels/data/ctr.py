"""The one in-memory form every CTR loader returns, and the train/validation/test split."""

import dataclasses
import math
import numbers
from dataclasses import dataclass, field

import torch

from .synthetic import SyntheticCTR, make_synthetic_ctr


@dataclass
class BagField:
    """One multi-hot feature: example i's ids are values[offsets[i]:offsets[i + 1]]."""

    name: str
    num_values: int  # ids are 0 .. num_values - 1
    values: torch.Tensor  # int64 (total,)
    offsets: torch.Tensor  # int64 (n + 1,): offsets[0] == 0, non-decreasing, offsets[-1] == total

    def __post_init__(self):
        self.name = str(self.name)
        num_values = self.num_values
        if isinstance(num_values, bool) or not isinstance(num_values, numbers.Integral) or num_values < 1:
            raise ValueError(f"bag {self.name!r}: num_values must be an int >= 1, got {self.num_values!r}")
        self.num_values = int(self.num_values)
        for what, tensor in (("values", self.values), ("offsets", self.offsets)):
            if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.int64 or tensor.dim() != 1:
                shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                raise ValueError(f"bag {self.name!r}: {what} must be a 1-D int64 tensor, got "
                                 f"{getattr(tensor, 'dtype', '')} of shape {shape}")
        if len(self.offsets) == 0 or int(self.offsets[0]) != 0 or int(self.offsets[-1]) != len(self.values):
            raise ValueError(f"bag {self.name!r}: offsets must start at 0 and end at len(values) = {len(self.values)}, "
                             f"got {self.offsets[:1].tolist()} ... {self.offsets[-1:].tolist()}")
        if (self.offsets[1:] < self.offsets[:-1]).any():
            i = int((self.offsets[1:] < self.offsets[:-1]).nonzero()[0])
            raise ValueError(f"bag {self.name!r}: offsets must be non-decreasing, got offsets[{i}] = "
                             f"{int(self.offsets[i])} > offsets[{i + 1}] = {int(self.offsets[i + 1])}")
        if len(self.values) and (int(self.values.min()) < 0 or int(self.values.max()) >= self.num_values):
            raise ValueError(f"bag {self.name!r} has ids in [{int(self.values.min())}, {int(self.values.max())}], "
                             f"expected 0 .. {self.num_values - 1}")

    def __len__(self):
        """The number of examples (bags), empty ones included."""
        return len(self.offsets) - 1

    def take(self, rows: torch.Tensor) -> "BagField":
        """The bags of examples ``rows`` (int64 indices, any order, repeats allowed), in that order."""
        lengths = (self.offsets[1:] - self.offsets[:-1])[rows]
        offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
        # Position j of the output reads starts[row of j] + (j - its bag's first output position).
        starts = torch.repeat_interleave(self.offsets[:-1][rows] - offsets[:-1], lengths)
        values = self.values[starts + torch.arange(int(offsets[-1]))]
        return BagField(self.name, self.num_values, values, offsets)


@dataclass
class CTRData:
    """Examples of a CTR task as per-field local ids, with optional multi-hot and dense features.

    ``x[:, f]`` holds ids in ``0 .. field_dims[f] - 1``; a model adds its own field offsets.
    ``bags`` are multi-hot features (pooled by an EmbeddingBag) and ``dense`` raw numeric features
    (a bottom MLP); the built-in models read ``x`` only. The invariants are checked on
    construction, so a loader bug surfaces here rather than as an out-of-range embedding lookup
    deep inside training.
    """

    x: torch.Tensor  # (n, F) int64 per-field local ids
    y: torch.Tensor  # (n,) float32 labels in {0, 1}
    field_dims: list  # list[int], F entries
    field_names: list  # list[str], F entries
    skipped_lines: int = 0  # malformed input lines a loader skipped with on_error="skip"
    bags: list = field(default_factory=list)  # list[BagField]: multi-hot features, each with n bags
    dense: torch.Tensor | None = None  # (n, K) float32 numeric features, or None
    dense_names: list = field(default_factory=list)  # list[str], K entries

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
        if self.x.device.type == "cpu":  # numpy reduces the rows of a (n, F) array ~10x faster than torch.amin(0)
            low, high = self.x.numpy().min(0), self.x.numpy().max(0)
        else:
            low, high = self.x.amin(0).tolist(), self.x.amax(0).tolist()
        for f, dim in enumerate(self.field_dims):
            if low[f] < 0 or high[f] >= dim:
                raise ValueError(f"field {self.field_names[f]!r} has ids in [{int(low[f])}, {int(high[f])}], "
                                 f"expected 0 .. {dim - 1}")
        if not ((self.y == 0) | (self.y == 1)).all():
            raise ValueError(f"labels must be 0 or 1, got values {self.y.unique()[:10].tolist()}")
        self._check_bags_and_dense()

    def _check_bags_and_dense(self):
        n = len(self.x)
        self.bags = list(self.bags)
        self.dense_names = [str(name) for name in self.dense_names]
        for bag in self.bags:
            if not isinstance(bag, BagField):
                raise ValueError(f"bags must hold BagField objects, got {type(bag).__name__}")
            if len(bag) != n:
                raise ValueError(f"bag {bag.name!r} has {len(bag)} bags (offsets of length {len(bag.offsets)}), "
                                 f"expected one per example: {n}")
        if self.dense is None:
            if self.dense_names:
                raise ValueError(f"dense_names {self.dense_names} given without dense features")
        else:
            if not isinstance(self.dense, torch.Tensor) or self.dense.dtype != torch.float32 or self.dense.dim() != 2:
                raise ValueError(f"dense must be a 2-D float32 tensor, got {getattr(self.dense, 'dtype', '')} of "
                                 f"shape {tuple(getattr(self.dense, 'shape', ()))}")
            if self.dense.shape != (n, len(self.dense_names)):
                raise ValueError(f"dense has shape {tuple(self.dense.shape)}, expected ({n}, {len(self.dense_names)}): "
                                 f"one row per example, one column per name in dense_names")
            if not torch.isfinite(self.dense).all():
                row, column = (~torch.isfinite(self.dense)).nonzero()[0].tolist()
                raise ValueError(f"dense feature {self.dense_names[column]!r} is {float(self.dense[row, column])} "
                                 f"in example {row}, expected a finite number")
        names = self.field_names + [bag.name for bag in self.bags] + self.dense_names
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"feature names must be distinct across fields, bags and dense features; repeated: "
                             f"{repeated}")

    def take(self, rows: torch.Tensor) -> "CTRData":
        """The examples ``rows`` (int64 indices), in that order, with their bags and dense features."""
        return dataclasses.replace(self, x=self.x[rows], y=self.y[rows], bags=[bag.take(rows) for bag in self.bags],
                                   dense=None if self.dense is None else self.dense[rows])

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
    return tuple(data.take(rows) for rows in parts)


def synthetic_ctr_data(num_samples, seed=0, field_dims=(2000, 1000, 500, 200, 100, 50, 20, 10), embedding_dim=8):
    """The synthetic task (pep_kernels.data.synthetic) as a CTRData: for demos, tests and scale runs."""
    return CTRData.from_synthetic(make_synthetic_ctr(num_samples, list(field_dims), embedding_dim, seed=seed))
