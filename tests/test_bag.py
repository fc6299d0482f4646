"""PEPEmbeddingBag and the bag ops: the C++ kernels against the eager reference (the soft-thresholded
table pooled by F.embedding_bag), values and gradients; the fused row optimizers against their
oracles; nn.EmbeddingBag's input forms; bad input; registration; serving from a store."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pep_kernels import (PEPEmbeddingBag, PrunedEmbeddingBag, SparseRowStore, reference, soft_threshold_embedding_bag,
                         threshold_shape)
from pep_kernels.functional import functional_id_errors
from pep_kernels.ops import soft_threshold as soft_threshold_ops
from pep_kernels.optim import SGD, Adagrad, Adam

from utils import EPS32, GRAD_TOL, HAS_CUDA, ODD_DIMS, PER_ROW_MODES, dense, leaves

DEVICE = "cuda" if HAS_CUDA else "cpu"

ops = torch.ops.pep_kernels
BAG_MODES = ("global", "dimension", "feature", "feature_dim")
POOLINGS = ("sum", "mean", "weighted")  # weighted: sum with per-sample weights


def bag_tol(max_len, gk=1.0):
    """A bag pools at most `max_len` rows (scaled by factors of at most 1: per-sample weights in
    [0, 1), 1 / bag size), each within 4 ulps of gk of the reference's row (the last bit of
    sigmoid), added in the reference's order: the sum is within the sum of those errors; rtol 1e-6
    for the last rounding of the result (torch's weighted sum is fused multiply-adds)."""
    return dict(rtol=1e-6, atol=max_len * 4 * EPS32 * max(gk, 1.0))


def make_bags(mode, num_rows, dim, bags=7, max_len=8, seed=0, index_dtype=torch.int64, dtype=torch.float32):
    """(ids, offsets (B,) bag starts, per-sample weights, weight, threshold): bags of 0..max_len
    ids, bag 1 empty, ids drawn from few rows (duplicates within and across bags), thresholds
    spread so that a good share of the entries is pruned."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(num_rows, dim, generator=gen, dtype=dtype)
    threshold = (torch.rand(threshold_shape(mode, num_rows, dim), generator=gen) * 2 - 1.5).to(dtype)
    lengths = torch.randint(0, max_len + 1, (bags,), generator=gen)
    lengths[1] = 0
    ids = torch.randint(0, num_rows, (int(lengths.sum()),), generator=gen).to(index_dtype)
    offsets = torch.cumsum(lengths, 0) - lengths
    weights = torch.rand(ids.shape, generator=gen, dtype=dtype)
    return ids, offsets, weights, weight, threshold


def run(backend, input, weight, threshold, offsets=None, mode="feature_dim", gk=1.0, pooling="sum",
        per_sample_weights=None, sparse=False, grad_seed=1, **kwargs):
    """Output and the gradients (weight, threshold, per-sample weights or None) for a fixed random
    upstream gradient."""
    w, s = leaves(weight, threshold)
    p = None if per_sample_weights is None else per_sample_weights.detach().clone().requires_grad_(True)
    out = soft_threshold_embedding_bag(input, w, s, offsets, mode=mode, gk=gk, pooling=pooling, per_sample_weights=p,
                                       sparse=sparse, backend=backend, **kwargs)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=out.dtype).to(out.device)
    grads = torch.autograd.grad(out, [w, s] + ([p] if p is not None else []), upstream)
    return (out.detach(),) + tuple(grads) + ((None,) if p is None else ())


def check_against_reference(input, weight, threshold, offsets=None, max_len=8, gk=1.0, backend="cpu", **kwargs):
    got = run(backend, input, weight, threshold, offsets, gk=gk, **kwargs)
    kwargs.pop("sparse", None)  # the reference's gradients are dense
    want = run("reference", input, weight, threshold, offsets, gk=gk, **kwargs)
    torch.testing.assert_close(got[0], want[0], **bag_tol(max_len, gk))
    for g, w in zip(got[1:], want[1:]):
        torch.testing.assert_close(dense(g), w, **GRAD_TOL)
    return got


def pooling_args(pooling, weights):
    return ("sum", weights) if pooling == "weighted" else (pooling, None)


# ---------------------------------------------------------------- kernels against the reference


@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize("dim", ODD_DIMS)
@pytest.mark.parametrize("mode", BAG_MODES)
def test_matches_reference(mode, dim, pooling):
    ids, offsets, weights, weight, threshold = make_bags(mode, num_rows=16, dim=dim)
    pool, psw = pooling_args(pooling, weights)
    out, *_ = check_against_reference(ids, weight, threshold, offsets, mode=mode, gk=0.9, pooling=pool,
                                      per_sample_weights=psw)
    assert not out[1].any()  # the empty bag
    rows = reference.soft_threshold(weight, threshold, mode, 0.9)[ids]
    pruned = float((rows == 0).float().mean())
    assert 0 < pruned < 1, f"inputs should prune part of the entries, pruned {pruned:.2f}"


@pytest.mark.parametrize("mode", BAG_MODES)
@pytest.mark.parametrize("pooling", POOLINGS)
def test_heavy_duplicates(mode, pooling):
    """300 lookups of 3 rows in 20 bags of up to 30: long per-row sums in the backward."""
    ids, offsets, weights, weight, threshold = make_bags(mode, num_rows=3, dim=24, bags=20, max_len=30, seed=2)
    assert ids.numel() > 200
    pool, psw = pooling_args(pooling, weights)
    check_against_reference(ids, weight, threshold, offsets, max_len=30, mode=mode, gk=1.3, pooling=pool,
                            per_sample_weights=psw)


@pytest.mark.parametrize("mode", ["dimension", "feature_dim"])
@pytest.mark.parametrize("padding_idx", [None, 2, -1])
@pytest.mark.parametrize("pooling", POOLINGS)
def test_input_forms(mode, padding_idx, pooling):
    """nn.EmbeddingBag's forms: 2-D input, 1-D input with bag starts or with include_last_offset,
    int32 ids and offsets; padding ids (also a bag of padding only, zeros in a mean)."""
    ids, offsets, weights, weight, threshold = make_bags(mode, num_rows=5, dim=17, seed=3)
    pool, psw = pooling_args(pooling, weights)
    kwargs = dict(mode=mode, pooling=pool, padding_idx=padding_idx)
    ids[offsets[2]:offsets[2] + 3] = 2  # bag 2: some padding ids...
    ids[offsets[3]:offsets[4]] = 4  # ...and bag 3 all of row 4 (padding_idx -1)
    check_against_reference(ids, weight, threshold, offsets, per_sample_weights=psw, **kwargs)
    last = torch.cat([offsets, torch.tensor([ids.numel()])])
    check_against_reference(ids, weight, threshold, last, per_sample_weights=psw, include_last_offset=True, **kwargs)
    check_against_reference(ids.int(), weight, threshold, offsets.int(), per_sample_weights=psw, **kwargs)
    square = ids[:12].reshape(4, 3)
    square_psw = None if psw is None else psw[:12].reshape(4, 3)
    check_against_reference(square, weight, threshold, None, per_sample_weights=square_psw, **kwargs)
    if padding_idx is not None:
        out = run("cpu", ids, weight, threshold, offsets, per_sample_weights=psw, **kwargs)[0]
        plain = run("cpu", ids, weight, threshold, offsets, per_sample_weights=psw, mode=mode, pooling=pool)[0]
        assert not torch.equal(out, plain)  # the padding ids were left out
        if padding_idx == -1:
            assert not out[3].any()


@pytest.mark.parametrize("mode", BAG_MODES)
def test_sparse_gradients_hold_the_rows_the_bags_reach(mode):
    ids, offsets, weights, weight, threshold = make_bags(mode, num_rows=9, dim=5, seed=4)
    _, gw, gs, _ = check_against_reference(ids, weight, threshold, offsets, mode=mode, pooling="mean", padding_idx=3,
                                           sparse=True)
    reached = torch.unique(ids[ids != 3])
    assert gw.is_sparse and gw.is_coalesced() and torch.equal(gw.indices()[0], reached)
    assert gs.is_sparse == (mode in PER_ROW_MODES)


@pytest.mark.parametrize("mode", ["global", "feature"])
@pytest.mark.parametrize("sparse", [False, True])
def test_empty_batches_and_empty_bags(mode, sparse):
    _, _, _, weight, threshold = make_bags(mode, num_rows=5, dim=3)
    no_ids = torch.zeros(0, dtype=torch.int64)
    for input, offsets, bags in ((no_ids, torch.zeros(0, dtype=torch.int64), 0),  # no bags
                                 (no_ids, torch.zeros(3, dtype=torch.int64), 3),  # three empty bags
                                 (torch.zeros(0, 4, dtype=torch.int64), None, 0),
                                 (torch.zeros(2, 0, dtype=torch.int64), None, 2)):
        for pooling in ("sum", "mean"):
            out, gw, gs, _ = run("cpu", input, weight, threshold, offsets, mode=mode, pooling=pooling, sparse=sparse)
            assert out.shape == (bags, 3) and not out.any()
            assert not dense(gw).any() and not dense(gs).any()


def test_gradients_are_bitwise_repeatable_on_any_thread_count():
    ids, offsets, weights, weight, threshold = make_bags("feature_dim", num_rows=4, dim=33, bags=400, max_len=40,
                                                         seed=5)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(run("cpu", ids, weight, threshold, offsets, per_sample_weights=weights))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_float64_and_strided_tables():
    ids, offsets, weights, weight, threshold = make_bags("feature_dim", num_rows=7, dim=6, dtype=torch.float64)
    got = run("cpu", ids, weight, threshold, offsets, per_sample_weights=weights)
    want = run("reference", ids, weight, threshold, offsets, per_sample_weights=weights)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    column_major = weight.t().contiguous().t(), threshold.t().contiguous().t()
    for g, w in zip(run("cpu", ids, *column_major, offsets, per_sample_weights=weights), got):
        assert torch.equal(g, w)


def test_gk_zero_is_nn_embedding_bag():
    ids, offsets, weights, weight, threshold = make_bags("feature", num_rows=8, dim=5)
    out = run("cpu", ids, weight, threshold, offsets, mode="feature", gk=0.0, per_sample_weights=weights)
    assert torch.equal(out[0], F.embedding_bag(ids, weight, offsets, mode="sum", per_sample_weights=weights))
    assert not out[2].any()


# ---------------------------------------------------------------- the Triton kernels (interpreter on CPU)


@pytest.mark.parametrize("tile_rows", [2, 256])
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize("mode", BAG_MODES)
def test_triton_matches_reference(monkeypatch, mode, pooling, sparse, tile_rows):
    """The pooled forward kernel and the sorted chunked backward (chunks of 2 lookups: a hot row's
    run crosses chunks), with an empty bag, padding ids and duplicates."""
    monkeypatch.setattr(soft_threshold_ops, "MAX_TILE_ROWS", tile_rows)
    ids, offsets, weights, weight, threshold = make_bags(mode, num_rows=6, dim=5)
    ids[:5] = 2
    pool, psw = pooling_args(pooling, weights)
    for padding_idx in (None, 3):
        check_against_reference(ids.to(DEVICE), weight.to(DEVICE), threshold.to(DEVICE), offsets.to(DEVICE),
                                backend="triton", mode=mode, gk=0.9, pooling=pool, sparse=sparse,
                                per_sample_weights=None if psw is None else psw.to(DEVICE), padding_idx=padding_idx)


@pytest.mark.parametrize("rule", [SGD(lr=0.1, weight_decay=1e-2), Adagrad(lr=0.1, rowwise=True, weight_decay=1e-2),
                                  Adam(lr=1e-2, weight_decay=1e-2, mode="fast"),
                                  Adam(lr=1e-2, weight_decay=1e-2, mode="faithful")], ids=repr)
@pytest.mark.parametrize("mode", ["feature_dim", "global"])
def test_triton_tables_train_like_cpu_tables(monkeypatch, rule, mode):
    """The fused steps of the Triton kernels against the C++ ones (the gradients' sums differ in
    order: a few ulps)."""
    monkeypatch.setattr(soft_threshold_ops, "MAX_TILE_ROWS", 4)
    tables = {}
    for backend in ("cpu", "triton"):
        torch.manual_seed(0)
        table = PEPEmbeddingBag(12, 3, mode="mean", padding_idx=2, threshold_mode=mode, threshold_init=-1.0,
                                backend=backend, optimizer=rule, device="cpu" if backend == "cpu" else DEVICE)
        shared = None if mode in PER_ROW_MODES else torch.optim.SGD([table.threshold], lr=0.1)
        gen = torch.Generator().manual_seed(1)
        for _ in range(5):
            ids = torch.randint(0, 6, (10,), generator=gen)
            ids[:4] = 1
            offsets, target = torch.tensor([0, 3, 3, 7]), torch.randn(4, 3, generator=gen)
            device = table.weight.device
            if shared is not None:
                shared.zero_grad(set_to_none=True)
            ((table(ids.to(device), offsets.to(device)) - target.to(device)) ** 2).sum().backward()
            if shared is not None:
                shared.step()
        table.sync()
        tables[backend] = table
    assert tables["triton"].optimizer_steps() == tables["cpu"].optimizer_steps() == 5
    for name in ("weight", "threshold"):
        torch.testing.assert_close(getattr(tables["triton"], name).cpu(), getattr(tables["cpu"], name), rtol=1e-5,
                                   atol=1e-6)


@pytest.mark.parametrize("mode", ["feature_dim", "global"])
def test_triton_per_sample_weight_gradients_under_fast_adam_read_caught_up_rows(mode):
    """`fast` Adam's Triton forward catches rows up in registers; the per-sample weights' gradient
    must read those rows too, not the stale ones in memory (rows fall behind every 4th step)."""
    grads = {}
    for backend in ("cpu", "triton"):
        torch.manual_seed(0)
        table = PEPEmbeddingBag(ROWS, 5, mode="sum", threshold_mode=mode, threshold_init=-4.0, backend=backend,
                                optimizer=Adam(lr=1e-2, weight_decay=1e-2, mode="fast"),
                                device="cpu" if backend == "cpu" else DEVICE)
        batches = [[t.to(table.weight.device) for t in batch] for batch in bag_batches(13, True)]
        for ids, offsets, weights, target in batches[:12]:
            loss_of(table(ids, offsets, weights), target).backward()
        ids, offsets, weights, target = batches[12]
        weights.requires_grad_(True)
        loss_of(table(ids, offsets, weights), target).backward()
        grads[backend] = weights.grad.cpu()
    # The same rows (C++ and Triton replay bitwise); the dot products of 5 terms differ in order.
    torch.testing.assert_close(grads["triton"], grads["cpu"], rtol=1e-5, atol=1e-6)


def test_triton_deferred_bad_offsets_and_ids_are_never_read():
    """The Triton kernels read nothing past a bad offset or id and record it; the error names it."""
    ids, _, _, weight, threshold = make_bags("feature_dim", num_rows=6, dim=3)
    ids = ids[:5].to(DEVICE)
    for offsets, message in (([0, 2, 9], r"got offsets\[2\] = 9"), ([0, 4, 2], r"got offsets\[2\] = 2")):
        with pytest.raises(ValueError, match="bag offsets must start at 0, be non-decreasing and end at the number "
                                             "of ids 5, " + message):
            soft_threshold_embedding_bag(ids, weight.to(DEVICE), threshold.to(DEVICE),
                                         torch.tensor(offsets, device=DEVICE), include_last_offset=True,
                                         backend="triton", bounds_check="deferred")
            functional_id_errors(torch.device(DEVICE)).wait()
    bad = ids.clone()
    bad[1] = 2**40
    with pytest.raises(IndexError, match=r"index 1099511627776 is out of range .*\(position 1 of"):
        soft_threshold_embedding_bag(bad, weight.to(DEVICE), threshold.to(DEVICE), torch.tensor([0, 2], device=DEVICE),
                                     backend="triton", bounds_check="deferred")
        functional_id_errors(torch.device(DEVICE)).wait()


# ---------------------------------------------------------------- the module


@pytest.mark.parametrize("pooling", POOLINGS)
def test_drop_in_for_nn_embedding_bag_when_nothing_is_pruned(pooling):
    pool, _ = pooling_args(pooling, None)
    # torch 2.13 rounds a weighted row before adding it when it has a padding_idx (the kernel, as its
    # path without one, adds it with a fused multiply-add): padding with plain sums and means here.
    padding_idx = None if pooling == "weighted" else 3
    torch.manual_seed(0)
    bag = PEPEmbeddingBag(20, 8, mode=pool, padding_idx=padding_idx, threshold_init=-150.0)  # sigmoid(-150) == 0
    plain = nn.EmbeddingBag(20, 8, mode=pool, padding_idx=padding_idx)
    assert padding_idx is None or not bag.weight[3].any()  # the padding row starts at zero, as nn.EmbeddingBag's
    plain.weight.data.copy_(bag.weight.data)
    x = torch.randint(0, 20, (6, 5))
    psw = torch.rand(6, 5) if pooling == "weighted" else None
    assert torch.equal(bag(x, per_sample_weights=psw), plain(x, per_sample_weights=psw))
    flat, offsets = x.reshape(-1), torch.tensor([0, 4, 4, 20])
    psw = None if psw is None else psw.reshape(-1)
    assert torch.equal(bag(flat, offsets, psw), plain(flat, offsets, psw))
    last = PEPEmbeddingBag(20, 8, mode=pool, include_last_offset=True, threshold_init=-150.0)
    last.load_state_dict(bag.state_dict())
    plain_last = nn.EmbeddingBag(20, 8, mode=pool, include_last_offset=True, _weight=plain.weight.data)
    ends = torch.tensor([0, 4, 4, 30])
    assert torch.equal(last(flat, ends, psw), plain_last(flat, ends, psw))


@pytest.mark.parametrize("mode", BAG_MODES)
def test_table_api(mode):
    torch.manual_seed(1)
    bag = PEPEmbeddingBag(12, 6, mode="sum", threshold_mode=mode, threshold_init=-1.0)
    with torch.no_grad():
        bag.weight.mul_(4.0)  # Xavier values are below sigmoid(-1): scale so that some survive
    table = reference.soft_threshold(bag.weight, bag.threshold, mode)
    assert torch.equal(bag.pruned_weight(), table)
    assert torch.equal(bag.mask(), table != 0) and bag.nnz() == int((table != 0).sum())
    assert 0 < bag.nnz() < 72 and bag.sparsity() == pytest.approx(1 - bag.nnz() / 72)
    assert torch.equal(bag.dims_per_row(), (table != 0).sum(1))
    x = torch.tensor([[2, 0, 3], [11, 11, 1]])
    torch.testing.assert_close(bag(x), table[x].sum(1), **bag_tol(3))
    assert dict(bag.named_parameters()).keys() == {"weight", "threshold"}
    assert f"12, 6, mode='sum', threshold_mode='{mode}'" in repr(bag)


@pytest.mark.parametrize("sparse", [False, True])
def test_trains_with_standard_optimizers(sparse):
    torch.manual_seed(0)
    bag = PEPEmbeddingBag(30, 4, mode="mean", threshold_init=-3.0, sparse=sparse)
    optimizer = (torch.optim.SparseAdam if sparse else torch.optim.Adam)(bag.parameters(), lr=0.05)
    x = torch.randint(0, 30, (16, 3))
    before = bag.nnz()
    for _ in range(20):
        optimizer.zero_grad()
        bag(x).pow(2).sum().backward()
        optimizer.step()
    assert bag.nnz() < before  # pulling the outputs to zero raises thresholds and shrinks weights


def test_reference_backend_module_agrees_with_cpu():
    torch.manual_seed(2)
    modules = {b: PEPEmbeddingBag(15, 5, mode="sum", padding_idx=0, threshold_init=-1.0, backend=b)
               for b in ("cpu", "reference")}
    modules["reference"].load_state_dict(modules["cpu"].state_dict())
    x = torch.randint(0, 15, (6, 4))
    torch.testing.assert_close(modules["cpu"](x), modules["reference"](x), **bag_tol(4))


def test_module_rejects_what_a_bag_cannot_do():
    with pytest.raises(ValueError, match="threshold mode 'field' does not apply to a bag"):
        PEPEmbeddingBag(10, 4, threshold_mode="field")
    with pytest.raises(ValueError, match=r"unknown mode 'max'; expected 'sum' or 'mean' \(max pooling"):
        PEPEmbeddingBag(10, 4, mode="max")
    with pytest.raises(ValueError, match=r"padding_idx must be within num_embeddings \(-10\.\.9\), got 10"):
        PEPEmbeddingBag(10, 4, padding_idx=10)
    assert PEPEmbeddingBag(10, 4, padding_idx=-1).padding_idx == 9
    ids, offsets, _, weight, threshold = make_bags("feature_dim", num_rows=6, dim=3)
    with pytest.raises(ValueError, match="backend 'reference' gives dense gradients"):
        soft_threshold_embedding_bag(ids, weight, threshold, offsets, sparse=True, backend="reference")
    with pytest.raises(ValueError, match="backend 'reference' gives dense gradients"):
        PEPEmbeddingBag(10, 4, sparse=True, backend="reference")


# ---------------------------------------------------------------- fused optimizers

ROWS = 30
CONFIGS = {"weighted sum": dict(pooling="sum", padding_idx=None),
           "mean with padding": dict(pooling="mean", padding_idx=2)}


def make_table(mode, optimizer=None, dim=5, pooling="sum", padding_idx=None, init=-4.0, seed=0):
    torch.manual_seed(seed)
    return PEPEmbeddingBag(ROWS, dim, mode=pooling, padding_idx=padding_idx, threshold_mode=mode,
                           threshold_init=init, optimizer=optimizer, backend="cpu")


def bag_batches(steps, weighted, bags=6, max_len=5, seed=1):
    """(ids, offsets, per-sample weights or None, target): duplicate-heavy bags, some empty, and
    every 4th step only a few rows (so that fast Adam has skipped steps to replay)."""
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        high = ROWS if step % 4 else ROWS // 5
        lengths = torch.randint(0, max_len + 1, (bags,), generator=gen)
        ids = torch.randint(0, high, (int(lengths.sum()),), generator=gen)
        weights = torch.rand(ids.shape, generator=gen) if weighted else None
        yield ids, torch.cumsum(lengths, 0) - lengths, weights, torch.randn(bags, generator=gen)


def loss_of(out, target):
    # A BCE-like loss through a per-dim weighting, so every output entry gets its own gradient.
    return F.softplus(-(out.sum(-1) * target)).sum() + 0.1 * (out**2).sum()


def train(table, steps, shared_optimizer=None):
    for ids, offsets, weights, target in bag_batches(steps, table.mode == "sum"):
        if shared_optimizer is not None:
            shared_optimizer.zero_grad(set_to_none=True)
        loss_of(table(ids, offsets, weights), target).backward()
        if shared_optimizer is not None:
            shared_optimizer.step()
    return table


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("rule", [SGD(lr=0.1, weight_decay=0.01), Adagrad(lr=0.1, weight_decay=0.01),
                                  Adagrad(lr=0.1, eps=1e-6, weight_decay=0.01, rowwise=True)], ids=repr)
@pytest.mark.parametrize("mode", BAG_MODES)
@pytest.mark.parametrize("dim", [1, 3, 33])
def test_sgd_and_adagrad_update_the_rows_the_bags_reach(dim, mode, rule, config):
    """Against reference.row_optimizer_step on the reference's gradients of the rows the bags
    reach (padding ids reach none); shared thresholds take a plain SGD step on both sides."""
    fused = make_table(mode, rule, dim, **CONFIGS[config])
    padding = fused.padding_idx
    weight, threshold = fused.weight.detach().clone(), fused.threshold.detach().clone()
    states = {name: {k: torch.zeros(shape, dtype=p.dtype) for k, shape in rule.state_shapes(p).items()}
              for name, p in (("weight", weight), ("threshold", threshold))}
    for ids, offsets, weights, target in bag_batches(8, fused.mode == "sum"):
        w, s = weight.clone().requires_grad_(True), threshold.clone().requires_grad_(True)
        out = reference.soft_threshold_embedding_bag(ids, w, s, offsets, mode, fused.gk, fused.mode, weights,
                                                     padding_idx=padding)
        loss_of(out, target).backward()
        reached = torch.unique(ids if padding is None else ids[ids != padding])
        reference.row_optimizer_step(rule, weight, states["weight"], reached, w.grad[reached])
        if mode in PER_ROW_MODES:
            reference.row_optimizer_step(rule, threshold, states["threshold"], reached, s.grad[reached])
        else:
            threshold -= 0.1 * s.grad
        fused.threshold.grad = None
        loss_of(fused(ids, offsets, weights), target).backward()
        if mode not in PER_ROW_MODES:
            with torch.no_grad():
                fused.threshold -= 0.1 * fused.threshold.grad
    assert fused.weight.grad is None and int(fused.optimizer_step) == 8
    torch.testing.assert_close(fused.weight.detach(), weight, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fused.threshold.detach(), threshold, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("mode", BAG_MODES)
@pytest.mark.parametrize("dim", [1, 17, 33])
def test_faithful_adam_matches_torch_adam_for_100_steps(dim, mode, config):
    lr, wd = 1e-3, 1e-5
    eager = make_table(mode, None, dim, **CONFIGS[config])
    torch_adam = torch.optim.Adam(eager.parameters(), lr=lr, weight_decay=wd)
    fused = make_table(mode, Adam(lr=lr, weight_decay=wd, mode="faithful"), dim, **CONFIGS[config])
    shared = None if mode in PER_ROW_MODES else torch.optim.Adam([fused.threshold], lr=lr, weight_decay=wd)
    for ids, offsets, weights, target in bag_batches(100, fused.mode == "sum"):
        torch_adam.zero_grad(set_to_none=True)
        out = reference.soft_threshold_embedding_bag(ids, eager.weight, eager.threshold, offsets, mode, eager.gk,
                                                     eager.mode, weights, padding_idx=eager.padding_idx)
        loss_of(out, target).backward()
        torch_adam.step()
        if shared is not None:
            shared.zero_grad(set_to_none=True)
        loss_of(fused(ids, offsets, weights), target).backward()
        if shared is not None:
            shared.step()
        assert fused.weight.grad is None
    # As for PEPEmbedding (tests/test_optim.py): the same element rule as torch's Adam on gradients
    # that differ by a few ulps (summation order), which Adam normalises: a few ulps of the O(1e-1)
    # values after 100 steps of lr 1e-3.
    torch.testing.assert_close(fused.weight, eager.weight, rtol=1e-5, atol=2e-7)
    torch.testing.assert_close(fused.threshold, eager.threshold, rtol=1e-5, atol=2e-7)
    assert fused.nnz() == eager.nnz()


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("mode", BAG_MODES)
@pytest.mark.parametrize("dim", [1, 17, 24])
def test_fast_adam_equals_faithful_bitwise(dim, mode, config):
    """Before step 64 skipped steps are replayed exactly: the same numbers as `faithful`."""
    lr, wd = 1e-2, 1e-2  # a large decay: skipped steps move the rows visibly
    tables = {}
    for adam_mode in ("faithful", "fast"):
        table = make_table(mode, Adam(lr=lr, weight_decay=wd, mode=adam_mode), dim, **CONFIGS[config])
        shared = None if mode in PER_ROW_MODES else torch.optim.Adam([table.threshold], lr=lr, weight_decay=wd)
        tables[adam_mode] = train(table, 60, shared)
    faithful, fast = tables["faithful"], tables["fast"]
    stale = fast.weight.detach().clone()
    fast.sync()
    assert not torch.equal(stale, fast.weight), "no row was behind: the test would not see a missing replay"
    assert torch.equal(fast.weight, faithful.weight)
    assert torch.equal(fast.threshold, faithful.threshold)
    assert torch.equal(fast.weight_exp_avg_sq, faithful.weight_exp_avg_sq)
    assert fast.nnz() == faithful.nnz()


@pytest.mark.parametrize("rule", [Adam(lr=1e-2, mode="fast"), Adagrad(lr=0.1, rowwise=True)], ids=repr)
def test_per_sample_weights_get_their_gradient_under_a_fused_optimizer(rule):
    """From the rows before the step moves them: the gradient the unfused table gives."""
    fused = make_table("feature_dim", rule)
    plain = make_table("feature_dim")
    ids, offsets, weights, target = next(bag_batches(1, True))
    grads = []
    for table in (fused, plain):
        p = weights.clone().requires_grad_(True)
        loss_of(table(ids, offsets, p), target).backward()
        grads.append(p.grad)
    assert torch.equal(grads[0], grads[1])
    assert not torch.equal(fused.weight, plain.weight)  # and the fused table stepped


def test_fused_table_state_round_trip_and_refusals():
    table = train(make_table("feature_dim", Adam(lr=1e-2, weight_decay=1e-2, mode="fast")), 10)
    state = table.state_dict()
    assert {"weight_exp_avg", "weight_last_step", "threshold_exp_avg_sq", "optimizer_step"} <= set(state)
    assert bool((state["weight_last_step"] == 10).all())  # saved tables are current
    clone = make_table("feature_dim", Adam(lr=1e-2, weight_decay=1e-2, mode="fast"), seed=5)
    clone.load_state_dict(state)
    train(clone, 5), train(table, 5)
    table.sync(), clone.sync()
    assert torch.equal(table.weight, clone.weight)
    ids = torch.zeros(2, 3, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="look it up once per backward"):
        (table(ids).sum() + table(ids).sum()).backward()
    # Bad input takes no step (the catch-up of the ids before the forward may have run: sync both).
    steps, before = table.optimizer_steps(), table.pruned_weight()
    with pytest.raises(IndexError, match="30"):
        table(torch.tensor([[0, 30]]))
    with pytest.raises(ValueError, match="non-decreasing"):
        table(torch.tensor([0, 1, 2]), torch.tensor([0, 2, 1]))
    assert table.optimizer_steps() == steps and torch.equal(table.pruned_weight(), before)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("offsets, include_last_offset, error, message", [
    ([1, 2], False, ValueError, r"bag offsets must start at 0, got offsets\[0\] = 1"),
    ([0, 3, 2], False, ValueError, r"non-decreasing, got offsets\[2\] = 2 after offsets\[1\] = 3"),
    ([0, 6, 2], False, ValueError, r"at most the number of ids 5, got offsets\[1\] = 6"),
    ([0, -1], False, ValueError, r"non-decreasing, got offsets\[1\] = -1 after offsets\[0\] = 0"),
    ([0, 2, 4], True, ValueError, r"the last bag offset must be the number of ids 5, got offsets\[2\] = 4"),
    ([0, 2, 6], True, ValueError, r"at most the number of ids 5, got offsets\[2\] = 6"),
    ([], True, ValueError, r"include_last_offset=True needs B \+ 1 offsets"),
    ([[0, 2]], False, ValueError, r"offsets must be 1-D, got shape \(1, 2\)"),
    ([0.0, 2.0], False, TypeError, "offsets must be int32 or int64, got torch.float32"),
])
def test_bad_offsets(backend, offsets, include_last_offset, error, message):
    ids, _, _, weight, threshold = make_bags("feature_dim", num_rows=6, dim=3)
    ids = ids[:5]
    offsets = torch.tensor(offsets, dtype=torch.float32 if error is TypeError else torch.int64)
    with pytest.raises(error, match=message):
        soft_threshold_embedding_bag(ids, weight, threshold, offsets, include_last_offset=include_last_offset,
                                     backend=backend)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("bad", [-1, 7, 2**40])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_out_of_range_ids_raise_index_error(backend, bad, index_dtype):
    bad = min(bad, 2**31 - 1) if index_dtype == torch.int32 else bad
    ids, offsets, _, weight, threshold = make_bags("feature", num_rows=7, dim=3, index_dtype=index_dtype)
    ids[3] = bad
    with pytest.raises(IndexError, match=rf"index {bad} is out of range .*valid ids are 0\.\.6"):
        soft_threshold_embedding_bag(ids, weight, threshold, offsets, mode="feature", backend=backend)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_other_bad_arguments(backend):
    ids, offsets, weights, weight, threshold = make_bags("feature_dim", num_rows=6, dim=3)
    bag = lambda **kwargs: soft_threshold_embedding_bag(  # noqa: E731
        kwargs.pop("input", ids), weight, kwargs.pop("threshold", threshold), kwargs.pop("offsets", offsets),
        backend=backend, **kwargs)
    with pytest.raises(ValueError, match="per_sample_weights need pooling 'sum', got 'mean'"):
        bag(pooling="mean", per_sample_weights=weights)
    with pytest.raises(ValueError, match=r"per_sample_weights must have the shape of input \(\d+,\), got \(3,\)"):
        bag(pooling="sum", per_sample_weights=weights[:3])
    with pytest.raises(ValueError, match="unknown pooling 'max'"):
        bag(pooling="max")
    with pytest.raises(ValueError, match="threshold mode 'field_dim' does not apply to a bag"):
        bag(mode="field_dim")
    with pytest.raises(ValueError, match=r"padding_idx must be within num_embeddings \(-6\.\.5\), got -7"):
        bag(padding_idx=-7)
    with pytest.raises(ValueError, match="offsets must be None when input is 2-D"):
        bag(input=ids[:4].reshape(2, 2))
    with pytest.raises(ValueError, match="1-D input needs offsets"):
        bag(offsets=None)
    with pytest.raises(ValueError, match=r"input must be 1-D \(with offsets\) or 2-D"):
        bag(input=ids[:8].reshape(2, 2, 2), offsets=None)
    with pytest.raises(TypeError, match="indices must be int32 or int64, got torch.float32"):
        bag(input=ids.float())
    with pytest.raises(ValueError, match=r"mode 'feature_dim' must have shape \(6, 3\)"):
        bag(threshold=threshold[:, :1])


def test_op_errors_name_the_problem():
    ids, offsets, weights, weight, threshold = make_bags("feature_dim", num_rows=6, dim=3)
    ends = torch.cat([offsets, torch.tensor([ids.numel()])])
    args = (weight, threshold, "feature_dim", 1.0)
    with pytest.raises(TypeError, match="bag offsets must be int64, got Int"):
        ops.soft_threshold_bag_forward(ids, ends.int(), None, *args, "sum", -1, None)
    with pytest.raises(ValueError, match=r"bag offsets must be a 1-D CPU tensor of B \+ 1 offsets, got shape \[0\]"):
        ops.soft_threshold_bag_forward(ids, ends[:0], None, *args, "sum", -1, None)
    with pytest.raises(ValueError, match=rf"the last bag offset must be the number of ids {ids.numel()}"):
        ops.soft_threshold_bag_forward(ids, ends[:-1], None, *args, "sum", -1, None)
    with pytest.raises(ValueError, match=r"padding_idx must be -1 \(none\) or a row of the table \(0\.\.5\), got 6"):
        ops.soft_threshold_bag_forward(ids, ends, None, *args, "sum", 6, None)
    with pytest.raises(TypeError, match="per_sample_weights dtype Double must match weight dtype Float"):
        ops.soft_threshold_bag_forward(ids, ends, weights.double(), *args, "sum", -1, None)
    with pytest.raises(ValueError, match=r"per_sample_weights must be a 1-D CPU tensor of one weight per id"):
        ops.soft_threshold_bag_forward(ids, ends, weights[1:], *args, "sum", -1, None)
    with pytest.raises(ValueError, match="unknown pooling 'max'; expected sum or mean"):
        ops.soft_threshold_bag_forward(ids, ends, None, *args, "max", -1, None)
    with pytest.raises(ValueError, match="threshold mode 'field' does not apply to a bag"):
        ops.soft_threshold_bag_forward(ids, ends, None, weight, threshold, "field", 1.0, "sum", -1, None)
    bad = ids.clone()
    bad[2] = 6
    with pytest.raises(IndexError, match=r"index 6 is out of range for a table of 6 rows \(valid ids are 0\.\.5\)"):
        ops.soft_threshold_bag_backward(torch.ones(7, 3), bad, ends, None, *args, "sum", -1, False)
    with pytest.raises(ValueError, match=r"grad_out must have shape \(7, 3\) \(one row per bag\), got \[6, 3\]"):
        ops.soft_threshold_bag_backward(torch.ones(6, 3), ids, ends, None, *args, "sum", -1, False)
    rule = Adam(mode="fast")
    state = [weight.clone(), torch.zeros(6, 3), torch.zeros(6, 3), torch.zeros(6, dtype=torch.int64)]
    schedule = rule.schedule(4, torch.float32, "cpu")
    step_op = ops.soft_threshold_bag_backward_step
    with pytest.raises(ValueError, match="step must be a 0-d int64 tensor on the table's device"):
        step_op(torch.ones(7, 3), ids, ends, None, state, state, schedule, torch.tensor([0]), "feature_dim", 1.0,
                "sum", -1, "adam", rule.hparams(), None)
    with pytest.raises(ValueError, match="unknown row optimizer 'adamw'"):
        step_op(torch.ones(7, 3), ids, ends, None, state, state, schedule, torch.tensor(0), "feature_dim", 1.0,
                "sum", -1, "adamw", rule.hparams(), None)
    with pytest.raises(ValueError, match="schedule"):  # step 5 is past the schedule's 4: nothing moves
        step_op(torch.ones(7, 3), ids, ends, None, state, state, schedule, torch.tensor(4), "feature_dim", 1.0,
                "sum", -1, "adam_dense", rule.hparams(), None)
    assert torch.equal(state[0], weight)


# ---------------------------------------------------------------- registration


def test_opcheck_bag_ops():
    ids, offsets, weights, weight, threshold = make_bags("feature_dim", num_rows=6, dim=5)
    ends = torch.cat([offsets, torch.tensor([ids.numel()])])
    grad = torch.randn(offsets.numel(), 5)
    record = torch.full((5,), -1, dtype=torch.int64)
    for mode, thresholds in (("feature_dim", threshold), ("dimension", threshold[0].clone())):
        for psw, pooling, padding in ((None, "mean", 2), (weights, "sum", -1)):
            torch.library.opcheck(ops.soft_threshold_bag_forward.default,
                                  (ids, ends, psw, weight, thresholds, mode, 0.9, pooling, padding, record))
            for sparse in (False, True):
                torch.library.opcheck(ops.soft_threshold_bag_backward.default,
                                      (grad, ids, ends, psw, weight, thresholds, mode, 0.9, pooling, padding, sparse))
    rule = Adagrad(lr=0.1, rowwise=True)

    def state(p):
        return [p.clone(), torch.zeros(p.shape[0]), torch.empty(0), torch.empty(0, dtype=torch.int64)]

    torch.library.opcheck(ops.soft_threshold_bag_backward_step.default,
                          (grad, ids, ends, weights, state(weight), state(threshold), torch.empty(0),
                           torch.tensor(3), "feature_dim", 0.9, "sum", -1, rule.kind, rule.hparams(), record))


@pytest.mark.compile
def test_compile_fullgraph():
    ids, offsets, weights, weight, threshold = make_bags("feature", num_rows=9, dim=6)

    def loss(w, s, p):
        out = soft_threshold_embedding_bag(ids, w, s, offsets, mode="feature", gk=0.8, pooling="sum",
                                           per_sample_weights=p, padding_idx=1)
        return out, (out * out).sum()

    torch._dynamo.reset()
    results = []
    for fn in (loss, torch.compile(loss, fullgraph=True)):
        w, s, p = leaves(weight, threshold, weights)
        out, value = fn(w, s, p)
        results.append((out, torch.autograd.grad(value, (w, s, p))))
    (eager_out, eager_grads), (comp_out, comp_grads) = results
    assert torch.equal(comp_out, eager_out)
    torch.testing.assert_close(comp_grads, eager_grads, **GRAD_TOL)


# ---------------------------------------------------------------- serving


@pytest.mark.parametrize("mode", ["global", "feature_dim"])
def test_trained_bag_served_from_a_store(mode):
    """A trained PEPEmbeddingBag, exported and served by PrunedEmbeddingBag. The store holds the
    pruned table (pruned_weight: torch's sigmoid) and sums each bag in id order as torch and the
    kernel do: a plain sum is F.embedding_bag of the pruned table bit for bit, and the module's too
    in global mode (its one gate is torch's); per-entry gates may differ by an ulp, and the store
    rounds means (times 1 / count) and weighted rows (no FMA) its own way: bag_tol."""
    table = make_table(mode, Adam(lr=1e-2, weight_decay=1e-2, mode="fast"), dim=8, pooling="sum", padding_idx=2,
                       init=-2.0)
    train(table, 30, None if mode in PER_ROW_MODES else torch.optim.Adam([table.threshold], lr=1e-2))
    store = SparseRowStore.from_module(table)
    assert 0 < store.nnz < ROWS * 8 and store.nnz == table.nnz()
    ids, offsets, weights, _ = next(bag_batches(1, True, bags=12, seed=9))
    ids[:3] = 2
    last = torch.cat([offsets, torch.tensor([ids.numel()])])
    for pooling, psw in (("sum", None), ("sum", weights), ("mean", None)):
        served = PrunedEmbeddingBag(store, mode=pooling, padding_idx=2)
        served_last = PrunedEmbeddingBag(store, mode=pooling, padding_idx=2, include_last_offset=True)
        assert not list(served.parameters()) and served.nnz() == store.nnz
        table.mode = pooling
        with torch.no_grad():
            expected = table(ids, offsets, psw)
            got = served(ids, offsets, psw)
            pooled = F.embedding_bag(ids, table.pruned_weight(), offsets, mode=pooling, per_sample_weights=psw,
                                     padding_idx=2)
        assert torch.equal(served_last(ids, last, psw), got)
        if pooling == "sum" and psw is None:
            assert torch.equal(got, pooled)
            if mode == "global":
                assert torch.equal(got, expected)
        torch.testing.assert_close(got, pooled, **bag_tol(5))
        torch.testing.assert_close(got, expected, **bag_tol(5))
    with pytest.raises(ValueError, match="the last bag offset must be the number of ids"):
        served_last(ids, last[:-1])
    with pytest.raises(IndexError, match=rf"index {ROWS} is out of range"):
        served(torch.tensor([0, ROWS]), torch.tensor([0]))


@pytest.mark.gpu
def test_served_bags_on_cuda_match_the_cpu():
    """PrunedEmbeddingBag's own steps (offset checks, dropping padding ids) on CUDA tensors, over the
    CUDA store kernel: the CPU store's bags (the kernels add in another order: a few ulps)."""
    gen = torch.Generator().manual_seed(8)
    table = torch.where(torch.rand(50, 24, generator=gen) < 0.4, torch.randn(50, 24, generator=gen), 0.0)
    store = SparseRowStore.from_dense(table)
    ids, offsets = torch.randint(0, 50, (60,), generator=gen), torch.tensor([0, 7, 7, 30])
    ids[:5] = 3
    weights = torch.rand(60, generator=gen)
    for pooling, psw in (("sum", weights), ("mean", None)):
        cpu = PrunedEmbeddingBag(store, mode=pooling, padding_idx=3)
        gpu = PrunedEmbeddingBag(SparseRowStore.from_dense(table), mode=pooling, padding_idx=3).to("cuda")
        got = gpu(ids.cuda(), offsets.cuda(), None if psw is None else psw.cuda())
        torch.testing.assert_close(got.cpu(), cpu(ids, offsets, psw), **bag_tol(30))
    with pytest.raises(ValueError, match=r"non-decreasing, got offsets\[2\] = 5"):
        gpu(ids.cuda(), torch.tensor([0, 7, 5], device="cuda"))
