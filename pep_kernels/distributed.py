"""PEP tables sharded with TorchRec: `ShardedPEPEmbedding`.

Install the extras first: `pip install --no-deps -r requirements-torchrec.txt`.

Design (why it is exact). The table W and the per-row thresholds s (modes `feature`,
`feature_dim`) are stored side by side as one TorchRec table of width d + t (t = 1 or d), padded
to a multiple of 4 columns (FBGEMM's requirement; the padding stays zero). So one sharding plan
(row-wise or table-wise) places W and s together, and one lookup brings both. The lookup is a
TorchRec `EmbeddingCollection` (unpooled: one row per id) fed a `KeyedJaggedTensor`; each rank
then applies pep_kernels' fused soft-threshold op to the rows it got back, with the ids
`arange(n)`, i.e. the op runs on already-gathered rows: its forward is the same kernel, on the
same values, as a single-process `PEPEmbedding`, and its backward returns per-lookup row
gradients, which flow back through TorchRec's all-to-all into FBGEMM's fused optimizer (the
FUSED compute kernel: no gradient table is made; duplicate ids are summed before the update).
Shared thresholds (`global`, `dimension`, `field`, `field_dim`) are an ordinary parameter
replicated on every rank; its gradient is averaged over the ranks by a hook as soon as it is
accumulated, so any torch optimizer then steps it identically everywhere.

Loss convention: TorchRec divides embedding gradients by the world size (it matches
DistributedDataParallel, which averages), so the sharded model trains on the mean of the
per-rank losses. With equal per-rank batches and a per-rank mean loss this is the mean loss of
the concatenated batch, and the sharded table follows a single-process `PEPEmbedding` trained
on that batch, up to the order of float additions (tested to fp32 tolerance, 2 ranks, gloo).

Optimizers (`optimizer=`, a `pep_kernels.optim` rule, mapped to FBGEMM's fused rule):

- `SGD(lr)` -> EXACT_SGD and `Adagrad(lr, eps)` -> EXACT_ADAGRAD: FBGEMM's kernels of these
  have no weight decay, so `weight_decay` must be 0;
- `Adagrad(lr, eps, weight_decay, rowwise=True)` -> EXACT_ROWWISE_ADAGRAD with L2 (coupled)
  weight decay, for shared-threshold modes with d a multiple of 4 only (its one state per table
  row would otherwise mix W, s and the padding);
- `Adam`: refused. FBGEMM's fused Adam has no CPU kernel and is lazy (rows not looked up skip
  the step), which is neither PEP's `faithful` nor its `fast` Adam.

Counting and export gather nothing they do not need: `nnz()` counts each rank's shard and sums
the counts (one all-reduce); `pruned_weight()` and `export_store()` all-gather the pruned shards
into one (N, d) table on every rank (O(N d) memory: for tables that fit one host).

Not supported: column-wise and table-row-wise plans, and `DistributedModelParallel` wrapping
(this module shards its own table; wrap the dense rest of a model in DDP yourself).
"""

import torch
import torch.distributed as dist
from torch import nn

try:
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
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
from ._validation import PER_FIELD, PER_ROW, check_gk, check_ids_in_range, mode_layout, threshold_shape
from .functional import resolve_backend, soft_threshold_embedding
from .ops.indices import offset_field_ids
from .optim import SGD, Adagrad, RowOptimizer
from .store import SparseRowStore

SHARDINGS = ("row_wise", "table_wise")
_FEATURE = "ids"  # the one KeyedJaggedTensor key: every id of a batch, global row ids
_TABLE = "pep"


def fused_params(optimizer, threshold_mode):
    """FBGEMM fused-optimizer parameters for a `pep_kernels.optim` rule (ValueError where FBGEMM
    has no rule with the same numbers)."""
    if not isinstance(optimizer, RowOptimizer):
        raise TypeError(f"optimizer must be a pep_kernels.optim rule (SGD, Adagrad), got {optimizer!r}")
    if isinstance(optimizer, SGD):
        if optimizer.weight_decay != 0:
            raise ValueError(f"FBGEMM's fused SGD has no weight decay; got weight_decay={optimizer.weight_decay}")
        return {"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": optimizer.lr}
    if isinstance(optimizer, Adagrad):
        if optimizer.rowwise and mode_layout(threshold_mode)[0] == PER_ROW:
            raise ValueError(
                f"rowwise Adagrad keeps one state per table row; with threshold_mode {threshold_mode!r} the per-row "
                "thresholds share W's table row, so its state would mix them: use Adagrad(rowwise=False)")
        if not optimizer.rowwise:
            if optimizer.weight_decay != 0:
                raise ValueError("FBGEMM's fused element-wise Adagrad has no weight decay; got "
                                 f"weight_decay={optimizer.weight_decay} (rowwise Adagrad has it)")
            return {"optimizer": EmbOptimType.EXACT_ADAGRAD, "learning_rate": optimizer.lr, "eps": optimizer.eps}
        return {
            "optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": optimizer.lr, "eps": optimizer.eps,
            "weight_decay": optimizer.weight_decay,
            "weight_decay_mode": WeightDecayMode.L2 if optimizer.weight_decay else WeightDecayMode.NONE,
        }
    raise ValueError(
        f"no FBGEMM fused rule matches {optimizer!r}: its fused Adam is lazy (skips rows not looked up) and has no "
        "CPU kernel; use SGD or Adagrad")


class ShardedPEPEmbedding(nn.Module):
    """A `PEPEmbedding` whose table (W and per-row thresholds) is sharded over the ranks of a
    process group by TorchRec (`sharding="row_wise"`, or `"table_wise"` on rank `table_rank`).

    Same contract as `PEPEmbedding`: global ids, or with `field_dims` per-field local ids
    `(..., F)`; each rank passes its own batch and gets its own outputs. The table trains itself
    in the backward with `optimizer` (see the module docstring); a shared threshold is a
    replicated parameter for a torch optimizer. `weight` and `threshold` (full tables, the same on
    every rank; each rank copies its shard) start the table from given values, e.g. a
    `PEPEmbedding`'s; without them each shard is Xavier-uniform over (N, d) from a generator seeded
    with `seed` and its row offset, and thresholds start at `threshold_init`.
    """

    def __init__(
        self, num_embeddings, embedding_dim, *, optimizer, threshold_mode="feature_dim", threshold_init=-15.0,
        gk=1.0, field_dims=None, sharding="row_wise", table_rank=0, process_group=None, weight=None,
        threshold=None, seed=0, backend="auto", device=None,
    ):
        super().__init__()
        for name, value in (("num_embeddings", num_embeddings), ("embedding_dim", embedding_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if sharding not in SHARDINGS:
            raise ValueError(f"unknown sharding {sharding!r}; expected one of {SHARDINGS}")
        row_source, per_dim = mode_layout(threshold_mode)
        if field_dims is None and row_source == PER_FIELD:
            raise ValueError(f"threshold_mode {threshold_mode!r} needs field_dims")
        self.process_group = process_group if process_group is not None else dist.group.WORLD
        self.world_size = dist.get_world_size(self.process_group)
        device = torch.device("cpu") if device is None else torch.device(device)
        resolve_backend(backend, device)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.threshold_mode, self.gk, self.backend, self.sharding = threshold_mode, check_gk(gk), backend, sharding
        self.optimizer = optimizer
        self._set_field_dims(field_dims, device)
        num_fields = None if self.field_dims is None else self.field_dims.numel()
        self.threshold_columns = (embedding_dim if per_dim else 1) if row_source == PER_ROW else 0
        width = embedding_dim + self.threshold_columns
        self.table_width = -(-width // 4) * 4

        config = EmbeddingConfig(name=_TABLE, embedding_dim=self.table_width, num_embeddings=num_embeddings,
                                 feature_names=[_FEATURE])
        collection = EmbeddingCollection(tables=[config], device=torch.device("meta"))
        kernel = EmbeddingComputeKernel.FUSED.value
        plan = row_wise(compute_kernel=kernel) if sharding == "row_wise" else table_wise(table_rank, compute_kernel=kernel)
        sharder = EmbeddingCollectionSharder(fused_params=fused_params(optimizer, threshold_mode))
        env = ShardingEnv.from_process_group(self.process_group)
        self.tables = shard(collection, {_TABLE: plan}, env, device, sharder)

        expected = threshold_shape(threshold_mode, num_embeddings, embedding_dim, num_fields)
        for name, value, shape in (("weight", weight, (num_embeddings, embedding_dim)), ("threshold", threshold, expected)):
            if value is not None and tuple(value.shape) != shape:
                raise ValueError(f"{name} must have shape {shape}, got {tuple(value.shape)}")
        if row_source == PER_ROW:
            self.threshold = None
        else:
            start = threshold if threshold is not None else torch.full(expected, float(threshold_init))
            self.threshold = nn.Parameter(start.detach().to(device=device, dtype=torch.float32).clone())
            self.threshold.register_post_accumulate_grad_hook(self._average_gradient)
        self._fill_shards(weight, threshold, threshold_init, seed)

    def _set_field_dims(self, field_dims, device):
        if field_dims is None:
            self.field_dims = None
            return
        field_dims = [int(f) for f in field_dims]
        if not field_dims or min(field_dims) < 1:
            raise ValueError(f"field_dims must be a non-empty list of positive sizes, got {field_dims}")
        if sum(field_dims) != self.num_embeddings:
            raise ValueError(f"sum(field_dims) = {sum(field_dims)} must equal num_embeddings = {self.num_embeddings}")
        self.register_buffer("field_dims", torch.tensor(field_dims, device=device), persistent=False)

    def _average_gradient(self, param):
        """The replicated threshold's gradient, averaged over the ranks (as DDP would)."""
        dist.all_reduce(param.grad, group=self.process_group)
        param.grad.div_(self.world_size)

    def local_shards(self):
        """[(first row, shard tensor (rows, table_width))] of this rank: views of FBGEMM's table."""
        sharded = self.tables.state_dict()[f"embeddings.{_TABLE}.weight"]
        return [(s.metadata.shard_offsets[0], s.tensor) for s in sharded.local_shards()]

    @torch.no_grad()
    def _fill_shards(self, weight, threshold, threshold_init, seed):
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
                rows[:, d:d + t] = threshold[first:first + count].to(rows) if threshold is not None else threshold_init

    def _global_ids(self, indices):
        if not isinstance(indices, torch.Tensor) or indices.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"indices must be an int32 or int64 tensor, got {getattr(indices, 'dtype', type(indices))}")
        if self.field_dims is not None:
            return offset_field_ids(indices, self.field_dims)
        check_ids_in_range(indices, self.num_embeddings)
        return indices

    def forward(self, indices):
        ids = self._global_ids(indices)
        shape = ids.shape
        values = ids.reshape(-1).long()
        per_sample = shape[-1] if ids.dim() else 1
        lengths = torch.full((values.numel() // max(per_sample, 1),), per_sample, dtype=torch.int64, device=ids.device)
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=[_FEATURE], values=values, lengths=lengths)
        rows = self.tables(kjt)[_FEATURE].values()  # (n, table_width), in the order of `values`
        d, t = self.embedding_dim, self.threshold_columns
        threshold = rows[:, d:d + t] if t else self.threshold
        positions = torch.arange(values.numel(), device=rows.device).reshape(shape)
        return soft_threshold_embedding(positions, rows[:, :d], threshold, mode=self.threshold_mode, gk=self.gk,
                                        backend=self.backend)

    @torch.no_grad()
    def _pruned_shards(self):
        """[(first row, pruned rows (rows, d))] of this rank's shards."""
        d, t = self.embedding_dim, self.threshold_columns
        pruned = []
        for first, rows in self.local_shards():
            # Contiguous copies: torch's vectorized sigmoid can differ from its strided one by an
            # ulp, and PEPEmbedding.pruned_weight reads contiguous tensors.
            weight = rows[:, :d].float().contiguous()
            if t:
                threshold = rows[:, d:d + t].float().contiguous()
            elif self.field_dims is not None and mode_layout(self.threshold_mode)[0] == PER_FIELD:
                fields = reference.field_of_rows(self.field_dims.cpu())[first:first + rows.shape[0]]
                threshold = self.threshold.detach()[fields.to(self.threshold.device)]
            else:
                threshold = self.threshold.detach()
            pruned.append((first, reference.soft_threshold_values(weight, threshold, self.gk)))
        return pruned

    def nnz(self):
        """Non-zero entries of the whole pruned table: each rank counts its shards, one all-reduce."""
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

    @torch.no_grad()
    def pruned_weight(self):
        """The whole soft-thresholded table S(V, s), (N, d), gathered on every rank (CPU)."""
        return self._gather(self._pruned_shards(), self.embedding_dim)

    @torch.no_grad()
    def full_weight(self):
        """W, (N, d), gathered on every rank (CPU)."""
        return self._gather([(f, r[:, :self.embedding_dim].float()) for f, r in self.local_shards()],
                            self.embedding_dim)

    @torch.no_grad()
    def full_threshold(self):
        """The threshold in its mode's shape: per-row thresholds gathered, a shared one as is."""
        if self.threshold is not None:
            return self.threshold.detach().clone()
        d, t = self.embedding_dim, self.threshold_columns
        return self._gather([(f, r[:, d:d + t].float()) for f, r in self.local_shards()], t)

    def export_store(self, values="fp32", encoding="auto"):
        """One `SparseRowStore` of the whole pruned table, built on every rank from the gathered
        shards: the same bytes as `SparseRowStore.from_module` of a `PEPEmbedding` holding
        these W and s."""
        return SparseRowStore.from_dense(self.pruned_weight(), values=values, encoding=encoding)

    def extra_repr(self):
        fields = "" if self.field_dims is None else f", fields={self.field_dims.numel()}"
        return (f"{self.num_embeddings}, {self.embedding_dim}, threshold_mode={self.threshold_mode!r}, gk={self.gk}"
                f"{fields}, sharding={self.sharding!r}, world_size={self.world_size}, optimizer={self.optimizer!r}")
