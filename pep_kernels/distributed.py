"""PEP tables sharded over the ranks of a process group with TorchRec: `ShardedPEPEmbedding` (the
search) and `ShardedMaskedEmbedding` (the retrain of a mask), with `PEPEmbedding`'s optimizers,
counting and export as collectives.

Install the extras first: `pip install --no-deps -r requirements-torchrec.txt`. Design (W and s in
one table row, which optimizer runs where, the loss convention): docs/design/sharding.md.
"""

import torch
import torch.distributed as dist
from torch import nn

try:
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import DenseTableBatchedEmbeddingBagsCodegen
    from fbgemm_gpu.tbe.config.optimizer_config import WeightDecayMode
    from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.embedding_types import EmbeddingComputeKernel
    from torchrec.distributed.shard import shard
    from torchrec.distributed.sharding_plan import row_wise, table_wise
    from torchrec.distributed.types import ShardingEnv
except ImportError as error:  # the optional extras
    raise ImportError(
        "pep_kernels.distributed needs torchrec and fbgemm-gpu: "
        "pip install --no-deps -r requirements-torchrec.txt") from error

from . import reference
from ._validation import PER_FIELD, PER_ROW, check_gk, check_ids_in_range, initial_thresholds, mode_layout, threshold_shape
from .functional import resolve_backend, soft_threshold_embedding, soft_threshold_rows
from .modules import register_field_dims
from .ops.indices import offset_field_ids
from .ops.soft_threshold import kernels
from .optim import SGD, Adagrad, Adam, RowOptimizer
from .store import SparseRowStore

SHARDINGS = ("row_wise", "table_wise")
_FEATURE = "ids"  # the one KeyedJaggedTensor key: every id of a batch, global row ids
_TABLE = "pep"


def fused_params(optimizer, extra_columns=None):
    """FBGEMM fused-optimizer parameters for a `pep_kernels.optim` rule (ValueError where FBGEMM
    has no rule with the same numbers). `extra_columns` names what the table row holds beside W
    (None: nothing), which rowwise Adagrad's one state per row would mix in."""
    if not isinstance(optimizer, RowOptimizer):
        raise TypeError(f"optimizer must be a pep_kernels.optim rule (SGD, Adagrad), got {optimizer!r}")
    if isinstance(optimizer, SGD):
        if optimizer.weight_decay != 0:
            raise ValueError(f"FBGEMM's fused SGD has no weight decay; got weight_decay={optimizer.weight_decay}")
        return {"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": optimizer.lr}
    if isinstance(optimizer, Adagrad):
        if not optimizer.rowwise:
            if optimizer.weight_decay != 0:
                raise ValueError("FBGEMM's fused element-wise Adagrad has no weight decay; got "
                                 f"weight_decay={optimizer.weight_decay} (rowwise Adagrad has it)")
            return {"optimizer": EmbOptimType.EXACT_ADAGRAD, "learning_rate": optimizer.lr, "eps": optimizer.eps}
        if extra_columns is not None:
            raise ValueError(f"rowwise Adagrad keeps one state per table row, and this table's rows hold "
                             f"{extra_columns} beside W: its state would mix them; use Adagrad(rowwise=False)")
        return {
            "optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": optimizer.lr, "eps": optimizer.eps,
            "weight_decay": optimizer.weight_decay,
            "weight_decay_mode": WeightDecayMode.L2 if optimizer.weight_decay else WeightDecayMode.NONE,
        }
    raise ValueError(
        f"no FBGEMM fused rule matches {optimizer!r}: its fused Adam is lazy (skips rows not looked up) and has no "
        "CPU kernel; the sharded tables run Adam with pep_kernels' own kernels instead")


class _ShardedTable(nn.Module):
    """What both sharded tables share: the TorchRec table of `table_width` columns (W in the
    first d), the id contract, the lookup, and the gathered and counted pruned table."""

    def _setup(self, num_embeddings, embedding_dim, extra_columns, extra_name, optimizer, field_dims, sharding,
               table_rank, process_group, device):
        for name, value in (("num_embeddings", num_embeddings), ("embedding_dim", embedding_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if sharding not in SHARDINGS:
            raise ValueError(f"unknown sharding {sharding!r}; expected one of {SHARDINGS}")
        self.process_group = process_group if process_group is not None else dist.group.WORLD
        self.world_size = dist.get_world_size(self.process_group)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.sharding, self.optimizer = sharding, optimizer
        register_field_dims(self, field_dims, num_embeddings, device)
        self.table_width = -(-(embedding_dim + extra_columns) // 4) * 4
        beside = extra_name if extra_columns else None
        if beside is None and self.table_width != embedding_dim:
            beside = f"{self.table_width - embedding_dim} zero padding columns (FBGEMM needs a multiple of 4)"
        config = EmbeddingConfig(name=_TABLE, embedding_dim=self.table_width, num_embeddings=num_embeddings,
                                 feature_names=[_FEATURE])
        collection = EmbeddingCollection(tables=[config], device=torch.device("meta"))
        own_rule = isinstance(optimizer, Adam)
        kernel = (EmbeddingComputeKernel.DENSE if own_rule else EmbeddingComputeKernel.FUSED).value
        plan = row_wise(compute_kernel=kernel) if sharding == "row_wise" else table_wise(table_rank, compute_kernel=kernel)
        sharder = EmbeddingCollectionSharder(fused_params=None if own_rule else fused_params(optimizer, beside))
        env = ShardingEnv.from_process_group(self.process_group)
        self.tables = shard(collection, {_TABLE: plan}, env, device, sharder)
        if own_rule:
            self._attach_adam(device)

    def _attach_adam(self, device):
        """Adam on this rank's shard with pep_kernels' row-optimizer kernels. The DENSE kernel's
        table (FBGEMM's TBE inside TorchRec's lookup) gets TorchRec's own backward, all-to-all
        included, as a dense gradient; a hook steps the shard as soon as it is accumulated, on the
        rows this rank's lookups read (coalesced), and drops the gradient."""
        # TorchRec keeps its lookups in a plain list, so they are not submodules to search.
        modules = [m for lookup in self.tables._lookups for m in lookup.modules()
                   if isinstance(m, DenseTableBatchedEmbeddingBagsCodegen)]
        if len(modules) > 1:
            raise ValueError(f"expected at most one table shard per rank, got {len(modules)}")
        self.register_buffer("optimizer_step", torch.zeros((), dtype=torch.int64, device=device), persistent=False)
        self._tbe, self._looked_up, self._schedule = None, [], None
        self._optimizer_backend = resolve_backend("auto", device)
        if not modules:  # table-wise, on a rank without the table
            return
        self._tbe = modules[0]
        shard_rows = self._tbe.weights.detach().view(-1, self.table_width)
        self._adam_state = [shard_rows, *(torch.zeros_like(shard_rows) for _ in range(2)),
                            torch.zeros(shard_rows.shape[0] if self.optimizer.mode == "fast" else 0, dtype=torch.int64,
                                        device=device)]
        self._tbe.register_forward_pre_hook(self._before_lookup, with_kwargs=True)
        self._tbe.weights.register_post_accumulate_grad_hook(self._adam_step)

    def _before_lookup(self, module, args, kwargs):
        """Records the shard rows a lookup reads (for the step), brings them up to date (`fast`),
        and makes each id its own bag: FBGEMM's CPU dense kernel pools every bag even for an
        unpooled table (fbgemm-gpu-cpu 1.8), so one id per bag gives the unpooled rows."""
        indices = kwargs["indices"]
        if torch.is_grad_enabled():
            self._looked_up.append(indices.long())
        self._catch_up(indices.long())
        offsets = torch.arange(indices.numel() + 1, dtype=indices.dtype, device=indices.device)
        return args, {**kwargs, "offsets": offsets}

    def _adam_schedule(self, step):
        """Adam's per-step factors up to `step` (as `PEPEmbedding` keeps them)."""
        self._schedule = self.optimizer.grown_schedule(self._schedule, step, torch.float32, self.optimizer_step.device)
        return self._schedule

    @torch.no_grad()
    def _adam_step(self, weights):
        """One Adam step of the shard: the looked-up rows with their summed gradients (kind
        `adam`), and every other row with a zero loss gradient too (`adam_dense`)."""
        step = int(self.optimizer_step) + 1
        rows = torch.unique(torch.cat(self._looked_up)) if self._looked_up else weights.new_zeros(0, dtype=torch.int64)
        self._looked_up.clear()
        grads = weights.grad.view(-1, self.table_width)[rows]
        weights.grad = None
        kernels(self._optimizer_backend).row_optimizer_step(self._adam_state, rows, grads, self._adam_schedule(step),
                                                            self.optimizer.kind, self.optimizer.hparams(), step)
        self.optimizer_step.fill_(step)

    def _catch_up(self, rows):
        """Adam `fast`: replays the skipped steps of shard `rows` (None: every row)."""
        step = int(self.optimizer_step)
        if self._tbe is None or self.optimizer.mode != "fast" or step == 0:
            return
        with torch.no_grad():
            kernels(self._optimizer_backend).row_optimizer_catch_up(self._adam_state, rows, self._adam_schedule(step),
                                                                    self.optimizer.hparams(), step)

    def local_shards(self):
        """[(first row, shard tensor (rows, table_width))] of this rank: views of FBGEMM's table,
        every row up to date (`fast` Adam replays skipped steps first)."""
        if isinstance(self.optimizer, Adam):
            self._catch_up(None)
        sharded = self.tables.state_dict()[f"embeddings.{_TABLE}.weight"]
        return [(s.metadata.shard_offsets[0], s.tensor) for s in sharded.local_shards()]

    def _lookup(self, indices):
        """(rows (n, table_width) of this rank's ids in order, positions: arange(n) in the ids' shape)."""
        if not isinstance(indices, torch.Tensor) or indices.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"indices must be an int32 or int64 tensor, got {getattr(indices, 'dtype', type(indices))}")
        if self.field_dims is not None:
            ids = offset_field_ids(indices, self.field_dims)
        else:
            check_ids_in_range(indices, self.num_embeddings)
            ids = indices
        values = ids.reshape(-1).long()
        per_sample = ids.shape[-1] if ids.dim() else 1
        lengths = torch.full((values.numel() // max(per_sample, 1),), per_sample, dtype=torch.int64, device=ids.device)
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=[_FEATURE], values=values, lengths=lengths)
        rows = self.tables(kjt)[_FEATURE].values()
        return rows, torch.arange(values.numel(), device=rows.device).reshape(ids.shape)

    def _pruned_shards(self):
        """[(first row, pruned rows (rows, d))] of this rank's shards."""
        raise NotImplementedError

    def nnz(self):
        """Non-zero entries of the whole pruned table: each rank counts its shards, one all-reduce.
        A collective, like `sparsity`, `pruned_weight` and `export_store`: every rank calls it."""
        count = sum(int(torch.count_nonzero(rows)) for _, rows in self._pruned_shards())
        total = torch.tensor([count], dtype=torch.int64)
        dist.all_reduce(total, group=self.process_group)
        return int(total)

    def sparsity(self):
        """Fraction of the table that is pruned, in [0, 1]."""
        return 1.0 - self.nnz() / (self.num_embeddings * self.embedding_dim)

    def _gather(self, shards, width):
        """The full (N, width) table from every rank's [(first row, rows)], on every rank. A
        row-wise or table-wise plan gives a rank at most one shard of the one table."""
        if len(shards) > 1:
            raise ValueError(f"expected at most one shard per rank, got {len(shards)}")
        first, local = shards[0] if shards else (0, torch.zeros(0, width))
        layout = torch.tensor([first, local.shape[0]], dtype=torch.int64)
        layouts = [torch.empty_like(layout) for _ in range(self.world_size)]
        dist.all_gather(layouts, layout, group=self.process_group)
        padded = torch.zeros(max(int(l[1]) for l in layouts), width, dtype=local.dtype)
        padded[:local.shape[0]] = local.cpu()
        gathered = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(gathered, padded, group=self.process_group)
        table = torch.zeros(self.num_embeddings, width, dtype=local.dtype)
        for (first, count), rows in zip((l.tolist() for l in layouts), gathered):
            table[first:first + count] = rows[:count]
        return table

    def _gather_columns(self, start, stop):
        """Columns [start, stop) of the table, (N, stop - start), gathered on every rank (CPU)."""
        return self._gather([(f, r[:, start:stop].float()) for f, r in self.local_shards()], stop - start)

    @torch.no_grad()
    def pruned_weight(self):
        """The whole pruned table, (N, d), gathered on every rank (CPU)."""
        return self._gather(self._pruned_shards(), self.embedding_dim)

    @torch.no_grad()
    def full_weight(self):
        """W, (N, d), gathered on every rank (CPU)."""
        return self._gather_columns(0, self.embedding_dim)

    def export_store(self, values="fp32", encoding="auto"):
        """One `SparseRowStore` of the whole pruned table, built on every rank from the gathered
        shards: the same bytes as `SparseRowStore.from_module` of the single-process module
        (`PEPEmbedding`, `MaskedEmbedding`) holding this table."""
        return SparseRowStore.from_dense(self.pruned_weight(), values=values, encoding=encoding)


class ShardedPEPEmbedding(_ShardedTable):
    """A `PEPEmbedding` whose table (W and per-row thresholds) is sharded over the ranks of a
    process group by TorchRec (`sharding="row_wise"`, or `"table_wise"` on rank `table_rank`).

    Same contract as `PEPEmbedding`: global ids, or with `field_dims` per-field local ids
    `(..., F)`; each rank passes its own batch and gets its own outputs. The table trains itself
    in the backward with `optimizer` (see the module docstring); a shared threshold is a
    replicated parameter for a torch optimizer. `weight` and `threshold` (full tables, the same on
    every rank; each rank copies its shard) start the table from given values, e.g. a
    `PEPEmbedding`'s; without them each shard is Xavier-uniform over (N, d) from a generator seeded
    with `seed` and its row offset, and thresholds start at `threshold_init` (plus
    `threshold_slope * j` on dimension j, as in `PEPEmbedding`).
    """

    def __init__(
        self, num_embeddings, embedding_dim, *, optimizer, threshold_mode="feature_dim", threshold_init=-15.0,
        threshold_slope=0.0, gk=1.0, field_dims=None, sharding="row_wise", table_rank=0, process_group=None,
        weight=None, threshold=None, seed=0, backend="auto", device=None,
    ):
        super().__init__()
        row_source, per_dim = mode_layout(threshold_mode)
        if field_dims is None and row_source == PER_FIELD:
            raise ValueError(f"threshold_mode {threshold_mode!r} needs field_dims")
        device = torch.device("cpu") if device is None else torch.device(device)
        resolve_backend(backend, device)
        self.threshold_mode, self.gk, self.backend = threshold_mode, check_gk(gk), backend
        self.threshold_columns = (embedding_dim if per_dim else 1) if row_source == PER_ROW else 0
        self._setup(num_embeddings, embedding_dim, self.threshold_columns, "the per-row thresholds", optimizer,
                    field_dims, sharding, table_rank, process_group, device)
        num_fields = None if self.field_dims is None else self.field_dims.numel()
        expected = threshold_shape(threshold_mode, num_embeddings, embedding_dim, num_fields)
        for name, value, shape in (("weight", weight, (num_embeddings, embedding_dim)), ("threshold", threshold, expected)):
            if value is not None and tuple(value.shape) != shape:
                raise ValueError(f"{name} must have shape {shape}, got {tuple(value.shape)}")
        if row_source == PER_ROW:
            self.threshold = None
            # one row, broadcast to every local row: a full (N, d) start would cost a table per rank
            start = threshold if threshold is not None else initial_thresholds(
                threshold_mode, (1, self.threshold_columns), threshold_init, threshold_slope)
        else:
            start = threshold if threshold is not None else initial_thresholds(
                threshold_mode, expected, threshold_init, threshold_slope)
            self.threshold = nn.Parameter(start.detach().to(device=device, dtype=torch.float32).clone())
            self.threshold.register_post_accumulate_grad_hook(self._average_gradient)
        self._fill_shards(weight, start if row_source == PER_ROW else None, seed)

    def _average_gradient(self, param):
        """The replicated threshold's gradient, averaged over the ranks (as DDP would)."""
        dist.all_reduce(param.grad, group=self.process_group)
        param.grad.div_(self.world_size)

    @torch.no_grad()
    def _fill_shards(self, weight, row_thresholds, seed):
        """Fill the local shards: W rows, then the per-row thresholds (a full table or one row)."""
        d, t = self.embedding_dim, self.threshold_columns
        bound = (6.0 / (self.num_embeddings + d)) ** 0.5  # nn.init.xavier_uniform_ on (N, d)
        for first, rows in self.local_shards():
            count = rows.shape[0]
            rows.zero_()
            if weight is not None:
                rows[:, :d] = weight[first:first + count].to(rows)
            else:
                generator = torch.Generator().manual_seed(seed * 1_000_003 + first)
                rows[:, :d] = torch.empty(count, d).uniform_(-bound, bound, generator=generator).to(rows)
            if t:
                rows[:, d:d + t] = (row_thresholds if len(row_thresholds) == 1 else
                                    row_thresholds[first:first + count]).to(rows)

    def forward(self, indices):
        rows, positions = self._lookup(indices)
        d, t = self.embedding_dim, self.threshold_columns
        threshold = rows[:, d:d + t] if t else self.threshold
        return soft_threshold_embedding(positions, rows[:, :d], threshold, mode=self.threshold_mode, gk=self.gk,
                                        backend=self.backend)

    @torch.no_grad()
    def _pruned_shards(self):
        d, t = self.embedding_dim, self.threshold_columns
        pruned = []
        for first, rows in self.local_shards():
            weight = rows[:, :d].float()
            if t:
                threshold = rows[:, d:d + t].float()
            elif self.field_dims is not None and mode_layout(self.threshold_mode)[0] == PER_FIELD:
                fields = reference.field_of_rows(self.field_dims.cpu())[first:first + rows.shape[0]]
                threshold = self.threshold.detach()[fields.to(self.threshold.device)]
            else:
                threshold = self.threshold.detach().reshape(1, -1).expand(rows.shape[0], -1)
            pruned.append((first, soft_threshold_rows(weight, threshold, self.gk)))
        return pruned

    @torch.no_grad()
    def full_threshold(self):
        """The threshold in its mode's shape: per-row thresholds gathered, a shared one as is."""
        if self.threshold is not None:
            return self.threshold.detach().clone()
        return self._gather_columns(self.embedding_dim, self.embedding_dim + self.threshold_columns)

    def extra_repr(self):
        fields = "" if self.field_dims is None else f", fields={self.field_dims.numel()}"
        return (f"{self.num_embeddings}, {self.embedding_dim}, threshold_mode={self.threshold_mode!r}, gk={self.gk}"
                f"{fields}, sharding={self.sharding!r}, world_size={self.world_size}, optimizer={self.optimizer!r}")


class ShardedMaskedEmbedding(_ShardedTable):
    """The retrain stage (`MaskedEmbedding`) sharded the same way: a fixed mask, no threshold.

    The mask rides in the table row as d columns of 0/1 beside W (so one plan shards both and one
    lookup brings both); the lookup multiplies W's columns by `mask != 0`, which has no gradient,
    so the fused optimizer leaves the mask columns as they are (SGD and Adagrad without weight
    decay: a zero gradient changes nothing) and pruned entries stay exactly zero. Built from full
    tables `weight` and `mask` (the same on every rank, e.g. the initial weights and a search
    snapshot's `!= 0`), with the `field_dims` contract of `MaskedEmbedding`. The price is d more
    fp32 columns per row during the retrain; the export keeps only W's non-zeros.
    """

    def __init__(self, weight, mask, *, optimizer, field_dims=None, sharding="row_wise", table_rank=0,
                 process_group=None, device=None):
        super().__init__()
        if weight.dim() != 2 or tuple(mask.shape) != tuple(weight.shape):
            raise ValueError(f"weight must be 2-D and mask of its shape, got {tuple(weight.shape)} and {tuple(mask.shape)}")
        device = torch.device("cpu") if device is None else torch.device(device)
        if isinstance(optimizer, Adam) and optimizer.weight_decay != 0:
            raise ValueError(f"Adam's weight decay would decay the mask columns of the table rows; got weight_decay="
                             f"{optimizer.weight_decay}, only 0 is supported by ShardedMaskedEmbedding")
        num_embeddings, embedding_dim = weight.shape
        self._setup(num_embeddings, embedding_dim, embedding_dim, "the mask", optimizer, field_dims, sharding,
                    table_rank, process_group, device)
        d = embedding_dim
        with torch.no_grad():
            for first, rows in self.local_shards():
                keep = mask[first:first + rows.shape[0]].to(torch.bool)
                rows.zero_()
                rows[:, :d] = (weight[first:first + rows.shape[0]] * keep).to(rows)
                rows[:, d:2 * d] = keep.to(rows)

    def forward(self, indices):
        rows, positions = self._lookup(indices)
        d = self.embedding_dim
        out = rows[:, :d] * (rows[:, d:2 * d] != 0).to(rows.dtype)
        return out.reshape(*positions.shape, d)

    @torch.no_grad()
    def _pruned_shards(self):
        d = self.embedding_dim
        return [(first, rows[:, :d].float() * (rows[:, d:2 * d] != 0)) for first, rows in self.local_shards()]

    def mask(self):
        """The fixed mask, (N, d) bool, gathered on every rank."""
        return self._gather_columns(self.embedding_dim, 2 * self.embedding_dim) != 0

    def extra_repr(self):
        fields = "" if self.field_dims is None else f", fields={self.field_dims.numel()}"
        return (f"{self.num_embeddings}, {self.embedding_dim}{fields}, sharding={self.sharding!r}, "
                f"world_size={self.world_size}, optimizer={self.optimizer!r}")
