"""ShardedPEPEmbedding and ShardedMaskedEmbedding (TorchRec) against single-process PEPEmbedding
and MaskedEmbedding: 2 ranks over gloo on CPU.

Each spawned rank computes the single-process run itself on the concatenated batch of both
ranks, then checks its own outputs against its slice of it, and the gathered table against the
whole: forward bitwise, one SGD step (lr 1: the step is the gradient), 50 fused-Adagrad steps,
nnz after every step, budget snapshots, and the exported store; then the retrain of a mask
(MaskedEmbedding) and its exported store. The same 50-step check runs with Adam (pep_kernels'
kernels on the DENSE kernel's shard, `faithful` and `fast`) against PEPEmbedding(optimizer=Adam),
and the retrain with Adam against torch Adam. Needs the extras of requirements-torchrec.txt;
skipped without them.

Tolerance (rtol 1e-5, atol 1e-6): the two runs differ only in the order float additions sum
duplicate ids' gradients, so they drift by ulps (measured after 50 Adam steps: W 3e-8, s 2.4e-7,
i.e. an ulp of s ~ -4; shared modes bitwise). A step missed or applied twice moves entries by
about lr = 1e-2 (Adam's normalised step), four orders of magnitude beyond it, and changes nnz.
"""

import os
import socket

import pytest
import torch

# ImportError too, not only a missing module: a torchrec or fbgemm that does not load with this torch.
pytest.importorskip("torchrec", reason="needs torchrec: pip install --no-deps -r requirements-torchrec.txt",
                    exc_type=ImportError)
pytest.importorskip("pep_kernels.distributed", exc_type=ImportError)

import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from pep_kernels import MaskedEmbedding, PEPEmbedding, SparseRowStore, threshold_shape  # noqa: E402
from pep_kernels.optim import SGD, Adagrad, Adam  # noqa: E402

WORLD = 2
FIELD_DIMS = [40, 30, 20, 10]  # N = 100 rows
DIM = 8
BATCH = 16  # per rank; a power of two, so mean-loss scalings round identically on both sides
STEPS = 50
# (threshold mode, with field_dims, fused rule): per-row modes ride in the sharded table, shared
# modes are replicated; `dimension` runs on global ids, rowwise Adagrad on a shared mode.
ADAGRAD = Adagrad(lr=0.05, eps=1e-8)
CASES = [
    ("feature_dim", True, ADAGRAD),
    ("feature", True, ADAGRAD),
    ("global", True, Adagrad(lr=0.05, eps=1e-8, weight_decay=1e-3, rowwise=True)),
    ("dimension", False, ADAGRAD),
    ("field", True, ADAGRAD),
    ("field_dim", True, ADAGRAD),
]
# Adam (pep_kernels' own kernels on the DENSE kernel's shard), both modes, per-row and shared
# thresholds, against PEPEmbedding(optimizer=Adam) with torch Adam on a shared threshold.
ADAM_CASES = [
    ("feature_dim", True, Adam(lr=0.01, weight_decay=1e-4, mode="faithful")),
    ("feature_dim", True, Adam(lr=0.01, weight_decay=1e-4, mode="fast")),
    ("global", True, Adam(lr=0.01, weight_decay=1e-4, mode="fast")),
]
# The retrain with Adam: no weight decay (ShardedMaskedEmbedding refuses it: it would decay the mask).
RETRAIN_ADAM = Adam(lr=0.01, mode="fast")
ATOL = 1e-6


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch(step, with_fields):
    """The global batch of a step (both ranks' rows), the same in every process."""
    g = torch.Generator().manual_seed(1000 + step)
    if with_fields:
        ids = torch.stack([torch.randint(0, f, (WORLD * BATCH,), generator=g) for f in FIELD_DIMS], 1)
    else:
        ids = torch.randint(0, sum(FIELD_DIMS), (WORLD * BATCH, len(FIELD_DIMS)), generator=g)
    ids[:4] = ids[4:8]  # repeated ids within and across ranks
    labels = torch.randint(0, 2, (WORLD * BATCH,), generator=g).float()
    return ids, labels


def _loss(out, labels):
    """Factorization-machine interaction of the looked-up rows, mean log-loss."""
    total = out.sum(1)
    logits = 0.5 * (total * total - (out * out).sum(1)).sum(-1) + out[..., 0].sum(1)
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)


def _start(mode, with_fields):
    """W0 (Xavier), s0 (random around -4, so that a tenth of the table starts pruned)."""
    g = torch.Generator().manual_seed(7)
    n = sum(FIELD_DIMS)
    weight = torch.empty(n, DIM).uniform_(-(6 / (n + DIM)) ** 0.5, (6 / (n + DIM)) ** 0.5, generator=g)
    shape = threshold_shape(mode, n, DIM, len(FIELD_DIMS) if with_fields else None)
    threshold = torch.empty(shape).uniform_(-5, -3, generator=g)
    return weight, threshold


def _single(mode, with_fields, weight, threshold, optimizer=None):
    emb = PEPEmbedding(sum(FIELD_DIMS), DIM, threshold_mode=mode, field_dims=FIELD_DIMS if with_fields else None,
                       optimizer=optimizer)
    with torch.no_grad():
        emb.weight.copy_(weight)
        emb.threshold.copy_(threshold)
    return emb


def _sharded(mode, with_fields, weight, threshold, optimizer, sharding, **init):
    from pep_kernels.distributed import ShardedPEPEmbedding
    return ShardedPEPEmbedding(sum(FIELD_DIMS), DIM, optimizer=optimizer, threshold_mode=mode,
                               field_dims=FIELD_DIMS if with_fields else None, sharding=sharding,
                               weight=weight, threshold=threshold, **init)


def _check_step(rank, mode, with_fields, sharding):
    """Forward bitwise; one SGD step with lr 1 moves W and s by exactly minus the gradient."""
    weight, threshold = _start(mode, with_fields)
    ids, labels = _batch(0, with_fields)
    mine = slice(rank * BATCH, (rank + 1) * BATCH)
    single = _single(mode, with_fields, weight, threshold)
    out_single = single(ids)
    _loss(out_single, labels).backward()

    sharded = _sharded(mode, with_fields, weight, threshold, SGD(lr=1.0), sharding)
    out = sharded(ids[mine])
    assert torch.equal(out, out_single[mine].detach()), f"{mode}: forward differs"
    _loss(out, labels[mine]).backward()
    expected_w = weight - single.weight.grad
    torch.testing.assert_close(sharded.full_weight(), expected_w, rtol=0, atol=1e-7)
    if sharded.threshold is None:
        torch.testing.assert_close(sharded.full_threshold(), threshold - single.threshold.grad, rtol=0, atol=1e-7)
    else:  # replicated: its gradient, averaged over the ranks
        torch.testing.assert_close(sharded.threshold.grad, single.threshold.grad, rtol=1e-5, atol=1e-9)
    assert single.weight.grad.abs().sum() > 0 and single.threshold.grad.abs().sum() > 0


def _check_initial_thresholds(mode, sharding):
    """Without given thresholds each rank starts its shards as `PEPEmbedding` would."""
    sharded = _sharded(mode, True, None, None, SGD(lr=1.0), sharding, threshold_init=-3.0, threshold_slope=0.5)
    expected = PEPEmbedding(sum(FIELD_DIMS), DIM, threshold_mode=mode, threshold_init=-3.0, threshold_slope=0.5,
                            field_dims=FIELD_DIMS).threshold.detach()
    got = sharded.full_threshold() if sharded.threshold is None else sharded.threshold.detach()
    assert torch.equal(got, expected) and got[..., -1].max() == -3.0 + 0.5 * (DIM - 1)


def _snapshots(history, budgets):
    """search.py's rule: after a step, every budget the non-zero count has reached is snapshot."""
    taken, remaining = [], list(budgets)
    for step, nnz, table in history:
        while remaining and nnz <= remaining[0]:
            taken.append((step, nnz, table, remaining.pop(0)))
    return taken


def _check_training(rank, mode, with_fields, optimizer, sharding):
    """50 steps of fused Adagrad (shared thresholds: torch Adagrad on both sides), nnz after every
    step, budget snapshots, and the exported store."""
    weight, threshold = _start(mode, with_fields)
    mine = slice(rank * BATCH, (rank + 1) * BATCH)

    def run(emb, rows, take_table):
        shared = [] if mode in ("feature", "feature_dim") else [emb.threshold]
        rule = (dict(rule=torch.optim.Adam, betas=optimizer.betas) if isinstance(optimizer, Adam)
                else dict(rule=torch.optim.Adagrad))
        rest = rule.pop("rule")(shared, lr=optimizer.lr, eps=optimizer.eps, weight_decay=optimizer.weight_decay,
                                **rule) if shared else None
        history = []
        for step in range(1, STEPS + 1):
            ids, labels = _batch(step, with_fields)
            if rest:
                rest.zero_grad()
            _loss(emb(ids[rows]), labels[rows]).backward()
            if rest:
                rest.step()
            history.append((step, emb.nnz(), emb.pruned_weight() if take_table else None))
        return history

    single = _single(mode, with_fields, weight, threshold, optimizer)
    single_history = run(single, slice(None), True)
    sharded = _sharded(mode, with_fields, weight, threshold, optimizer, sharding)
    sharded_history = run(sharded, mine, True)

    assert [h[1] for h in sharded_history] == [h[1] for h in single_history], f"{mode}: nnz histories differ"
    counts = [h[1] for h in single_history]
    assert counts[0] != counts[-1], f"{mode}: the table did not change its non-zeros; the test needs it to"
    torch.testing.assert_close(sharded.full_weight(), single.weight.detach(), rtol=1e-5, atol=ATOL)
    torch.testing.assert_close(sharded.full_threshold(), single.threshold.detach(), rtol=1e-5, atol=ATOL)

    budgets = sorted({counts[9], counts[29], counts[-1]}, reverse=True)
    single_snaps, sharded_snaps = _snapshots(single_history, budgets), _snapshots(sharded_history, budgets)
    assert [s[:2] for s in sharded_snaps] == [s[:2] for s in single_snaps] and len(single_snaps) == len(budgets)
    for (_, _, mine_table, _), (_, _, their_table, _) in zip(sharded_snaps, single_snaps):
        assert torch.equal(mine_table != 0, their_table != 0)
        torch.testing.assert_close(mine_table, their_table, rtol=1e-5, atol=ATOL)

    # Export: one store from the shards, byte for byte the store of a PEPEmbedding holding the
    # gathered W and s, and lookups of the single-process run's store to fp32 tolerance.
    store = sharded.export_store()
    same = _single(mode, with_fields, sharded.full_weight(), sharded.full_threshold())
    reference = SparseRowStore.from_module(same)
    assert torch.equal(store.offsets, reference.offsets) and torch.equal(store.payload, reference.payload)
    trained = SparseRowStore.from_module(single)
    assert store.nnz == trained.nnz == single.nnz() == sharded.nnz()
    everything = torch.arange(sum(FIELD_DIMS))
    torch.testing.assert_close(store.lookup(everything), trained.lookup(everything), rtol=1e-5, atol=ATOL)


def _check_retrain(rank, sharding, optimizer=ADAGRAD):
    """The retrain stage: a fixed mask, fused Adagrad (or pep_kernels' Adam) against torch's
    Adagrad (Adam) on MaskedEmbedding; the mask stays, pruned entries stay zero, and the exported
    store is the single-process one."""
    from pep_kernels.distributed import ShardedMaskedEmbedding
    weight, threshold = _start("feature_dim", True)
    mask = (weight.abs() > torch.sigmoid(threshold)) & (torch.rand(weight.shape, generator=torch.Generator().manual_seed(3)) < 0.7)
    mine = slice(rank * BATCH, (rank + 1) * BATCH)
    single = MaskedEmbedding(weight, mask, field_dims=FIELD_DIMS)
    if isinstance(optimizer, Adam):
        rule = torch.optim.Adam(single.parameters(), lr=optimizer.lr, betas=optimizer.betas, eps=optimizer.eps)
    else:
        rule = torch.optim.Adagrad(single.parameters(), lr=optimizer.lr, eps=optimizer.eps)
    sharded = ShardedMaskedEmbedding(weight, mask, optimizer=optimizer, field_dims=FIELD_DIMS, sharding=sharding)
    for step in range(1, 21):
        ids, labels = _batch(step, True)
        rule.zero_grad()
        out_single = single(ids)
        _loss(out_single, labels).backward()
        rule.step()
        out = sharded(ids[mine])
        if step == 1:  # the same rows: bitwise; later the tables differ by float-addition order
            assert torch.equal(out, out_single[mine].detach())
        _loss(out, labels[mine]).backward()
    assert torch.equal(sharded.mask(), mask)
    torch.testing.assert_close(sharded.full_weight(), single.weight.detach(), rtol=1e-5, atol=ATOL)
    assert sharded.nnz() == single.nnz() and not bool(sharded.full_weight()[~mask].any())
    store = sharded.export_store()
    reference = SparseRowStore.from_module(MaskedEmbedding(sharded.full_weight(), mask, field_dims=FIELD_DIMS))
    assert torch.equal(store.offsets, reference.offsets) and torch.equal(store.payload, reference.payload)
    everything = torch.arange(sum(FIELD_DIMS))
    trained = SparseRowStore.from_module(single)
    torch.testing.assert_close(store.lookup(everything), trained.lookup(everything), rtol=1e-5, atol=ATOL)


def _worker(rank, port, plans, adam_plans):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        for sharding, cases in plans:
            for mode, with_fields, optimizer in cases:
                _check_step(rank, mode, with_fields, sharding)
                _check_training(rank, mode, with_fields, optimizer, sharding)
            _check_retrain(rank, sharding)
            for mode in ("feature_dim", "dimension"):  # per-row and replicated thresholds
                _check_initial_thresholds(mode, sharding)
        for sharding, cases in adam_plans:
            for mode, with_fields, optimizer in cases:
                _check_training(rank, mode, with_fields, optimizer, sharding)
        _check_retrain(rank, "row_wise", RETRAIN_ADAM)
    finally:
        dist.destroy_process_group()


def test_sharded_matches_single_process():
    # One spawn runs everything: starting the ranks (importing torchrec) is the slow part, about
    # 30 s on 2 loaded cores, and each case 3 s. Row-wise runs every mode; table-wise the two
    # layouts (per-row thresholds in the table, a replicated shared threshold).
    plans = [("row_wise", CASES), ("table_wise", [CASES[0], CASES[4]])]
    adam_plans = [("row_wise", ADAM_CASES), ("table_wise", ADAM_CASES[1:2])]
    mp.spawn(_worker, args=(_free_port(), plans, adam_plans), nprocs=WORLD)


def test_optimizers_without_an_fbgemm_rule_are_refused():
    from pep_kernels.distributed import ShardedMaskedEmbedding, fused_params
    with pytest.raises(ValueError, match="weight decay"):
        fused_params(SGD(lr=0.1, weight_decay=1e-5))
    with pytest.raises(ValueError, match="weight decay"):
        fused_params(Adagrad(weight_decay=1e-5))
    with pytest.raises(ValueError, match="rowwise Adagrad"):
        fused_params(Adagrad(rowwise=True), "the per-row thresholds")
    with pytest.raises(ValueError, match="Adam"):
        fused_params(Adam())
    with pytest.raises(ValueError, match="mask columns"):  # before any process group is needed
        ShardedMaskedEmbedding(torch.ones(4, 4), torch.ones(4, 4), optimizer=Adam(weight_decay=1e-5))
    with pytest.raises(TypeError, match="pep_kernels.optim"):
        fused_params(torch.optim.SGD)
    assert fused_params(Adagrad(rowwise=True))["learning_rate"] == 1e-2
