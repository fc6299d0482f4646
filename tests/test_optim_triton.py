"""The Triton row optimizers (pep_kernels/ops/optim_triton.py) against the C++ CPU ops: every
rule bit for bit, and the same argument checks.

The Triton functions are called directly rather than through the dispatcher in ops/optim.py, so
that without a GPU they run on CPU tensors in Triton's interpreter.
"""

import pytest
import torch

from utils import HAS_CUDA
from pep_kernels.ops import optim_triton
from pep_kernels.optim import Adam

DEVICE = "cuda" if HAS_CUDA else "cpu"
KINDS = ("sgd", "adagrad", "rowwise_adagrad", "adam", "adam_dense")
DIMS = (1, 3, 17, 33)
# Nonzero weight decay, so that every fma of the rules matters.
RULE = Adam(lr=3e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05)
HPARAMS = RULE.hparams()
cpp = torch.ops.pep_kernels


def make_state(kind, num_rows, dim, seed=0):
    """[param, state1, state2, last_step] for `kind` with random contents (Adam rows current to
    steps 0..3), on the CPU; unused entries empty."""
    gen = torch.Generator().manual_seed(seed)
    param = torch.randn(num_rows, dim, generator=gen)
    empty, no_steps = torch.empty(0), torch.empty(0, dtype=torch.int64)
    if kind == "adagrad":
        return [param, torch.rand(num_rows, dim, generator=gen), empty, no_steps]
    if kind == "rowwise_adagrad":
        return [param, torch.rand(num_rows, generator=gen), empty, no_steps]
    if kind in ("adam", "adam_dense"):
        return [param, 0.1 * torch.randn(num_rows, dim, generator=gen), 0.01 * torch.rand(num_rows, dim, generator=gen),
                torch.randint(0, 4, (num_rows,), generator=gen)]
    return [param, empty, empty, no_steps]


def on_device(tensors):
    """Copies (never the same tensors, also when DEVICE is the CPU)."""
    return [t.to(DEVICE, copy=True) for t in tensors]


def assert_same(cpu_state, device_state):
    for name, expected, actual in zip(("param", "state1", "state2", "last_step"), cpu_state, device_state):
        torch.testing.assert_close(actual.cpu(), expected, rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")


def schedule(steps, device="cpu"):
    return RULE.schedule(steps, torch.float32, device)


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("kind", KINDS)
def test_steps_match_cpp(kind, dim):
    """Steps on random row subsets, some consecutive, some with gaps, so that Adam replays up to
    seven skipped steps of a row."""
    num_rows = 30 + dim
    expected = make_state(kind, num_rows, dim)
    initial = expected[0].clone()
    actual = on_device(expected)
    sched = schedule(10)
    gen = torch.Generator().manual_seed(1)
    for step in (4, 5, 8):
        n = int(torch.randint(1, num_rows // 2, (), generator=gen))
        rows = torch.randperm(num_rows, generator=gen)[:n].sort().values
        grads = torch.randn(n, dim, generator=gen)
        cpp.row_optimizer_step(expected, rows, grads, sched, kind, HPARAMS, step)
        optim_triton.row_optimizer_step(actual, rows.to(DEVICE), grads.to(DEVICE), sched.to(DEVICE), kind, HPARAMS,
                                        step)
        assert_same(expected, actual)
    assert not torch.equal(expected[0], initial)
    if kind == "adam":
        cpp.row_optimizer_catch_up(expected, None, sched, HPARAMS, 10)
        optim_triton.row_optimizer_catch_up(actual, None, sched.to(DEVICE), HPARAMS, 10)
        assert_same(expected, actual)
        assert bool((actual[3] == 10).all())


@pytest.mark.parametrize("kind", KINDS)
def test_empty_rows(kind):
    """No rows: a no-op, except dense Adam, which steps every row with a zero loss gradient."""
    expected = make_state(kind, 40, 5)
    initial = expected[0].clone()
    actual = on_device(expected)
    sched = schedule(6)
    rows, grads = torch.empty(0, dtype=torch.int64), torch.empty(0, 5)
    cpp.row_optimizer_step(expected, rows, grads, sched, kind, HPARAMS, 6)
    optim_triton.row_optimizer_step(actual, rows.to(DEVICE), grads.to(DEVICE), sched.to(DEVICE), kind, HPARAMS, 6)
    assert_same(expected, actual)
    changed = (actual[0].cpu() != initial).any(1)
    assert bool(changed.all()) if kind == "adam_dense" else not bool(changed.any())


def test_grads_converted_and_made_contiguous():
    """Gradients of another dtype and layout are taken as the C++ op takes them."""
    expected = make_state("adam", 40, 17)
    actual = on_device(expected)
    sched = schedule(5)
    rows = torch.tensor([0, 3, 4, 20, 39])
    grads = torch.randn(17, 5, dtype=torch.float64).t()
    cpp.row_optimizer_step(expected, rows, grads, sched, "adam", HPARAMS, 5)
    optim_triton.row_optimizer_step(actual, rows.to(DEVICE), grads.to(DEVICE), sched.to(DEVICE), "adam", HPARAMS, 5)
    assert_same(expected, actual)


@pytest.mark.parametrize("dim", DIMS)
def test_catch_up_matches_cpp(dim):
    """Unsorted ids with duplicates (each row replayed once), no ids, then every row."""
    num_rows = 60
    expected = make_state("adam", num_rows, dim, seed=2)
    actual = on_device(expected)
    sched = schedule(12)
    ids = torch.tensor([7, 3, 7, 59, 0, 3, 3, 21])
    for rows, to_step in ((ids, 6), (ids[:0], 7), (None, 9), (ids, 12)):
        cpp.row_optimizer_catch_up(expected, rows, sched, HPARAMS, to_step)
        optim_triton.row_optimizer_catch_up(actual, None if rows is None else rows.to(DEVICE), sched.to(DEVICE),
                                            HPARAMS, to_step)
        assert_same(expected, actual)
    last_step = actual[3].cpu()
    assert bool((last_step[ids] == 12).all()) and int((last_step == 9).sum()) == num_rows - ids.unique().numel()


def test_catch_up_before_the_first_step_is_a_no_op():
    state = on_device(make_state("adam", 30, 3))
    before = [t.clone() for t in state]
    optim_triton.row_optimizer_catch_up(state, None, torch.empty(0, device=DEVICE), HPARAMS, 0)
    assert_same([t.cpu() for t in before], state)


@pytest.mark.gpu
def test_opcheck_row_optimizer_ops_on_cuda():
    """The ops' CUDA kernels (these Triton functions, registered for CUDA) through the dispatcher."""
    sched = schedule(4, "cuda")
    torch.library.opcheck(cpp.row_optimizer_step.default,
                          (on_device(make_state("adam", 6, 3)), torch.tensor([1, 4], device="cuda"),
                           torch.randn(2, 3, device="cuda"), sched, "adam", HPARAMS, 3))
    torch.library.opcheck(cpp.row_optimizer_catch_up.default,
                          (on_device(make_state("adam", 6, 3)), torch.tensor([1, 5], device="cuda"), sched, HPARAMS, 4))


# Bad arguments: (id, change to the good arguments, error, message). The C++ op must refuse the
# same arguments with the same error type, except float64 parameters, which only it takes.
def _set(key, value):
    return lambda args: args.__setitem__(key, value(args) if callable(value) else value)


def _set_state(index, value):
    return lambda args: args["state"].__setitem__(index, value(args))


def _both(*changes):
    return lambda args: [change(args) for change in changes]


def _as(dtype):
    def change(args):
        args["state"] = [t.to(dtype) if t.is_floating_point() else t for t in args["state"]]
        args["schedule"] = args["schedule"].to(dtype)
    return change


STEP_ERRORS = [
    ("unknown kind", _set("kind", "adamw"), ValueError, "unknown row optimizer 'adamw'"),
    ("empty state", _set("state", []), ValueError, "must not be empty"),
    ("float64", _as(torch.float64), TypeError, "float32 parameters, got torch.float64"),
    ("float16", _as(torch.float16), TypeError, "float32 parameters, got torch.float16"),
    ("int32 rows", _set("rows", lambda a: a["rows"].int()), TypeError, "rows must be int64"),
    ("2-D rows", _set("rows", lambda a: a["rows"][None]), ValueError, "grads must have shape"),
    ("grads shape", _set("grads", lambda a: a["grads"][:1]), ValueError, r"grads must have shape \(2, 3\)"),
    ("row too big", _set("rows", lambda a: a["rows"] + 2), IndexError, "row 6 is out of range"),
    ("negative row", _set("rows", lambda a: a["rows"] - 2), IndexError, "row -1 is out of range"),
    ("unsorted rows", _set("rows", lambda a: a["rows"].flip(0)), ValueError, "sorted and distinct"),
    ("duplicate rows", _set("rows", lambda a: a["rows"][:1].repeat(2)), ValueError, "sorted and distinct"),
    ("3 state tensors", _set("state", lambda a: a["state"][:3]), ValueError, "got 3 tensors"),
    ("4 hparams", _set("hparams", HPARAMS[:4]), ValueError, "got 4 values"),
    ("step 0", _set("step", 0), ValueError, "counts from 1, got 0"),
    ("negative lr", _set("hparams", [-1e-3] + HPARAMS[1:]), ValueError, "lr, eps and weight_decay must be finite"),
    ("nan weight decay", _set("hparams", HPARAMS[:2] + [float("nan")] + HPARAMS[3:]), ValueError,
     "must be finite and >= 0, got nan"),
    ("beta2 of 1", _set("hparams", HPARAMS[:4] + [1.0]), ValueError, r"betas must be in \[0, 1\)"),
    ("strided param", _set_state(0, lambda a: a["state"][0].t().contiguous().t()), ValueError, "contiguous 2-D"),
    ("exp_avg_sq shape", _set_state(2, lambda a: a["state"][2][:5]), ValueError, "exp_avg_sq must have shape"),
    ("exp_avg dtype", _set_state(1, lambda a: a["state"][1].double()), TypeError, "exp_avg must be torch.float32"),
    ("last_step dtype", _set_state(3, lambda a: a["state"][3].int()), TypeError, "last_step must be torch.int64"),
    ("strided exp_avg", _set_state(1, lambda a: a["state"][1].t().contiguous().t()), ValueError,
     "exp_avg must be contiguous"),
    ("short schedule", _set("step", 4), ValueError, r"schedule of shape \(4, > 4\)"),
    ("adagrad sum", _both(_set("kind", "adagrad"), _set_state(1, lambda a: a["state"][1][:, 0].contiguous())),
     ValueError, r"sum must have shape \(6, 3\)"),
    ("row-wise sum", _set("kind", "rowwise_adagrad"), ValueError, r"sum must have shape \(6,\)"),
]


def good_step_args(device):
    return dict(state=[t.to(device) for t in make_state("adam", 6, 3)], rows=torch.tensor([1, 4], device=device),
                grads=torch.ones(2, 3, device=device), schedule=schedule(3, device), kind="adam", hparams=HPARAMS,
                step=3)


@pytest.mark.parametrize("change, error, match", [case[1:] for case in STEP_ERRORS],
                         ids=[case[0] for case in STEP_ERRORS])
def test_step_refuses_what_cpp_refuses(change, error, match):
    args = good_step_args(DEVICE)
    change(args)
    with pytest.raises(error, match=match):
        optim_triton.row_optimizer_step(**args)
    if "float64" in match:
        return
    cpu_args = good_step_args("cpu")
    change(cpu_args)
    with pytest.raises(error):
        cpp.row_optimizer_step(**cpu_args)


CATCH_UP_ERRORS = [
    ("empty state", _set("state", []), ValueError, r"last_step\] for each parameter, got 0 tensors"),
    ("five tensors", _set("state", lambda a: a["state"] + a["state"][:1]), ValueError, "got 5 tensors"),
    ("rows differ", _set("state", lambda a: a["state"] + [t[:2] for t in a["state"]]), ValueError, "same rows"),
    ("float16", _as(torch.float16), TypeError, "float32 parameters, got torch.float16"),
    ("int32 rows", _set("rows", lambda a: a["rows"].int()), TypeError, "rows must be int64"),
    ("row too big", _set("rows", lambda a: a["rows"] + 3), IndexError, "row 6 is out of range"),
    ("no last_step", _set_state(3, lambda a: a["state"][3][:0]), ValueError, "last_step must have shape"),
    ("short schedule", _set("to_step", 4), ValueError, r"schedule of shape \(4, > 4\)"),
    ("negative beta1", _set("hparams", HPARAMS[:3] + [-0.1] + HPARAMS[4:]), ValueError, r"betas must be in \[0, 1\)"),
]


def good_catch_up_args(device):
    return dict(state=[t.to(device) for t in make_state("adam", 6, 3)], rows=torch.tensor([3, 1, 3], device=device),
                schedule=schedule(3, device), hparams=HPARAMS, to_step=3)


@pytest.mark.parametrize("change, error, match", [case[1:] for case in CATCH_UP_ERRORS],
                         ids=[case[0] for case in CATCH_UP_ERRORS])
def test_catch_up_refuses_what_cpp_refuses(change, error, match):
    args = good_catch_up_args(DEVICE)
    change(args)
    with pytest.raises(error, match=match):
        optim_triton.row_optimizer_catch_up(**args)
    cpu_args = good_catch_up_args("cpu")
    change(cpu_args)
    with pytest.raises(error):
        cpp.row_optimizer_catch_up(**cpu_args)


def test_errors_leave_the_state_alone():
    args = good_step_args(DEVICE)
    args["rows"] = torch.tensor([1, 6], device=DEVICE)
    before = [t.clone() for t in args["state"]]
    with pytest.raises(IndexError):
        optim_triton.row_optimizer_step(**args)
    assert_same([t.cpu() for t in before], args["state"])


@pytest.mark.parametrize("dim", (3, 17))
def test_long_gap_catch_up_matches_cpp(dim):
    """Rows behind by more than 4 steps take the closed-form segments of `fast` Adam (after exact
    steps up to step 63 where the gap starts earlier): the same formulas as the C++, whose exp is
    its own polynomial where Triton calls tl.exp, so equal to a few ulps rather than bitwise; rows
    behind by 4 steps or fewer stay bitwise. Each row's gap differs, so a tile mixes exact steps
    and segments."""
    num_rows = 40
    expected = make_state("adam", num_rows, dim, seed=3)
    gaps = torch.tensor([1, 2, 4, 5, 13, 40, 256, 257, 650, 700]).repeat(num_rows // 10)
    expected[3] = 700 - gaps
    actual = on_device(expected)
    sched = schedule(700)
    cpp.row_optimizer_catch_up(expected, None, sched, HPARAMS, 700)
    optim_triton.row_optimizer_catch_up(actual, None, sched.to(DEVICE), HPARAMS, 700)
    short = gaps <= 4
    # atol: a tenth of an ulp of each tensor's starting scale (randn, 0.1 randn, 0.01 rand). The
    # segments subtract terms of that scale, so an entry decayed near 0 keeps their absolute error:
    # on a GPU, tl.exp is ex2.approx, 1-2 ulps from the C++ polynomial (seen: 6e-9 on a 2e-3 entry).
    torch.testing.assert_close(actual[0].cpu(), expected[0], rtol=2e-6, atol=1e-8)
    torch.testing.assert_close(actual[1].cpu(), expected[1], rtol=2e-6, atol=1e-9)
    torch.testing.assert_close(actual[2].cpu(), expected[2], rtol=2e-6, atol=1e-10)
    assert torch.equal(actual[0].cpu()[short], expected[0][short])
    assert bool((actual[3] == 700).all())
