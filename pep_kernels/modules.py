"""nn.Modules over the functional layer: they hold parameters, the functional ops do the work."""

import torch
from torch import nn

from ._validation import (PER_FIELD, PER_ROW, bag_inputs, check_bag_mode, check_bag_offsets, check_field_dims, check_gk,
                          check_ids_in_range, check_ids_shape, check_lookup, check_pooling, initial_thresholds,
                          mode_layout, padding_row, threshold_shape)
from .functional import (prepare_id_check, resolve_backend, soft_threshold_embedding, soft_threshold_embedding_bag,
                         soft_threshold_rows)
from .ops.bag import FusedBagStepFunction
from .ops.indices import DeferredIdErrors, offset_field_ids
from .ops.optim import FusedStepFunction
from .ops.soft_threshold import MaskedEmbeddingFunction, expand_threshold, kernels
from .optim import Adam, RowOptimizer
from .store import SparseRowStore


def register_field_dims(module, field_dims, num_rows, device):
    """Validates `field_dims` against a table of `num_rows` rows and keeps them as buffers of
    `module`: `field_dims` (F,) and `field_offsets` (F + 1,) int64, the first row of each field
    and the end (both None for global ids)."""
    if field_dims is None:
        module.field_dims = module.field_offsets = None
        return
    sizes = torch.tensor(check_field_dims(field_dims, num_rows), device=device)
    module.register_buffer("field_dims", sizes, persistent=False)
    module.register_buffer("field_offsets", torch.nn.functional.pad(torch.cumsum(sizes, 0), (1, 0)), persistent=False)


class _FieldTable(nn.Module):
    """What every table module shares: the per-field id contract and the counts of its pruned table."""

    # entries of a block of `pruned_row_blocks`: 1 MiB of fp32, so that a block and its temporaries
    # stay in the CPU caches and the allocator reuses them (4M-entry blocks were page-faulted
    # afresh for every temporary: slower exports)
    BLOCK_ENTRIES = 1 << 18

    def pruned_rows(self, start, end):
        """Rows start..end-1 of the pruned table (no autograd)."""
        raise NotImplementedError

    def pruned_row_blocks(self, entries=None):
        """The pruned table block by block, as (start, end, rows start..end-1) of about `entries`
        (default `BLOCK_ENTRIES`) entries each: what exports a big table without a temporary of
        the table's size."""
        step = max(1, (entries or self.BLOCK_ENTRIES) // self.embedding_dim)
        for start in range(0, self.num_embeddings, step):
            end = min(start + step, self.num_embeddings)
            yield start, end, self.pruned_rows(start, end)

    def pruned_weight(self) -> torch.Tensor:
        """The whole pruned table, (N, d) (no autograd), built block by block: its only
        temporaries are a block's."""
        table = None
        for start, end, rows in self.pruned_row_blocks():
            if table is None:
                table = rows.new_empty((self.num_embeddings, self.embedding_dim))
            table[start:end] = rows
        return table

    def mask(self) -> torch.Tensor:
        """Boolean (N, d): the entries of the pruned table that are non-zero."""
        return self.pruned_weight() != 0

    def nnz(self) -> int:
        """Number of non-zero entries of the pruned table."""
        return int(torch.count_nonzero(self.pruned_weight()))

    def sparsity(self) -> float:
        """Fraction of the table that is pruned, in [0, 1]."""
        return 1.0 - self.nnz() / (self.num_embeddings * self.embedding_dim)

    def dims_per_row(self) -> torch.Tensor:
        """The learned embedding size of each feature: non-zero dims per row, int64 (N,)."""
        return (self.pruned_weight() != 0).sum(1)


class PEPEmbedding(_FieldTable):
    """A drop-in for `nn.Embedding` whose table W is soft-thresholded by learnable thresholds s
    (PEP): each feature keeps only the dimensions it needs.

    Args:
        num_embeddings: N, the table's rows.
        embedding_dim: d.
        threshold_mode: which threshold an entry uses: global, dimension, feature, feature_dim
            (the published default), field or field_dim (these need `field_dims`).
        threshold_init: the start of every threshold (the published -15 for MovieLens, -150 for
            Criteo/Avazu: sigmoid(-150) is 0 in fp32, nothing pruned until s rises).
        threshold_slope: adds `slope * j` to the thresholds of dimension j (per-dimension modes),
            so that rows prune their high dimensions first and the kept ones line up.
        gk: the thresholds' scale, t = gk * sigmoid(s) (the budget controller steers it).
        field_dims: per-field sizes summing to N: inputs are then per-field local ids (..., F),
            each field's rows after the previous field's (torchfm's FeaturesEmbedding).
        sparse: row-sparse gradients of W and per-row thresholds (see `soft_threshold_embedding`).
        backend: "auto", "triton", "cpu" or "reference" (see `soft_threshold_embedding`).
        optimizer: a `pep_kernels.optim` rule (SGD, Adagrad, Adam): the table trains itself in
            the backward (looked-up rows of W and per-row s updated in place, their .grad stays
            None; state in buffers, the step counter `optimizer_step` on the device).
        bounds_check: "strict" or "deferred" (None: strict on CPU, deferred on GPU); a deferred
            id error is raised at the next call, or by `sync()`, `nnz()` or `state_dict()`.
        device, dtype: of W and s. W is Xavier-uniform over (N, d), as in the reference code.

    Raises:
        ValueError: a bad size, mode, gk, field_dims that do not sum to N, a field mode without
            field_dims, an optimizer with the reference backend.
        IndexError: (forward) an id out of range, naming it and the valid range.

    Example:
        >>> emb = PEPEmbedding(3880, 16, field_dims=[2000, 1000, 500, 200, 100, 50, 20, 10],
        ...                    optimizer=Adam(lr=1e-3, weight_decay=1e-5, mode="fast"))
        >>> emb(torch.randint(0, 10, (1024, 8))).sum().backward()  # W and s step here
        >>> emb.nnz(), emb.sparsity(), emb.dims_per_row().shape
    """

    def __init__(
        self, num_embeddings: int, embedding_dim: int, *, threshold_mode: str = "feature_dim",
        threshold_init: float = -15.0, threshold_slope: float = 0.0, gk: float = 1.0,
        field_dims: list[int] | None = None, sparse: bool = False, backend: str = "auto",
        optimizer: RowOptimizer | None = None, bounds_check: str | None = None, device=None, dtype=None,
    ):
        super().__init__()
        for name, value in (("num_embeddings", num_embeddings), ("embedding_dim", embedding_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if field_dims is None and mode_layout(threshold_mode)[0] == PER_FIELD:
            raise ValueError(f"threshold_mode {threshold_mode!r} needs field_dims")
        register_field_dims(self, field_dims, num_embeddings, device)
        resolve_backend(backend, torch.device("cpu") if device is None else torch.device(device))
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.threshold_mode, self.gk = threshold_mode, check_gk(gk)
        self.sparse, self.backend, self.bounds_check = sparse, backend, bounds_check
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, device=device, dtype=dtype))
        num_fields = None if self.field_dims is None else self.field_dims.numel()
        shape = threshold_shape(threshold_mode, num_embeddings, embedding_dim, num_fields)
        self.threshold = nn.Parameter(initial_thresholds(threshold_mode, shape, threshold_init, threshold_slope,
                                                         device, dtype))
        nn.init.xavier_uniform_(self.weight)
        self.id_errors = DeferredIdErrors(device)
        self._set_optimizer(optimizer)

    def _set_optimizer(self, optimizer):
        self.optimizer = optimizer
        if optimizer is None:
            return
        if not isinstance(optimizer, RowOptimizer):
            raise TypeError(f"optimizer must be a pep_kernels.optim rule (SGD, Adagrad, Adam), got {optimizer!r}")
        if self.backend == "reference":
            raise ValueError("a fused optimizer needs backend 'auto', 'cpu' or 'triton', not 'reference'")
        self.register_buffer("optimizer_step", torch.zeros((), dtype=torch.int64, device=self.weight.device))
        # The step count on the host, so that a step reads no device scalar; unknown (None) after a
        # CUDA graph captured steps (its replays step on the device only), read again when needed.
        self._steps = 0
        self.register_load_state_dict_post_hook(lambda module, keys: setattr(module, "_steps", None))
        for name in self._optimized_parameters():
            param = getattr(self, name)
            for state, shape in optimizer.state_shapes(param).items():
                dtype = torch.int64 if state == "last_step" else param.dtype
                self.register_buffer(f"{name}_{state}", torch.zeros(shape, dtype=dtype, device=param.device))
        self._schedule = None
        # Rows of a `fast` Adam table are brought up to date before anything reads the whole table.
        self.register_state_dict_pre_hook(lambda module, prefix, keep_vars: module.sync())

    def _optimized_parameters(self):
        """The parameters the fused optimizer updates: W, and the threshold when it is per row."""
        return ("weight", "threshold") if mode_layout(self.threshold_mode)[0] == PER_ROW else ("weight",)

    def _optimizer_state(self, name):
        """[param, state1, state2, last_step] of a parameter, as the optimizer ops take it."""
        param = getattr(self, name).detach()
        state = {key: getattr(self, f"{name}_{key}") for key in self.optimizer.state_shapes(param)}
        empty = param.new_empty(0)
        return [param, state.get("exp_avg", state.get("sum", empty)), state.get("exp_avg_sq", empty),
                state.get("last_step", param.new_empty(0, dtype=torch.int64))]

    def _training_state(self):
        """(W's state, the threshold's state or [threshold]): what the fused ops take."""
        weight_state = self._optimizer_state("weight")
        threshold_state = (self._optimizer_state("threshold") if "threshold" in self._optimized_parameters()
                           else [self.threshold.detach()])
        return weight_state, threshold_state

    def known_steps(self):
        """The optimizer steps taken, as known on the host without a sync (None when unknown)."""
        return self._steps

    def optimizer_steps(self):
        """How many steps the fused optimizer has taken (reads the device counter if the host
        count is unknown)."""
        if self._steps is None:
            self._steps = int(self.optimizer_step)
        return self._steps

    def _adam_schedule(self):
        """Adam's per-step factors, covering the next step (empty for other rules)."""
        if not isinstance(self.optimizer, Adam):
            return self.weight.new_empty(0)
        if self._steps is None and self.weight.is_cuda and torch.cuda.is_current_stream_capturing():
            return self._schedule  # inside a capture after replays: the kernels report a step past it
        self._schedule = self.optimizer.grown_schedule(self._schedule, self.optimizer_steps() + 1, self.weight.dtype,
                                                       self.weight.device)
        return self._schedule

    def sync(self) -> None:
        """Brings every row up to date (a no-op unless the optimizer is `fast` Adam) and raises a
        deferred id error if the kernels recorded one (waits for the device)."""
        self.id_errors.wait()
        self.catch_up()

    def catch_up(self, rows=None, backend=None):
        """`fast` Adam: replays the steps that `rows` (int64 ids; None: every row) skipped, in W and
        per-row thresholds (a no-op for other optimizers)."""
        if self.optimizer is None or not (isinstance(self.optimizer, Adam) and self.optimizer.mode == "fast"):
            return
        step = self.optimizer_steps()
        if step == 0:
            return
        state = [t for name in self._optimized_parameters() for t in self._optimizer_state(name)]
        with torch.no_grad():
            kernels(backend or self.backend).row_optimizer_catch_up(state, rows, self._adam_schedule(),
                                                                    self.optimizer.hparams(), step)

    def train_forward(self, ids, backend, errors):
        """The fused lookup's forward (`FusedStepFunction`): (out, rows) of the flat ids; `errors`
        the `DeferredIdErrors` the kernels record into, or None."""
        weight_state, threshold_state = self._training_state()
        return kernels(backend).soft_threshold_train_forward(
            ids, weight_state, threshold_state, self._adam_schedule(), self.optimizer_step, self.threshold_mode,
            self.gk, self.field_offsets, self.optimizer.kind, self.optimizer.hparams(),
            None if errors is None else errors.record)

    def backward_step(self, grad_out, rows, backend):
        """The fused lookup's backward: one optimizer step on the looked-up rows; returns the
        gradient of a shared threshold (None for per-row thresholds, updated here)."""
        weight_state, threshold_state = self._training_state()
        grad_s = kernels(backend).soft_threshold_backward_step(
            grad_out, rows, weight_state, threshold_state, self._adam_schedule(), self.optimizer_step,
            self.threshold_mode, self.gk, self.optimizer.kind, self.optimizer.hparams(), self.id_errors.record)
        self._count_step()
        return None if "threshold" in self._optimized_parameters() else grad_s

    def _count_step(self):
        """The host count of a step the kernels took (unknown while a CUDA graph is captured: its
        replays step on the device only)."""
        capturing = self.weight.is_cuda and torch.cuda.is_current_stream_capturing()
        self._steps = None if capturing or self._steps is None else self._steps + 1

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        """The soft-thresholded rows of `indices`: `indices.shape + (d,)`."""
        if self.optimizer is None:
            return soft_threshold_embedding(
                indices, self.weight, self.threshold, mode=self.threshold_mode, gk=self.gk, sparse=self.sparse,
                backend=self.backend, field_offsets=self.field_offsets, bounds_check=self.bounds_check,
                id_errors=self.id_errors,
            )
        return self._fused_lookup(indices)

    # Outside torch.compile's graphs: the step's host-side bookkeeping (the step count, the Adam
    # schedule, the id check) is Python state that a compiled graph would bake in. The rest of a
    # compiled model compiles around it; CUDA graphs capture it whole (mode="reduce-overhead").
    @torch.compiler.disable
    def _fused_lookup(self, indices):
        check_lookup(indices, self.weight, self.threshold, self.threshold_mode, self.gk, self.field_offsets)
        backend = resolve_backend(self.backend, self.weight.device)
        errors = prepare_id_check(indices, self.num_embeddings, self.field_offsets, backend, self.bounds_check,
                                  self.id_errors)
        out = FusedStepFunction.apply(indices, self.weight, self.threshold, self, backend, errors)
        if errors is not None:
            errors.after_launch()
        return out

    def pruned_row_blocks(self, entries=None):
        self.sync()
        yield from super().pruned_row_blocks(entries)

    @torch.no_grad()
    def pruned_rows(self, start, end):
        """Rows start..end-1 of S(V, s), by the lookup kernels (`soft_threshold_rows`): bitwise
        what a lookup of those rows returns. Call `sync()` first under a `fast` optimizer
        (`pruned_row_blocks` does)."""
        threshold = expand_threshold(self.threshold.detach(), mode_layout(self.threshold_mode)[0], start, end,
                                     self.field_offsets)
        return soft_threshold_rows(self.weight.detach()[start:end], threshold, self.gk)

    def nnz(self) -> int:
        """Number of non-zero entries of the pruned table (by the kernels: no table copy)."""
        if self.weight.dtype not in (torch.float32, torch.float64) or (self.weight.is_cuda and
                                                                         self.weight.dtype == torch.float64):
            return super().nnz()
        self.sync()
        offsets = self.field_offsets if self.field_offsets is not None else \
            torch.zeros(1, dtype=torch.int64, device=self.weight.device)
        return int(kernels("auto").soft_threshold_count_nonzero(self.weight.detach(), self.threshold.detach(),
                                                               self.threshold_mode, self.gk, offsets))

    def extra_repr(self):
        fields = "" if self.field_dims is None else f", fields={self.field_dims.numel()}"
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, threshold_mode={self.threshold_mode!r}, "
            f"gk={self.gk}{fields}, sparse={self.sparse}, backend={self.backend!r}"
            + ("" if self.optimizer is None else f", optimizer={self.optimizer!r}")
        )


class PEPEmbeddingBag(PEPEmbedding):
    """A drop-in for `nn.EmbeddingBag` whose table is soft-thresholded by learnable thresholds
    (PEP): each bag pools the soft-thresholded rows of its ids in one pass (C++ on CPU, Triton on
    GPU), with no (lookups, d) intermediate.

    `forward(input, offsets=None, per_sample_weights=None)` takes nn.EmbeddingBag's forms: 2-D
    `input` (B, L) is B bags of L ids; 1-D `input` with `offsets`, the start of each bag (B,), or
    with `include_last_offset=True` B + 1 offsets ending at len(input). `mode` is the pooling,
    "sum" or "mean" (nn.EmbeddingBag's default; "max" has no kernel); `per_sample_weights` (the
    shape of `input`, sum only) scale the rows and get their gradient. Lookups of `padding_idx`
    add nothing, count in no mean and get no gradient; its row starts at zero. An empty bag is zeros.

    The rest is `PEPEmbedding`'s: `threshold_mode` among the modes a bag can use (global,
    dimension, feature, feature_dim: the field modes need a field axis), `threshold_init`,
    `threshold_slope`, `gk`, `sparse` (row-sparse gradients), `backend` ("auto", "cpu", "triton",
    "reference"), `bounds_check`, `optimizer` (a fused `pep_kernels.optim` rule, its state in
    buffers) and the table API (nnz, sparsity, pruned_weight, pruned_row_blocks, mask,
    dims_per_row, sync).
    """

    def __init__(
        self, num_embeddings, embedding_dim, *, mode="mean", padding_idx=None, include_last_offset=False,
        threshold_mode="feature_dim", threshold_init=-15.0, threshold_slope=0.0, gk=1.0, sparse=False, backend="auto",
        optimizer=None, bounds_check=None, device=None, dtype=None,
    ):
        check_bag_mode(threshold_mode)
        check_pooling(mode, "mode")
        if sparse and backend == "reference":
            raise ValueError("backend 'reference' gives dense gradients: sparse=True needs a kernel backend")
        super().__init__(num_embeddings, embedding_dim, threshold_mode=threshold_mode, threshold_init=threshold_init,
                         threshold_slope=threshold_slope, gk=gk, sparse=sparse, backend=backend, optimizer=optimizer,
                         bounds_check=bounds_check, device=device, dtype=dtype)
        self.mode, self.include_last_offset = mode, bool(include_last_offset)
        self.padding_idx = padding_row(padding_idx, num_embeddings)
        if self.padding_idx is not None:
            with torch.no_grad():
                self.weight[self.padding_idx].fill_(0)

    @property
    def padding_row(self):
        """`padding_idx` as the bag ops take it: -1 for none."""
        return -1 if self.padding_idx is None else self.padding_idx

    def forward(self, input, offsets=None, per_sample_weights=None):
        if self.optimizer is None:
            return soft_threshold_embedding_bag(
                input, self.weight, self.threshold, offsets, mode=self.threshold_mode, gk=self.gk, pooling=self.mode,
                per_sample_weights=per_sample_weights, include_last_offset=self.include_last_offset,
                padding_idx=self.padding_idx, sparse=self.sparse, backend=self.backend, bounds_check=self.bounds_check,
                id_errors=self.id_errors,
            )
        return self._fused_bags(input, offsets, per_sample_weights)

    @torch.compiler.disable  # as PEPEmbedding._fused_lookup
    def _fused_bags(self, input, offsets, per_sample_weights):
        check_lookup(input, self.weight, self.threshold, self.threshold_mode, self.gk)
        ids, bag_offsets, weights = bag_inputs(input, offsets, per_sample_weights, self.include_last_offset, self.mode)
        backend = resolve_backend(self.backend, self.weight.device)
        errors = prepare_id_check(ids, self.num_embeddings, None, backend, self.bounds_check, self.id_errors,
                                  bag_offsets)
        out = FusedBagStepFunction.apply(ids, bag_offsets, weights, self.weight, self.threshold, self, backend, errors)
        if errors is not None:
            errors.after_launch()
        return out

    def bag_train_forward(self, ids, bag_offsets, per_sample_weights, backend, errors):
        """The fused bag lookup's forward (`FusedBagStepFunction`): (B, d)."""
        weight_state, threshold_state = self._training_state()
        return kernels(backend).soft_threshold_bag_train_forward(
            ids, bag_offsets, per_sample_weights, weight_state, threshold_state, self._adam_schedule(),
            self.optimizer_step, self.threshold_mode, self.gk, self.mode, self.padding_row, self.optimizer.kind,
            self.optimizer.hparams(), None if errors is None else errors.record)

    def bag_backward_step(self, grad_out, ids, bag_offsets, per_sample_weights, backend):
        """The fused bag lookup's backward: one optimizer step on the rows the bags reach (every row
        for `faithful` Adam); returns the gradient of a shared threshold, else None."""
        weight_state, threshold_state = self._training_state()
        grad_s = kernels(backend).soft_threshold_bag_backward_step(
            grad_out, ids, bag_offsets, per_sample_weights, weight_state, threshold_state, self._adam_schedule(),
            self.optimizer_step, self.threshold_mode, self.gk, self.mode, self.padding_row, self.optimizer.kind,
            self.optimizer.hparams(), self.id_errors.record)
        self._count_step()
        return None if "threshold" in self._optimized_parameters() else grad_s

    def extra_repr(self):
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, mode={self.mode!r}, threshold_mode={self.threshold_mode!r}, "
            f"gk={self.gk}, padding_idx={self.padding_idx}, include_last_offset={self.include_last_offset}, "
            f"sparse={self.sparse}, backend={self.backend!r}"
            + ("" if self.optimizer is None else f", optimizer={self.optimizer!r}")
        )


_SAME_SIZE_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class MaskedEmbedding(_FieldTable):
    """The retrain stage of PEP (lottery ticket, PEP_SPEC section 5): a table under a fixed mask,
    no threshold. Pruned entries stay exactly zero: their outputs are masked, so their loss
    gradient is zero, and Adam with coupled L2 leaves a zero entry with zero gradient where it is.

    Args:
        weight: the table to start from, (N, d): the search's initial weights (the winning ticket).
        mask: bool (N, d), the entries to keep: a search snapshot's `!= 0`.
        field_dims: per-field sizes, the id contract of `PEPEmbedding`.
        copy: the weight is a copy of `weight` with the pruned entries zeroed; with False it is
            `weight` itself, zeroed in place (loading a big model without a second copy).
        backend: "auto" (C++ on CPU, Triton on GPU), "triton" or "cpu".
        bounds_check: as `PEPEmbedding`'s.

    Raises:
        ValueError: a weight that is not 2-D or a mask of another shape, an unknown backend.
        IndexError: (forward) an id out of range.

    Example:
        >>> masked = MaskedEmbedding(initial_weight, snapshot != 0, field_dims=field_dims)
        >>> model.embedding = masked  # then train the model as usual (torch.optim.Adam)
        >>> masked.nnz()
    """

    def __init__(self, weight: torch.Tensor, mask: torch.Tensor, *, field_dims: list[int] | None = None,
                 copy: bool = True, backend: str = "auto", bounds_check: str | None = None):
        super().__init__()
        if weight.dim() != 2 or tuple(mask.shape) != tuple(weight.shape):
            raise ValueError(f"weight must be 2-D and mask of its shape, got {tuple(weight.shape)} and {tuple(mask.shape)}")
        if backend not in ("auto", "triton", "cpu"):
            raise ValueError(f"MaskedEmbedding runs the kernels of backend 'auto', 'triton' or 'cpu', got {backend!r}")
        register_field_dims(self, field_dims, weight.shape[0], weight.device)
        self.backend, self.bounds_check = backend, bounds_check
        self.id_errors = DeferredIdErrors(weight.device)
        self.num_embeddings, self.embedding_dim = weight.shape
        self.register_buffer("keep", mask.to(torch.bool))
        # where, not weight * keep: that product makes a float copy of the mask first (2x the table)
        if copy:
            self.weight = nn.Parameter(torch.where(self.keep, weight.detach(), 0.0))
        else:
            self.weight = nn.Parameter(torch.where(self.keep, weight.detach(), weight.new_zeros(()), out=weight.detach()))

    def forward(self, indices):
        check_ids_shape(indices, self.field_offsets)
        backend = resolve_backend(self.backend, self.weight.device)
        errors = prepare_id_check(indices, self.num_embeddings, self.field_offsets, backend, self.bounds_check,
                                  self.id_errors)
        out = MaskedEmbeddingFunction.apply(indices, self.weight, self.keep, self.field_offsets,
                                            None if errors is None else errors.record, backend)
        if errors is not None:
            errors.after_launch()
        return out

    def sync(self):
        """Raises a deferred id error if the kernels recorded one (waits for the device)."""
        self.id_errors.wait()

    @torch.no_grad()
    def pruned_rows(self, start, end):
        # torch.where(keep, weight, 0.0) bit for bit, as an AND of the weight's bits with all-ones
        # or zero: torch.where's CPU kernel is not vectorised (about 4x slower than this)
        bits = _SAME_SIZE_INT[self.weight.element_size()]
        weight = self.weight[start:end].contiguous().view(bits)
        return (weight & -self.keep[start:end].to(bits)).view(self.weight.dtype)

    def mask(self):
        """The fixed mask (an entry it keeps may still have trained to exactly zero)."""
        return self.keep.clone()

    def extra_repr(self):
        fields = "" if self.field_dims is None else f", fields={self.field_dims.numel()}"
        return f"{self.num_embeddings}, {self.embedding_dim}, kept={int(self.keep.sum())}{fields}"


class MaskedEmbeddingBag(MaskedEmbedding):
    """The retrain stage of a PEP bag table: `MaskedEmbedding`'s fixed mask behind the contract
    of `nn.EmbeddingBag` as `PEPEmbeddingBag` takes it (`forward(input, offsets=None,
    per_sample_weights=None)`; `mode` "sum" or "mean", `include_last_offset`, `padding_idx`; the
    same checks of ids and offsets). The rows are pooled by `F.embedding_bag` from the masked
    table, so pruned entries get no gradient and stay zero."""

    def __init__(self, weight, mask, *, mode="mean", include_last_offset=False, padding_idx=None, copy=True):
        check_pooling(mode, "mode")
        super().__init__(weight, mask, copy=copy)
        self.mode, self.include_last_offset = mode, bool(include_last_offset)
        self.padding_idx = padding_row(padding_idx, self.num_embeddings)

    def forward(self, input, offsets=None, per_sample_weights=None):
        ids, bag_offsets, weights = bag_inputs(input, offsets, per_sample_weights, self.include_last_offset, self.mode)
        check_ids_in_range(ids, self.num_embeddings)
        check_bag_offsets(bag_offsets, ids.numel())
        masked = torch.where(self.keep, self.weight, 0.0)  # its backward masks the gradient
        return torch.nn.functional.embedding_bag(ids, masked, bag_offsets, mode=self.mode, per_sample_weights=weights,
                                                 include_last_offset=True, padding_idx=self.padding_idx)

    def extra_repr(self):
        return f"{super().extra_repr()}, mode={self.mode!r}, padding_idx={self.padding_idx}"


class PrunedEmbedding(_FieldTable):
    """Serving: a pruned table read from a `SparseRowStore`, with the id contract of
    `PEPEmbedding` and `MaskedEmbedding`, so that a trained CTR model swaps its embedding for it
    and predicts the same scores (bitwise for an fp32 store). It has no parameters: it serves, it
    does not train. The store is a submodule, so `.to(device)` moves it; the model's state_dict
    leaves it out (the store has its own file).

    Args:
        store: the `SparseRowStore` of the pruned table.
        field_dims: per-field sizes (inputs are then per-field local ids (..., F)), or None.

    Raises:
        ValueError: field_dims that do not sum to the store's rows.
        IndexError: (forward) an id out of range.

    Example:
        >>> store = SparseRowStore.from_module(model.embedding)
        >>> model.embedding = PrunedEmbedding(store, field_dims=field_dims)
        >>> scores = model(x)  # the retrained model's scores
    """

    def __init__(self, store: SparseRowStore, *, field_dims: list[int] | None = None):
        super().__init__()
        register_field_dims(self, field_dims, store.num_embeddings, store.payload.device)
        self.num_embeddings, self.embedding_dim = store.num_embeddings, store.embedding_dim
        self.store = store

    def forward(self, indices):
        if self.field_dims is not None:
            indices = offset_field_ids(indices, self.field_dims)
        return self.store(indices)

    @torch.no_grad()
    def pruned_rows(self, start, end):
        """Rows of the store's table decoded to dense float32."""
        return self.store.lookup(torch.arange(start, end, device=self.store.payload.device))

    def nnz(self):
        """Entries the store holds (no dense table is made)."""
        return self.store.nnz

    def dims_per_row(self):
        """Entries the store holds per row, int64 (N,)."""
        return self.store.dims_per_row()

    def extra_repr(self):
        return "" if self.field_dims is None else f"fields={self.field_dims.numel()}"


class PrunedEmbeddingBag(PrunedEmbedding):
    """Serving: bags of a pruned table read from a `SparseRowStore` (its `lookup_bag`), with
    nn.EmbeddingBag's calling conventions as `PEPEmbeddingBag` takes them (`mode` sum or mean,
    `padding_idx`, `include_last_offset`), so that a trained model swaps its bag table for it:

        model.bag = PrunedEmbeddingBag(SparseRowStore.from_module(model.bag), mode=model.bag.mode,
                                       padding_idx=model.bag.padding_idx)

    Float32 (B, d). The store sums a bag in id order, as torch and the CPU kernel of
    `PEPEmbeddingBag` do: an fp32 store's plain sums are theirs bit for bit wherever its rows
    equal theirs; it rounds means (times 1 / count) and weighted rows (a product, then a sum) its
    own way, within an ulp of each addition.
    """

    def __init__(self, store, *, mode="mean", padding_idx=None, include_last_offset=False):
        check_pooling(mode, "mode")
        super().__init__(store)
        self.mode, self.include_last_offset = mode, bool(include_last_offset)
        self.padding_idx = padding_row(padding_idx, store.num_embeddings)

    def forward(self, input, offsets=None, per_sample_weights=None):
        ids, bag_offsets, weights = bag_inputs(input, offsets, per_sample_weights, self.include_last_offset, self.mode)
        # The store takes each bag's start and ends the last bag at len(ids): the B + 1 offsets are
        # checked here, so that a last offset short of len(ids) is refused, not read as the end.
        check_bag_offsets(bag_offsets, ids.numel())
        if self.padding_idx is not None:
            # The store knows no padding: its lookups leave the bags (and a mean's count).
            keep = ids != self.padding_idx
            bag_offsets = torch.nn.functional.pad(torch.cumsum(keep, 0), (1, 0))[bag_offsets]
            ids = ids[keep]
            weights = None if weights is None else weights[keep]
        return self.store.lookup_bag(ids, bag_offsets[:-1], mode=self.mode, per_sample_weights=weights)

    def extra_repr(self):
        return f"mode={self.mode!r}, padding_idx={self.padding_idx}, include_last_offset={self.include_last_offset}"
