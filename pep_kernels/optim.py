"""Row-sparse optimizers for embedding tables, fused into the backward (FBGEMM style).

Give one to `PEPEmbedding(optimizer=...)`: the backward then updates only the rows of W (and of
per-row thresholds, modes `feature`/`feature_dim`) that the batch looked up, duplicate ids
reduced first, and no gradient tensor of the table is made. Shared thresholds (`global`,
`dimension`, field modes) still get an ordinary gradient: leave them to a torch optimizer, which
skips W and the per-row thresholds because their `.grad` stays None.

The element rules are torch.optim's, with coupled L2 (`g + weight_decay * p`):

- `SGD`: p -= lr * g.
- `Adagrad`: sum += g^2; p -= lr * g / (sqrt(sum) + eps); `rowwise=True` keeps one sum per row,
  the mean of g^2 over the row (FBGEMM's EXACT_ROWWISE_ADAGRAD).
- `Adam`, two modes:
  - `faithful`: the published PEP recipe exactly (PEP_SPEC section 3): every row takes every
    step, with a zero loss gradient when it was not looked up, in one pass over W, s and their
    moments per step.
  - `fast`: only looked-up rows are touched. A row's skipped steps are caught up when it is
    next looked up (and for the whole table by `PEPEmbedding.sync()`, which `pruned_weight`,
    `nnz` and `state_dict` call), so the L2-under-Adam drift that drives PEP's pruning is kept.
    A short gap (up to 4 steps) and any step before step 64 (where the bias corrections change
    fast) are replayed step by step, the same element rule with a zero loss gradient: the same
    numbers as `faithful` (bitwise on CPU). Other gaps are covered in closed form, in one
    segment per 256 steps whatever the gap: the momentum's excess over weight_decay * p decays
    geometrically and moves p at the denominator of its centroid step; then p decays
    exponentially at Adam's rate weight_decay * step_size / denominator summed over the segment,
    the bias corrections exactly (running sums of the schedule) and v at the midpoint (an
    exponential midpoint rule, stable also where v has run down and the decay is fast). A
    segment costs about what 2 replayed steps cost; its error is at most 2.3% of the median move
    for weights and 0.9% for thresholds (scripts/catch_up_error.py).

Gradient clipping does not see a fused table's gradients (they never exist), as with FBGEMM;
the published recipe's clip (total norm 100) does not engage in its runs.
"""

import functools
import math

import torch


class RowOptimizer:
    """An update rule for a table parameter; `PEPEmbedding` holds its state as buffers."""

    kind = None  # the kernel's name for the rule

    def __init__(self, lr, weight_decay, eps=0.0, betas=(0.0, 0.0)):
        for name, value in (("lr", lr), ("weight_decay", weight_decay), ("eps", eps)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas) or len(betas) != 2:
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        self.lr, self.weight_decay, self.eps, self.betas = float(lr), float(weight_decay), float(eps), tuple(map(float, betas))

    def hparams(self):
        """[lr, eps, weight_decay, beta1, beta2], the kernels' order."""
        return [self.lr, self.eps, self.weight_decay, *self.betas]

    def state_shapes(self, param):
        """Names and shapes of the per-parameter state (zeros at the start), in kernel order."""
        return {}

    def __repr__(self):
        return f"{type(self).__name__}(lr={self.lr}, weight_decay={self.weight_decay})"


class SGD(RowOptimizer):
    kind = "sgd"

    def __init__(self, lr, weight_decay=0.0):
        super().__init__(lr, weight_decay)


class Adagrad(RowOptimizer):
    def __init__(self, lr=1e-2, eps=1e-10, weight_decay=0.0, rowwise=False):
        super().__init__(lr, weight_decay, eps)
        self.rowwise = bool(rowwise)
        self.kind = "rowwise_adagrad" if self.rowwise else "adagrad"

    def state_shapes(self, param):
        return {"sum": param.shape[:1] if self.rowwise else param.shape}

    def __repr__(self):
        return f"Adagrad(lr={self.lr}, eps={self.eps}, weight_decay={self.weight_decay}, rowwise={self.rowwise})"


class Adam(RowOptimizer):
    MODES = ("fast", "faithful")

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, mode="fast"):
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
