"""Fused row-sparse optimizers (pep_kernels.optim) on the C++ backend, against eager oracles:
torch.optim.Adam for Adam (the published recipe), reference.row_optimizer_step for SGD and
Adagrad; `fast` Adam against `faithful`: bitwise over gaps of up to 4 skipped steps (and before step 64),
within the closed-form catch-up's error beyond."""

import pytest
import torch

from pep_kernels import PEPEmbedding, reference
from pep_kernels.optim import SGD, Adagrad, Adam

from utils import MODES, PER_ROW_MODES, train_with_row_oracle

FIELDS = 3
ops = torch.ops.pep_kernels


def make_table(mode, rows, dim, optimizer=None, init=-4.0, seed=0):
    torch.manual_seed(seed)
    field_dims = [rows // FIELDS] * (FIELDS - 1) + [rows - (FIELDS - 1) * (rows // FIELDS)]
    return PEPEmbedding(rows, dim, threshold_mode=mode, threshold_init=init, field_dims=field_dims,
                        optimizer=optimizer, backend="cpu")


def batches(rows, steps, batch=6, seed=1):
    """Per-field local ids with many duplicates, and steps in which only a few rows appear (so
    that fast Adam has skipped steps to replay)."""
    gen = torch.Generator().manual_seed(seed)
    per_field = rows // FIELDS
    for step in range(steps):
        high = per_field if step % 4 else max(1, per_field // 5)
        yield torch.randint(0, high, (batch, FIELDS), generator=gen), torch.randn(batch, FIELDS, generator=gen)


def loss_of(out, target):
    # A BCE-like loss through a per-dim weighting, so every output entry gets its own gradient.
    return torch.nn.functional.softplus(-(out.sum(-1) * target)).sum() + 0.1 * (out**2).sum()


def train(table, steps, rows, shared_optimizer=None):
    for ids, target in batches(rows, steps):
        if shared_optimizer is not None:
            shared_optimizer.zero_grad(set_to_none=True)
        loss_of(table(ids), target).backward()
        if shared_optimizer is not None:
            shared_optimizer.step()
    return table


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dim", [1, 3, 17, 33])
def test_faithful_adam_matches_torch_adam_for_100_steps(mode, dim):
    rows, lr, wd = 30, 1e-3, 1e-5
    eager = make_table(mode, rows, dim)
    torch_adam = torch.optim.Adam(eager.parameters(), lr=lr, weight_decay=wd)
    fused = make_table(mode, rows, dim, Adam(lr=lr, weight_decay=wd, mode="faithful"))
    shared = None if mode in PER_ROW_MODES else torch.optim.Adam([fused.threshold], lr=lr, weight_decay=wd)
    field_dims = eager.field_dims.tolist()
    for ids, target in batches(rows, 100):
        torch_adam.zero_grad(set_to_none=True)
        global_ids = ids + torch.tensor([0] + field_dims[:-1]).cumsum(0)
        out = reference.soft_threshold_embedding(global_ids, eager.weight, eager.threshold, mode)
        loss_of(out, target).backward()
        torch_adam.step()
        if shared is not None:
            shared.zero_grad(set_to_none=True)
        loss_of(fused(ids), target).backward()
        if shared is not None:
            shared.step()
        assert fused.weight.grad is None
    # Same element rule as torch's Adam; the soft-threshold gradients differ from the
    # reference's by a few ulps (summation order), and Adam normalises them: a few ulps of the
    # O(1e-1) values after 100 steps of lr 1e-3.
    torch.testing.assert_close(fused.weight, eager.weight, rtol=1e-5, atol=2e-7)
    torch.testing.assert_close(fused.threshold, eager.threshold, rtol=1e-5, atol=2e-7)
    assert fused.nnz() == eager.nnz()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dim", [1, 17, 24])
def test_fast_adam_equals_faithful_bitwise(mode, dim):
    """Before step 64 skipped steps are replayed exactly: the same numbers as `faithful`."""
    rows, lr, wd = 45, 1e-2, 1e-2  # a large decay: skipped steps move the rows visibly
    tables = {}
    for adam_mode in ("faithful", "fast"):
        table = make_table(mode, rows, dim, Adam(lr=lr, weight_decay=wd, mode=adam_mode))
        shared = None if mode in PER_ROW_MODES else torch.optim.Adam([table.threshold], lr=lr, weight_decay=wd)
        tables[adam_mode] = train(table, 60, rows, shared)
    faithful, fast = tables["faithful"], tables["fast"]
    stale = fast.weight.detach().clone()
    fast.sync()
    assert not torch.equal(stale, fast.weight), "no row was behind: the test would not see a missing replay"
    assert torch.equal(fast.weight, faithful.weight)
    assert torch.equal(fast.threshold, faithful.threshold)
    assert torch.equal(fast.weight_exp_avg_sq, faithful.weight_exp_avg_sq)
    assert fast.nnz() == faithful.nnz()


@pytest.mark.parametrize("mode", ["feature", "feature_dim"])
def test_fast_adam_long_gaps_through_the_fused_backward(mode):
    """Rows looked up at step 1 and again at step 120 (a gap of 118 steps: exact steps up to step
    63, then a segment) through the module's fused backward, then the whole table synced: close to
    `faithful`, with the same non-zeros (the segments' error is far below the pruning margin)."""
    rows, dim, lr, wd = 30, 8, 1e-3, 1e-5
    gen = torch.Generator().manual_seed(4)
    hot = torch.randint(0, 3, (120, 4, FIELDS), generator=gen)  # rows 0..2 of each field every step
    hot[0, :, 0] = 7  # field 0 row 7 only at steps 1 and 120
    hot[119, :, 0] = 7
    tables = {}
    for adam_mode in ("faithful", "fast"):
        table = make_table(mode, rows, dim, Adam(lr=lr, weight_decay=wd, mode=adam_mode))
        for ids in hot:
            loss_of(table(ids), torch.ones(ids.shape)).backward()
        table.sync()
        tables[adam_mode] = table
    faithful, fast = (tables[m].requires_grad_(False) for m in ("faithful", "fast"))
    start = make_table(mode, rows, dim).requires_grad_(False)
    move = (faithful.weight - start.weight).abs()
    threshold_move = (faithful.threshold - start.threshold).abs()
    assert float(move[7].min()) > 0
    # Measured: weights within 2% of their median move, thresholds within 0.2% of theirs (the
    # rows never looked up start their gap at step 0, where the bias correction changes fastest).
    assert float((fast.weight - faithful.weight).abs().max()) <= 0.1 * float(move.median())
    assert float((fast.threshold - faithful.threshold).abs().max()) <= 0.01 * float(threshold_move.median())
    assert not torch.equal(fast.weight, faithful.weight)  # the segments ran
    assert fast.nnz() == faithful.nnz()


def test_fast_adam_catches_rows_up_before_reading_them():
    """A row looked up after many skipped steps is replayed before the forward reads it."""
    rows, dim = 12, 5
    fast = make_table("feature_dim", rows, dim, Adam(lr=1e-2, weight_decay=1e-1, mode="fast"))
    faithful = make_table("feature_dim", rows, dim, Adam(lr=1e-2, weight_decay=1e-1, mode="faithful"))
    for _ in range(30):
        for table in (fast, faithful):
            table(torch.zeros(2, FIELDS, dtype=torch.long)).sum().backward()
    probe = torch.tensor([[3, 3, 3]])
    assert torch.equal(fast(probe), faithful(probe))
    assert int(fast.weight_last_step[3 + rows // FIELDS]) == 30  # the probe's rows are current now


@pytest.mark.parametrize("rule", [SGD(lr=0.1, weight_decay=0.01), Adagrad(lr=0.1, weight_decay=0.01),
                                  Adagrad(lr=0.1, eps=1e-6, weight_decay=0.01, rowwise=True)], ids=repr)
@pytest.mark.parametrize("mode", ["feature_dim", "feature", "dimension", "field"])
@pytest.mark.parametrize("dim", [1, 3, 33])
def test_sgd_and_adagrad_update_only_looked_up_rows(rule, mode, dim):
    rows = 30
    fused = make_table(mode, rows, dim, rule)
    eager = make_table(mode, rows, dim)
    weight, threshold = train_with_row_oracle(fused, eager, rule, batches(rows, 8), loss_of)
    torch.testing.assert_close(fused.weight.detach(), weight, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fused.threshold.detach(), threshold, rtol=1e-6, atol=1e-6)


def test_empty_batch_is_a_step_that_touches_no_row():
    table = make_table("feature_dim", 9, 4, Adam(lr=1e-2, weight_decay=0.1, mode="fast"))
    before = table.weight.detach().clone()
    table(torch.zeros(0, FIELDS, dtype=torch.long)).sum().backward()
    assert int(table.optimizer_step) == 1 and torch.equal(table.weight, before)
    table.sync()  # the decay of that step reaches every row
    assert not torch.equal(table.weight, before)


@pytest.mark.parametrize("mode", MODES)
def test_nnz_kernel_matches_reference_count(mode):
    table = make_table(mode, 31, 7, init=0.0)
    with torch.no_grad():
        table.weight.copy_(torch.randn(table.weight.shape))
        table.threshold.add_(torch.randn(table.threshold.shape))
    expected = int(torch.count_nonzero(table.pruned_weight()))
    assert 0 < table.nnz() == expected < table.weight.numel()


def test_state_dict_round_trip_syncs_and_restores_the_optimizer():
    rows = 24
    table = train(make_table("feature_dim", rows, 5, Adam(lr=1e-2, weight_decay=1e-2, mode="fast")), 10, rows)
    state = table.state_dict()
    assert {"weight_exp_avg", "weight_exp_avg_sq", "weight_last_step", "threshold_exp_avg", "optimizer_step"} <= set(state)
    assert bool((state["weight_last_step"] == 10).all())  # saved tables are current
    clone = make_table("feature_dim", rows, 5, Adam(lr=1e-2, weight_decay=1e-2, mode="fast"), seed=5)
    clone.load_state_dict(state)
    train(clone, 5, rows)
    train(table, 5, rows)
    table.sync(), clone.sync()
    assert torch.equal(table.weight, clone.weight)


def test_bad_optimizer_arguments():
    with pytest.raises(TypeError, match="pep_kernels.optim rule"):
        PEPEmbedding(10, 4, optimizer=torch.optim.Adam)
    with pytest.raises(ValueError, match="reference"):
        PEPEmbedding(10, 4, optimizer=SGD(lr=0.1), backend="reference")
    with pytest.raises(ValueError, match="lr must be a finite number"):
        Adam(lr=float("nan"))
    with pytest.raises(ValueError, match="betas"):
        Adam(betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="unknown Adam mode 'lazy'"):
        Adam(mode="lazy")


def test_bad_ids_raise_before_any_row_moves():
    table = make_table("feature_dim", 9, 4, Adam(lr=1e-2, mode="fast"))
    before = table.weight.detach().clone()
    with pytest.raises(IndexError, match="5"):
        table(torch.tensor([[0, 0, 5]]))
    assert torch.equal(table.weight, before)


def test_two_lookups_in_one_step_are_refused():
    table = make_table("feature_dim", 9, 4, Adam(lr=1e-2, mode="faithful"))
    ids = torch.zeros(2, FIELDS, dtype=torch.long)
    with pytest.raises(RuntimeError, match="look it up once per backward"):
        (table(ids).sum() + table(ids).sum()).backward()


def _state(param, rule):
    tensors = [param] + [torch.zeros(s, dtype=torch.int64 if k == "last_step" else param.dtype)
                         for k, s in rule.state_shapes(param).items()]
    return tensors + [torch.empty(0)] * (4 - len(tensors))


def test_op_errors_name_the_problem():
    op = torch.ops.pep_kernels.row_optimizer_step
    rule = Adam(mode="fast")
    param = torch.zeros(6, 3)
    sched = rule.schedule(4, torch.float32, "cpu")
    grads = torch.ones(2, 3)
    with pytest.raises(ValueError, match="sorted and distinct"):
        op(_state(param, rule), torch.tensor([2, 2]), grads, sched, "adam", rule.hparams(), 1)
    with pytest.raises(IndexError, match="row 6 is out of range"):
        op(_state(param, rule), torch.tensor([1, 6]), grads, sched, "adam", rule.hparams(), 1)
    with pytest.raises(ValueError, match="schedule"):
        op(_state(param, rule), torch.tensor([1, 2]), grads, sched, "adam", rule.hparams(), 7)
    with pytest.raises(ValueError, match="unknown row optimizer 'adamw'"):
        op(_state(param, rule), torch.tensor([1, 2]), grads, sched, "adamw", rule.hparams(), 1)
    with pytest.raises(ValueError, match="exp_avg_sq must have shape"):
        bad = _state(param, rule)
        bad[2] = torch.zeros(5, 3)
        op(bad, torch.tensor([1, 2]), grads, sched, "adam", rule.hparams(), 1)
    with pytest.raises(ValueError, match="grads must have shape"):
        op(_state(param, rule), torch.tensor([1, 2]), torch.ones(3, 3), sched, "adam", rule.hparams(), 1)
    with pytest.raises(TypeError, match="float32 or float64"):
        op(_state(param.half(), rule), torch.tensor([1, 2]), grads, sched, "adam", rule.hparams(), 1)


def test_fused_step_op_errors_name_the_problem_and_move_nothing():
    """The lookup's train forward and fused step check `step` and both states before any row moves
    (the checks the bag ops share)."""
    ops = torch.ops.pep_kernels
    rule = Adam(mode="faithful")
    weight, rows = torch.randn(6, 3), torch.tensor([1, 4, 1], dtype=torch.int32)
    weight_state = _state(weight.clone(), rule)
    sched = rule.schedule(4, torch.float32, "cpu")
    args = ("feature_dim", 1.0)
    with pytest.raises(ValueError, match="step must be a 0-d int64 tensor on the table's device"):
        ops.soft_threshold_train_forward(rows.long(), weight_state, _state(torch.zeros(6, 3), rule), sched,
                                         torch.tensor(0.0), *args, None, "adam", rule.hparams(), None)
    with pytest.raises(ValueError, match="step must be a 0-d int64 tensor on the table's device"):
        ops.soft_threshold_backward_step(torch.ones(3, 3), rows, weight_state, _state(torch.zeros(6, 3), rule),
                                         sched, torch.tensor([0]), *args, "adam_dense", rule.hparams(), None)
    bad_threshold_state = _state(torch.zeros(6, 3), rule)
    bad_threshold_state[1] = torch.zeros(5, 3)
    with pytest.raises(ValueError, match="exp_avg must have shape"):  # W's state is fine: W must not move either
        ops.soft_threshold_backward_step(torch.ones(3, 3), rows, weight_state, bad_threshold_state, sched,
                                         torch.tensor(0), *args, "adam_dense", rule.hparams(), None)
    assert torch.equal(weight_state[0], weight) and not weight_state[1].any()


def test_opcheck_row_optimizer_ops():
    rule = Adam(mode="fast")
    param = torch.randn(6, 3)
    sched = rule.schedule(4, torch.float32, "cpu")
    torch.library.opcheck(torch.ops.pep_kernels.row_optimizer_step,
                          (_state(param, rule), torch.tensor([1, 4]), torch.randn(2, 3), sched, "adam",
                           rule.hparams(), 3))
    torch.library.opcheck(torch.ops.pep_kernels.row_optimizer_catch_up,
                          (_state(param, rule), torch.tensor([1, 1, 5]), sched, rule.hparams(), 4))
    torch.library.opcheck(torch.ops.pep_kernels.soft_threshold_count_nonzero,
                          (param, torch.zeros(6, 3), "feature_dim", 1.0, torch.zeros(1, dtype=torch.int64)))


@pytest.mark.parametrize("rule", [Adam(lr=1e-2, weight_decay=1e-2, mode="fast"),
                                  Adam(lr=1e-2, weight_decay=1e-2, mode="faithful"),
                                  Adagrad(lr=0.1, rowwise=True)], ids=repr)
@pytest.mark.parametrize("mode", ["feature_dim", "field"])
def test_triton_tables_train_like_cpu_tables(rule, mode):
    """The Triton path (backward, then the optimizer kernel) against the fused C++ kernel; in
    Triton's interpreter on CPU, on a GPU on GPU machines."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows, dim = 21, 3
    tables = {}
    for backend in ("cpu", "triton"):
        table = make_table(mode, rows, dim, rule)
        table.backend = backend
        table.to(device if backend == "triton" else "cpu")
        shared = None if mode in PER_ROW_MODES else torch.optim.SGD([table.threshold], lr=0.1)
        for ids, target in batches(rows, 5):
            ids, target = ids.to(table.weight.device), target.to(table.weight.device)
            if shared is not None:
                shared.zero_grad(set_to_none=True)
            loss_of(table(ids), target).backward()
            if shared is not None:
                shared.step()
        table.sync()
        tables[backend] = table
    # The lookups' gradients differ in summation order (atomics), hence a few ulps.
    torch.testing.assert_close(tables["triton"].weight.cpu(), tables["cpu"].weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tables["triton"].threshold.cpu(), tables["cpu"].threshold, rtol=1e-5, atol=1e-6)


def long_gap(dim, gap, warm, init, dtype=torch.float32, lr=1e-3, weight_decay=1e-5, grad_scale=1e-3):
    """(start, faithful, fast) of a table trained `warm` dense Adam steps on random loss gradients
    (30% of the rows each step), then left `gap` steps without a loss gradient: `faithful` takes
    them one by one, `fast` in one catch-up."""
    gen = torch.Generator().manual_seed(dim + gap)
    rule = Adam(lr=lr, weight_decay=weight_decay)
    sched = rule.schedule(warm + gap, dtype, "cpu")
    rows = 256
    p = init(rows, dim, gen).to(dtype)
    state = [p, torch.zeros_like(p), torch.zeros_like(p), torch.zeros(rows, dtype=torch.long)]
    for step in range(1, warm + 1):
        picked = torch.nonzero(torch.rand(rows, generator=gen) < 0.3).flatten()
        grads = grad_scale * torch.randn(picked.numel(), dim, generator=gen, dtype=dtype)
        ops.row_optimizer_step(state, picked, grads, sched, "adam_dense", rule.hparams(), step)
    faithful = [t.clone() for t in state]
    no_rows = torch.empty(0, dtype=torch.long)
    for step in range(warm + 1, warm + gap + 1):
        ops.row_optimizer_step(faithful, no_rows, torch.empty(0, dim, dtype=dtype), sched, "adam_dense", rule.hparams(),
                           step)
    fast = [t.clone() for t in state]
    fast[3].fill_(warm)
    ops.row_optimizer_catch_up(fast, None, sched, rule.hparams(), warm + gap)
    return state[0], faithful, fast


WEIGHTS = lambda rows, dim, gen: 0.02 * torch.randn(rows, dim, generator=gen)  # noqa: E731
THRESHOLDS = lambda rows, dim, gen: -4 - 11 * torch.rand(rows, dim, generator=gen)  # noqa: E731


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dim", [1, 17, 33])
@pytest.mark.parametrize("table", ["weights", "thresholds"])
@pytest.mark.parametrize("warm, gap", [(60, 33), (100, 5), (100, 13), (400, 700), (1000, 300)])
def test_fast_adam_long_gap_close_to_faithful(table, dim, dtype, warm, gap):
    """Gaps past 4 steps (from step 64 on) are caught up in closed-form segments: each value
    lands within 5% of the median move that the skipped steps make (measured: at most 2.3% for
    weights and 0.9% for thresholds in experiments/catch_up_error), and the moments within 10% of
    their scale."""
    start, faithful, fast = long_gap(dim, gap, warm, WEIGHTS if table == "weights" else THRESHOLDS, dtype)
    move = (faithful[0] - start).abs()
    error = (fast[0] - faithful[0]).abs()
    assert float(move.median()) > 0
    assert float(error.max()) <= 0.05 * float(move.median())
    assert not torch.equal(fast[0], faithful[0])  # the closed form ran
    assert torch.equal(fast[3], torch.full_like(fast[3], warm + gap))
    for moment in (1, 2):
        scale = float(faithful[moment].abs().median())
        assert float((fast[moment] - faithful[moment]).abs().median()) <= 0.1 * scale


@pytest.mark.parametrize("gap", [1, 4])
def test_fast_adam_short_gaps_are_replayed_exactly(gap):
    """Gaps of up to 4 steps are replayed step by step at any step: bitwise `faithful`."""
    _, faithful, fast = long_gap(17, gap, 100, WEIGHTS)
    for a, b in zip(fast[:3], faithful[:3]):  # p, m, v
        assert torch.equal(a, b)


def test_catch_up_of_duplicate_ids_on_several_threads_replays_each_row_once():
    """Every task reads all the ids and catches up the rows it owns: duplicate ids on any number of
    threads give the bits of one catch-up per row, and rows not named stay as they were."""
    rows, dim, step = 2000, 17, 300
    rule = Adam(lr=1e-3, weight_decay=1e-5)
    sched = rule.schedule(step, torch.float32, "cpu")
    gen = torch.Generator().manual_seed(6)
    p = 0.02 * torch.randn(rows, dim, generator=gen)
    last_step = torch.randint(0, step, (rows,), generator=gen)
    start = [p, 1e-4 * torch.randn(rows, dim, generator=gen), 1e-8 * torch.rand(rows, dim, generator=gen), last_step]
    ids = torch.randint(0, rows // 2, (4096,), generator=gen)  # duplicate-heavy; rows from 1000 on never named
    expected = [t.clone() for t in start]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ops.row_optimizer_catch_up(expected, ids.unique(), sched, rule.hparams(), step)
        for n in (2, 3):
            torch.set_num_threads(n)
            state = [t.clone() for t in start]
            ops.row_optimizer_catch_up(state, ids, sched, rule.hparams(), step)
            for got, want in zip(state, expected):
                assert torch.equal(got, want)
    finally:
        torch.set_num_threads(threads)
    named = torch.zeros(rows, dtype=torch.bool)
    named[ids] = True
    assert bool((expected[3][named] == step).all()) and torch.equal(expected[3][~named], last_step[~named])
    assert not torch.equal(expected[0][named], p[named])


def test_catch_up_of_two_parameters_in_one_pass_is_each_caught_up_alone():
    """W and its per-row thresholds caught up in one call (as the module does) get the bits of one
    call each, each parameter by its own last steps; states of different rows are refused."""
    rows, step = 600, 200
    rule = Adam(lr=1e-3, weight_decay=1e-5)
    sched = rule.schedule(step, torch.float32, "cpu")
    gen = torch.Generator().manual_seed(7)

    def state(dim):
        return [0.02 * torch.randn(rows, dim, generator=gen), 1e-4 * torch.randn(rows, dim, generator=gen),
                1e-8 * torch.rand(rows, dim, generator=gen), torch.randint(0, step, (rows,), generator=gen)]

    weight, threshold = state(17), state(1)
    ids = torch.randint(0, rows, (1000,), generator=gen)
    alone = [[t.clone() for t in s] for s in (weight, threshold)]
    for s in alone:
        ops.row_optimizer_catch_up(s, ids, sched, rule.hparams(), step)
    together = [t.clone() for t in weight + threshold]
    ops.row_optimizer_catch_up(together, ids, sched, rule.hparams(), step)
    for got, want in zip(together, alone[0] + alone[1]):
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="same rows"):
        ops.row_optimizer_catch_up(weight + [t[:10] for t in threshold], ids, sched, rule.hparams(), step)
    with pytest.raises(ValueError, match="for each parameter, got 5 tensors"):
        ops.row_optimizer_catch_up(weight + threshold[:1], ids, sched, rule.hparams(), step)


def test_fast_adam_long_gap_collapse_stays_bounded():
    """A row whose second moment has run down (no loss gradient for thousands of steps) is driven
    to zero fast by the decay, faster than the momentum can follow: the exact steps oscillate in
    towards zero; the segments must land near zero too, never overshoot or blow up."""
    start, faithful, fast = long_gap(16, 2000, 40, WEIGHTS, grad_scale=1e-9)
    assert bool(torch.isfinite(fast[0]).all())
    assert float(faithful[0].abs().max()) < 0.1 * float(start.abs().max())  # the regime is reached
    assert bool((fast[0].abs() <= start.abs()).all())
    assert float((fast[0] - faithful[0]).abs().max()) <= 0.1 * float(start.abs().max())
