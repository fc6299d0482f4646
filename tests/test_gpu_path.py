"""The GPU path without the host (issue 24): no host read of tensor data anywhere in a lookup or a
training step, and the kernel launches and torch ops each takes, proved on the CPU by running the
Triton kernels in Triton's interpreter under a torch function mode that fails on any host read;
deferred id checks; and, on a GPU machine, the same steps under CUDA's sync debug mode, replayed
from a CUDA graph and compiled with mode="reduce-overhead"."""

import contextlib

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from triton.runtime import interpreter

from utils import HAS_CUDA, MODES, PER_ROW_MODES
from pep_kernels import MaskedEmbedding, PEPEmbedding, PEPEmbeddingBag, soft_threshold_embedding
from pep_kernels.optim import SGD, Adagrad, Adam

DEVICE = "cuda" if HAS_CUDA else "cpu"
RULES = {
    "sgd": SGD(lr=0.1, weight_decay=1e-2),
    "adagrad": Adagrad(lr=0.1, weight_decay=1e-2),
    "rowwise_adagrad": Adagrad(lr=0.1, weight_decay=1e-2, rowwise=True),
    "adam_fast": Adam(lr=1e-2, weight_decay=1e-2, mode="fast"),
    "adam_faithful": Adam(lr=1e-2, weight_decay=1e-2, mode="faithful"),
}

# What reads tensor data back to the host (on a GPU: a synchronisation) or sizes a result by the
# data (nonzero, unique, masked_select: a synchronisation too).
HOST_READS = {
    torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__,
    torch.Tensor.__index__, torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.nonzero, torch.nonzero,
    torch.Tensor.unique, torch.unique, torch.unique_consecutive, torch.Tensor.unique_consecutive,
    torch.masked_select, torch.Tensor.masked_select, torch.Tensor.__array__, torch.equal, torch.allclose,
    torch.Tensor.__repr__, torch.Tensor.__format__,
}
# Views, metadata and allocations: no kernel runs for them.
NOT_KERNELS = {
    "view", "_unsafe_view", "reshape", "expand", "as_strided", "t", "transpose", "permute", "unsqueeze", "squeeze",
    "slice", "select", "detach", "alias", "lift_fresh", "empty", "empty_strided", "empty_like", "new_empty",
    "new_empty_strided", "split", "unbind", "diagonal", "_reshape_alias", "sym_size", "sym_stride", "sym_numel",
    "_sparse_coo_tensor_with_dims_and_tensors", "_indices", "_values", "_coalesced_",
}


def host_read(func, args, kwargs):
    if func in HOST_READS:
        return True
    if func is torch.Tensor.to or func is torch.Tensor.copy_:  # to the host
        targets = [a for a in (*args[1:], *(kwargs or {}).values()) if isinstance(a, (str, torch.device))]
        return func is torch.Tensor.to and any(torch.device(t).type == "cpu" for t in targets)
    if func is torch.Tensor.__getitem__:  # a boolean mask index sizes its result by the data
        index = args[1] if isinstance(args[1], tuple) else (args[1],)
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)
    return False


# The same at the aten level (a host read that a torch function hides: a scalar's bits, a result
# sized by the data).
HOST_READ_OPS = {"_local_scalar_dense", "nonzero", "_unique2", "unique_consecutive", "unique_dim", "masked_select"}


class _Counts(TorchDispatchMode):
    """Counts the torch ops that run a kernel, outside Triton's launches, and fails on the aten ops
    that read data back."""

    def __init__(self, guard):
        super().__init__()
        self.guard, self.ops = guard, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.guard.in_launch and name in HOST_READ_OPS:
            raise AssertionError(f"host read of tensor data: aten.{name}")
        # autograd copies a sparse gradient into .grad when something else holds it (this mode
        # does), and steals it otherwise: not the lookup's work
        accumulation = name == "clone" and args[0].is_sparse
        if not self.guard.in_launch and name not in NOT_KERNELS and not accumulation:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


class NoHostReads(TorchFunctionMode):
    """Fails on any host read of tensor data (outside Triton's own launches, whose interpreter
    copies arguments), and counts Triton launches and torch kernel ops."""

    def __init__(self):
        super().__init__()
        self.in_launch, self.launches = False, 0
        self.counts = _Counts(self)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if not self.in_launch and host_read(func, args, kwargs):
            raise AssertionError(f"host read of tensor data: {getattr(func, '__qualname__', func)}")
        return func(*args, **(kwargs or {}))

    @property
    def ops(self):
        return self.counts.ops

    def reset(self):
        self.launches = 0
        self.counts.ops = []


@pytest.fixture
def no_host_reads(monkeypatch):
    """A factory of guarded regions: `with guard():` fails on host reads and counts inside."""
    guard = NoHostReads()
    call = interpreter.GridExecutor.__call__

    def launch(self, *args, **kwargs):
        guard.launches += 1
        guard.in_launch = True
        try:
            return call(self, *args, **kwargs)
        finally:
            guard.in_launch = False

    monkeypatch.setattr(interpreter.GridExecutor, "__call__", launch)

    @contextlib.contextmanager
    def region():
        guard.reset()
        with guard, guard.counts:
            yield guard

    return region


def table(mode, optimizer=None, field_dims=(5, 4, 3), **kwargs):
    torch.manual_seed(0)
    return PEPEmbedding(sum(field_dims), 6, threshold_mode=mode, threshold_init=-1.0, field_dims=list(field_dims),
                        optimizer=optimizer, backend="triton", bounds_check="deferred", device=DEVICE, **kwargs)


def batch(step, field_dims=(5, 4, 3)):
    gen = torch.Generator().manual_seed(step)
    ids = torch.stack([torch.randint(0, f, (7,), generator=gen) for f in field_dims], 1)
    ids[:3, 0] = 1  # duplicates
    return ids.to(DEVICE), torch.randn(7, len(field_dims), 6, generator=gen).to(DEVICE)


def test_the_guard_fails_on_the_host_reads_of_the_old_path(no_host_reads):
    """The checks that the previous GPU path made (torch.unique, .tolist(), bool(...)) fail here."""
    ids = torch.tensor([3, 1, 3])
    for read in (lambda: torch.unique(ids), lambda: ids.tolist(), lambda: bool((ids > 0).all()), lambda: ids.cpu(),
                 lambda: ids[ids > 1]):
        with pytest.raises(AssertionError, match="host read"), no_host_reads():
            read()


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_lookup_forward_is_one_launch_and_its_backward_reads_nothing_back(no_host_reads, mode, sparse):
    emb = table(mode, sparse=sparse)
    ids, target = batch(0)
    emb(ids)  # compiles (on a GPU) and makes the host mirror of the id check, outside the count
    with no_host_reads() as guard:
        out = emb(ids)
    assert (guard.launches, guard.ops) == (1, []), "the forward is one kernel"
    with no_host_reads() as guard:
        out.backward(target)
    expected_ops = ["sort"] + (["zeros"] * (2 if mode in PER_ROW_MODES else 1) if not sparse else []) + \
        ([] if mode in PER_ROW_MODES else ["sum"])
    assert guard.launches == 2 and sorted(guard.ops) == sorted(expected_ops), (guard.launches, guard.ops)


def test_functional_lookup_reads_nothing_back(no_host_reads):
    weight = torch.randn(9, 5, device=DEVICE, requires_grad=True)
    threshold = torch.zeros(9, 5, device=DEVICE, requires_grad=True)
    ids = torch.tensor([[1, 8], [8, 8]], device=DEVICE)
    soft_threshold_embedding(ids, weight, threshold, backend="triton", bounds_check="deferred")
    with no_host_reads() as guard:
        out = soft_threshold_embedding(ids, weight, threshold, backend="triton", bounds_check="deferred")
        out.backward(torch.ones_like(out))
    assert guard.launches == 3


# Every rule in a per-row and a per-field mode, and `fast` Adam (the most kernels) in every mode.
STEP_CASES = [(rule, mode) for rule in RULES for mode in ("feature_dim", "field")] + \
    [("adam_fast", mode) for mode in MODES if mode not in ("feature_dim", "field")]


@pytest.mark.parametrize("rule, mode", STEP_CASES)
def test_training_step_reads_nothing_back(no_host_reads, rule, mode):
    """Forward, backward with the fused update, and the step counter, on the device; counted
    against issue 24's budget (a `fast` Adam step of PEPEmbedding: at most 6 kernels)."""
    emb = table(mode, RULES[rule])
    shared = None if mode in PER_ROW_MODES else torch.optim.SGD([emb.threshold], lr=0.1)
    for step in (0, 1, 2):  # step 0 outside the guard (compiles, allocates)
        ids, target = batch(step)
        with no_host_reads() if step else contextlib.nullcontext() as guard:
            out = emb(ids)
            out.backward(target)
        if shared is not None:
            shared.step()
            shared.zero_grad(set_to_none=True)
        if not step:
            continue
        kernels = guard.launches + len(guard.ops)
        if rule == "adam_fast":
            assert kernels <= 6, (guard.launches, guard.ops)
        # forward; sort, chunk and runs kernels; a shared threshold's sum; faithful Adam's dense
        # gradients and its update of every row (W, and a per-row threshold)
        per_row = mode in PER_ROW_MODES
        expected = 4 + (not per_row) + (rule == "adam_faithful") * (2 * (1 + per_row))
        assert kernels == expected, (guard.launches, guard.ops)
    assert emb.optimizer_steps() == 3 and int(emb.optimizer_step) == 3


def test_masked_embedding_reads_nothing_back(no_host_reads):
    torch.manual_seed(0)
    weight = torch.randn(12, 6, device=DEVICE)
    emb = MaskedEmbedding(weight, weight > 0, field_dims=[5, 4, 3], backend="triton", bounds_check="deferred")
    ids, target = batch(0)
    emb(ids)
    with no_host_reads() as guard:
        emb(ids).backward(target)
    assert guard.launches == 3 and sorted(guard.ops) == ["sort", "zeros"], (guard.launches, guard.ops)


@pytest.mark.parametrize("rule", [None, "adam_fast", "rowwise_adagrad"])
@pytest.mark.parametrize("mode", ["feature_dim", "global"])
def test_bag_lookup_and_step_read_nothing_back(no_host_reads, mode, rule):
    """PEPEmbeddingBag (sum, per-sample weights): the pooled forward is one kernel; the backward,
    or the step, sorts once and runs the two backward kernels (a shared threshold adds its sum)."""
    torch.manual_seed(0)
    emb = PEPEmbeddingBag(12, 6, mode="sum", include_last_offset=True, threshold_mode=mode, threshold_init=-1.0,
                          optimizer=None if rule is None else RULES[rule], backend="triton",
                          bounds_check="deferred", device=DEVICE)
    for step in range(3):
        gen = torch.Generator().manual_seed(step)
        ids = torch.randint(0, 12, (20,), generator=gen).to(DEVICE)
        offsets = torch.tensor([0, 5, 5, 12, 20], device=DEVICE)
        weights = torch.rand(20, generator=gen).to(DEVICE)
        target = torch.randn(4, 6, generator=gen).to(DEVICE)
        emb.weight.grad = emb.threshold.grad = None
        with no_host_reads() if step else contextlib.nullcontext() as guard:
            out = emb(ids, offsets, weights)
            forward = (guard.launches, list(guard.ops)) if step else None
            out.backward(target)
        if not step:
            continue
        assert forward == (1, []), forward
        kernels = guard.launches + len(guard.ops)
        shared = mode not in PER_ROW_MODES
        expected = 4 + shared + (rule is None) * (1 + (not shared))  # dense gradients: zeros of W (and s)
        assert kernels == expected, (guard.launches, guard.ops)


@pytest.mark.parametrize("field_dims", [None, [5, 4, 3]])
def test_deferred_bad_ids_are_masked_and_raised(field_dims):
    """The kernels never read a bad id (a huge one would fault) and record it; the IndexError names
    it, its position and the valid range (on a CPU record at once; on a GPU at the next call or
    `sync()`, see test_deferred_errors_reach_the_host_without_a_sync)."""
    emb = PEPEmbedding(12, 4, field_dims=field_dims, backend="triton", bounds_check="deferred", device=DEVICE)
    ids = torch.tensor([[0, 1, 2], [3, 2**40, 1]], device=DEVICE)
    message = r"id 1099511627776 in field 1 is out of range: that field has 4 values .*position 4" if field_dims \
        else r"index 1099511627776 is out of range for a table of 12 rows \(valid ids are 0\.\.11\).*position 4"
    with pytest.raises(IndexError, match=message):
        emb(ids)
        emb.sync()
    ok = torch.tensor([[0, 1, 2]], device=DEVICE)
    assert emb(ok).shape == (1, 3, 4)  # the record was read and cleared: no stale error
    emb.sync()


def test_strict_check_raises_before_any_kernel(no_host_reads):
    emb = PEPEmbedding(12, 4, backend="triton", bounds_check="strict", device=DEVICE, optimizer=SGD(lr=0.1))
    before = emb.weight.detach().clone()
    with pytest.raises(IndexError, match="index 12 is out of range"):
        emb(torch.tensor([0, 12], device=DEVICE))
    assert torch.equal(emb.weight, before) and emb.optimizer_steps() == 0


# --- on a GPU -----------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_deferred_errors_reach_the_host_without_a_sync():
    emb = PEPEmbedding(12, 4, device="cuda")  # bounds_check defaults to deferred on a GPU
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = emb(torch.tensor([0, 12], device="cuda"))  # no sync, no error yet
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert not out[1].any()
    with pytest.raises(IndexError, match="index 12 is out of range.*position 1"):
        emb.sync()


@pytest.mark.gpu
@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("mode", ["global", "feature_dim", "field"])
def test_training_steps_do_not_synchronize(rule, mode):
    emb = table(mode, RULES[rule])
    shared = None if mode in PER_ROW_MODES else torch.optim.SGD([emb.threshold], lr=0.1)
    ids, target = batch(0)
    (emb(ids) * target).sum().backward()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in (1, 2, 3):
            ids, target = batch(step)
            (emb(ids) * target).sum().backward()
            if shared is not None:
                shared.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert emb.optimizer_steps() == 4


class TinyModel(torch.nn.Module):
    def __init__(self, embedding):
        super().__init__()
        self.embedding = embedding
        self.mlp = torch.nn.Sequential(torch.nn.Linear(3 * 6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))

    def forward(self, ids):
        return self.mlp(self.embedding(ids).flatten(1)).squeeze(1)


def train_step(model, optimizer, ids, labels):
    optimizer.zero_grad(set_to_none=False)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(ids), labels)
    loss.backward()
    optimizer.step()
    return loss


@pytest.mark.gpu
@pytest.mark.parametrize("rule", ["adam_fast", "adam_faithful", "rowwise_adagrad"])
@pytest.mark.parametrize("mode", ["feature_dim", "field"])
def test_cuda_graph_replays_a_whole_training_step(rule, mode):
    """forward, backward, the table's fused update and the rest of the model's Adam step, captured
    once and replayed: bitwise the eager steps (every sum in the step runs in a fixed order)."""
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        model = TinyModel(table(mode, RULES[rule])).cuda()
        optimizer = torch.optim.Adam([p for n, p in model.named_parameters()
                                      if not (n == "embedding.weight" or (n == "embedding.threshold" and
                                                                          mode in PER_ROW_MODES))],
                                     lr=1e-2, capturable=True)
        models.append((model, optimizer))
    (eager, eager_opt), (graphed, graphed_opt) = models
    static_ids, target = batch(0)
    static_labels = (target[:, 0, 0] > 0).float()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up steps on a side stream, as torch.cuda.graph asks
        for model, optimizer in models:
            for _ in range(2):
                train_step(model, optimizer, static_ids, static_labels)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = train_step(graphed, graphed_opt, static_ids, static_labels)
    for step in range(1, 6):
        ids, target = batch(step)
        labels = (target[:, 0, 0] > 0).float()
        static_ids.copy_(ids)
        static_labels.copy_(labels)
        graph.replay()
        loss = train_step(eager, eager_opt, ids, labels)
        assert torch.equal(static_loss, loss)
    for (name, a), b in zip(eager.state_dict().items(), graphed.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.gpu
@pytest.mark.compile
def test_reduce_overhead_compile_of_a_model_with_a_pep_table():
    torch.manual_seed(0)
    eager = TinyModel(table("feature_dim", Adam(lr=1e-2, mode="fast"))).cuda()
    torch.manual_seed(0)
    compiled_model = TinyModel(table("feature_dim", Adam(lr=1e-2, mode="fast"))).cuda()
    compiled = torch.compile(compiled_model, mode="reduce-overhead")
    optimizers = [torch.optim.Adam(m.mlp.parameters(), lr=1e-2) for m in (eager, compiled_model)]
    for step in range(6):
        ids, target = batch(step)
        labels = (target[:, 0, 0] > 0).float()
        losses = [train_step(m, o, ids, labels) for m, o in zip((eager, compiled), optimizers)]
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled_model.embedding.pruned_weight(), eager.embedding.pruned_weight(),
                               rtol=1e-5, atol=1e-6)
