"""Row-sparse optimizers for embedding tables, fused into the backward (FBGEMM style): `SGD`,
`Adagrad` (element-wise or row-wise) and `Adam` (`faithful`: the published recipe, every row every
step; `fast`: looked-up rows only, skipped steps caught up when a row is next read).

Give one to `PEPEmbedding(optimizer=...)`; shared thresholds keep ordinary gradients for a torch
optimizer. The rules, their state and the catch-up: docs/design/fused_optimizers.md.
"""

import functools
import math

import torch


class RowOptimizer:
    """An update rule for a table parameter; `PEPEmbedding` holds its state as buffers."""

    kind = None  # the kernel's name for the rule

    def __init__(self, lr: float, weight_decay: float, eps: float = 0.0, betas: tuple[float, float] = (0.0, 0.0)):
        for name, value in (("lr", lr), ("weight_decay", weight_decay), ("eps", eps)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas) or len(betas) != 2:
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        self.lr, self.weight_decay, self.eps, self.betas = float(lr), float(weight_decay), float(eps), tuple(map(float, betas))

    def hparams(self) -> list[float]:
        """[lr, eps, weight_decay, beta1, beta2], the kernels' order."""
        return [self.lr, self.eps, self.weight_decay, *self.betas]

    def state_shapes(self, param: torch.Tensor) -> dict[str, torch.Size]:
        """Names and shapes of the per-parameter state (zeros at the start), in kernel order."""
        return {}

    def __repr__(self):
        return f"{type(self).__name__}(lr={self.lr}, weight_decay={self.weight_decay})"


class SGD(RowOptimizer):
    """Plain SGD with coupled L2, fused into a table's backward: p -= lr * (g + weight_decay * p)
    on the looked-up rows (duplicate ids summed first).

    Args:
        lr: the learning rate, >= 0.
        weight_decay: coupled L2, >= 0.

    Raises:
        ValueError: a negative or non-finite number.

    Example:
        >>> emb = PEPEmbedding(1000, 16, optimizer=SGD(lr=0.1))
        >>> emb(ids).sum().backward()  # the looked-up rows of W and s move; their .grad stays None
    """

    kind = "sgd"

    def __init__(self, lr: float, weight_decay: float = 0.0):
        super().__init__(lr, weight_decay)


class Adagrad(RowOptimizer):
    """Adagrad with coupled L2, fused into a table's backward, as torch.optim.Adagrad's rule:
    sum += g^2; p -= lr * g / (sqrt(sum) + eps), on the looked-up rows.

    Args:
        lr: the learning rate, >= 0.
        eps: added to the denominator, >= 0.
        weight_decay: coupled L2, >= 0.
        rowwise: one accumulator per row, the mean of g^2 over the row (FBGEMM's
            EXACT_ROWWISE_ADAGRAD: a d-th of the state).

    Raises:
        ValueError: a negative or non-finite number.

    Example:
        >>> emb = PEPEmbedding(1000, 16, optimizer=Adagrad(lr=1e-2, rowwise=True))
    """

    def __init__(self, lr: float = 1e-2, eps: float = 1e-10, weight_decay: float = 0.0, rowwise: bool = False):
        super().__init__(lr, weight_decay, eps)
        self.rowwise = bool(rowwise)
        self.kind = "rowwise_adagrad" if self.rowwise else "adagrad"

    def state_shapes(self, param):
        return {"sum": param.shape[:1] if self.rowwise else param.shape}

    def __repr__(self):
        return f"Adagrad(lr={self.lr}, eps={self.eps}, weight_decay={self.weight_decay}, rowwise={self.rowwise})"


class Adam(RowOptimizer):
    """Adam with coupled L2 (torch.optim.Adam's rule, not AdamW), fused into a table's backward.

    Args:
        lr, betas, eps, weight_decay: as torch.optim.Adam's.
        mode: "faithful", the published PEP recipe exactly: every row takes every step, with a
            zero loss gradient where it was not looked up (one pass over W, s and their moments
            per step); or "fast": only looked-up rows are touched, and a row's skipped steps are
            caught up when it is next read (the forward, `sync()`, `nnz()`, `state_dict()`):
            exactly for gaps of up to 4 steps and before step 64, in closed form beyond
            (docs/design/fused_optimizers.md).

    Raises:
        ValueError: an unknown mode, a negative or non-finite number, betas outside [0, 1).

    Example:
        >>> emb = PEPEmbedding(1000, 16, optimizer=Adam(lr=1e-3, weight_decay=1e-5, mode="faithful"))
        >>> emb(ids).sum().backward()
        >>> emb.sync(); emb.nnz()
    """

    MODES = ("fast", "faithful")

    def __init__(self, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, mode: str = "fast"):
        super().__init__(lr, weight_decay, eps, betas)
        if mode not in self.MODES:
            raise ValueError(f"unknown Adam mode {mode!r}; expected one of {self.MODES}")
        self.mode = mode
        self.kind = "adam" if mode == "fast" else "adam_dense"

    def state_shapes(self, param):
        shapes = {"exp_avg": param.shape, "exp_avg_sq": param.shape}
        if self.mode == "fast":
            shapes["last_step"] = param.shape[:1]
        return shapes

    def schedule(self, steps, dtype, device):
        """(4, steps + 1) for u = 0..steps (u = 0 is never used): lr / (1 - beta1^u) and
        sqrt(1 - beta2^u), computed as torch.optim.Adam computes them; then the running sum of
        their product (the bias corrections of `fast`'s closed-form segments) in two parts, hi
        and lo, whose sum keeps double precision in a float table."""
        b1, b2 = self.betas
        step_size = [0.0] + [self.lr / (1 - b1**k) for k in range(1, steps + 1)]
        bc2_sqrt = [1.0] + [math.sqrt(1 - b2**k) for k in range(1, steps + 1)]
        rows = torch.tensor([step_size, bc2_sqrt], dtype=torch.float64)
        rate_sum = (rows[0] * rows[1]).cumsum(0)  # u = 0 adds 0
        hi = rate_sum.to(dtype)
        table = torch.stack([rows[0], rows[1], hi.double(), rate_sum - hi.double()]).to(dtype)
        return table.to(device)

    def grown_schedule(self, schedule, steps, dtype, device):
        """A schedule covering step `steps`: `schedule` if it does, else one of twice the steps
        (at least 1024; 2^20 on a GPU, so that a captured CUDA graph can replay a million steps),
        shared by the tables with the same rule."""
        device = torch.device(device)
        if schedule is not None and schedule.shape[1] > steps and schedule.dtype == dtype and schedule.device == device:
            return schedule
        least = (1 << 20) if device.type == "cuda" else 1024
        return _cached_schedule(self.lr, self.betas, max(least, 2 * steps), dtype, device)

    def __repr__(self):
        return (f"Adam(lr={self.lr}, betas={self.betas}, eps={self.eps}, weight_decay={self.weight_decay}, "
                f"mode={self.mode!r})")


@functools.lru_cache(maxsize=8)
def _cached_schedule(lr, betas, steps, dtype, device):
    return Adam(lr=lr, betas=betas).schedule(steps, dtype, device)
