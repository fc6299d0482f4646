"""Property tests (hypothesis) of the public ops against the eager oracle `pep_kernels.reference`.

`soft_threshold_embedding` on the "cpu" and "triton" backends (Triton runs in its interpreter
without a GPU: few, tiny examples) over random modes, shapes (d = 1, d > 256, one-row tables,
empty batches), id distributions (all duplicates, Zipf-like, uniform), dtypes, layouts (transposed
and strided weights and thresholds, strided ids), gk and thresholds from -150 to +10; and the
fused row optimizers of `PEPEmbedding(optimizer=...)` over random short runs.

Example budgets are hypothesis profiles registered in tests/conftest.py:

    pytest tests/test_properties.py                               # "ci", the default: < 60 s on 2 cores
    HYPOTHESIS_PROFILE=long pytest tests/test_properties.py       # "long": about 30x the examples

Every example draws a seed for its tensors, so a failure prints a complete reproducer.
"""

import math

import torch
from hypothesis import given, note, settings
from hypothesis import strategies as st

from utils import EPS32, FIELD_MODES, GRAD_TOL, MODES, PER_ROW_MODES, backend_device, dense, train_with_row_oracle
from pep_kernels import PEPEmbedding, reference, soft_threshold_embedding
from pep_kernels._validation import PER_FIELD, PER_ROW, mode_layout, threshold_shape
from pep_kernels.optim import SGD, Adagrad, Adam

# The loaded profile's budget; the Triton interpreter and the optimizer runs get a fraction of it.
EXAMPLES = settings.default.max_examples


def budget(fraction, at_least):
    return max(at_least, int(EXAMPLES * fraction))


# Entries this close to their threshold (relative to it) are moved away before a test: there the
# kernels' sigmoid (a few ulps from torch's) may decide the other way, which is not a bug.
BOUNDARY_BAND = 1e-5


# ---------------------------------------------------------------------------------------------
# Lookups
# ---------------------------------------------------------------------------------------------

@st.composite
def lookup_cases(draw, backend):
    """A lookup: (ids, weight, threshold, mode, gk, description) with tensors made from a drawn seed."""
    triton = backend == "triton"
    mode = draw(st.sampled_from(MODES))
    dtype = torch.float32 if triton else draw(st.sampled_from([torch.float32, torch.float64]))
    index_dtype = draw(st.sampled_from([torch.int32, torch.int64]))
    num_rows = draw(st.one_of(st.just(1), st.integers(1, 12), st.integers(13, 200)))
    if triton:
        dim = draw(st.one_of(st.integers(1, 20), st.just(257)))
    else:
        dim = draw(st.one_of(st.just(1), st.integers(1, 40), st.integers(250, 300)))
    batch = draw(st.one_of(st.just(0), st.integers(1, 4 if triton else 8)))
    fields = draw(st.integers(1, 4))
    shape_kind = draw(st.sampled_from(["2d", "1d", "3d", "scalar"] if mode not in FIELD_MODES else ["2d", "3d"]))
    distribution = draw(st.sampled_from(["duplicate", "zipf", "uniform"]))
    layout = draw(st.sampled_from(["contiguous", "transposed", "strided"]))
    ids_strided = draw(st.booleans())
    gk = draw(st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 3.0)))
    s_lo = draw(st.one_of(st.sampled_from([-150.0, -88.0, -15.0, 0.0, 10.0]), st.floats(-150.0, 10.0)))
    s_hi = draw(st.one_of(st.just(s_lo), st.floats(s_lo, 10.0)))
    w_scale = draw(st.sampled_from([1e-3, 0.05, 1.0, 4.0]))
    zero_share = draw(st.sampled_from([0.0, 0.0, 0.3]))
    seed = draw(st.integers(0, 2**32 - 1))

    gen = torch.Generator().manual_seed(seed)
    # ids of the drawn shape (for the field modes, the last axis is the field axis)
    shape = {"2d": (batch, fields), "1d": (batch * fields,), "3d": (2, batch, fields), "scalar": ()}[shape_kind]
    count = math.prod(shape)
    if distribution == "duplicate":
        flat = torch.full((count,), int(torch.randint(0, num_rows, (1,), generator=gen)))
    elif distribution == "zipf":
        p = 1.0 / torch.arange(1, num_rows + 1, dtype=torch.float64) ** 1.3
        flat = torch.multinomial(p, count, replacement=True, generator=gen) if count else torch.zeros(0)
        flat = torch.randperm(num_rows, generator=gen)[flat.long()]  # hot rows anywhere in the table
    else:
        flat = torch.randint(0, num_rows, (count,), generator=gen)
    ids = flat.reshape(shape).to(index_dtype)
    if ids_strided and ids.dim() >= 1:
        wide = torch.zeros(shape[:-1] + (2 * shape[-1],), dtype=index_dtype)
        wide[..., ::2] = ids
        ids = wide[..., ::2]  # same values, last-axis stride 2

    weight = torch.randn(num_rows, dim, generator=gen, dtype=torch.float64) * w_scale
    weight[torch.rand(num_rows, dim, generator=gen) < zero_share] = 0.0
    num_fields = ids.shape[-1] if mode in FIELD_MODES else None
    s_shape = threshold_shape(mode, num_rows, dim, num_fields)
    threshold = s_lo + (s_hi - s_lo) * torch.rand(s_shape, generator=gen, dtype=torch.float64)
    threshold = threshold.to(dtype)
    weight = _away_from_boundary(ids, weight, threshold, mode, gk).to(dtype)
    weight, threshold = _lay_out(weight, layout), _lay_out(threshold, layout)
    description = dict(mode=mode, dtype=dtype, index_dtype=index_dtype, num_rows=num_rows, dim=dim,
                       ids_shape=tuple(ids.shape), distribution=distribution, layout=layout,
                       ids_strided=ids_strided, gk=gk, s_range=(s_lo, s_hi), w_scale=w_scale, seed=seed)
    return ids, weight, threshold, mode, gk, description


def _lay_out(t, layout):
    """The same values as a transposed (column-major) or strided view; 1-D tensors stay as they are
    unless strided."""
    if layout == "transposed" and t.dim() == 2:
        return t.t().contiguous().t()
    if layout == "strided":
        buffer = torch.full(t.shape[:-1] + (2 * t.shape[-1],), float("nan"), dtype=t.dtype)
        buffer[..., ::2] = t
        return buffer[..., ::2]  # a NaN between every two values: any stride mistake shows
    return t


def entry_thresholds(ids, threshold, mode, gk, num_rows):
    """gk * sigmoid(s) in float64 for every (lookup, dim) entry: (n, d) (d = 1 broadcasts)."""
    row_source, _ = mode_layout(mode)
    s = threshold.double()
    s2 = s.reshape(1, -1) if s.dim() == 1 else s
    flat = ids.reshape(-1).long()
    if row_source == PER_ROW:
        rows = s2[flat]
    elif row_source == PER_FIELD:
        rows = s2[torch.arange(flat.numel()) % s2.shape[0]] if flat.numel() else s2[:0]
    else:
        rows = s2.expand(flat.numel(), s2.shape[1])
    return gk * torch.sigmoid(rows)


def _away_from_boundary(ids, weight, threshold, mode, gk):
    """Zeroes the weight entries that some lookup sees within BOUNDARY_BAND of its threshold
    (float64; 0 is pruned by every backend whatever the threshold)."""
    flat = ids.reshape(-1).long()
    if flat.numel() == 0:
        return weight
    t = entry_thresholds(ids, threshold, mode, gk, weight.shape[0]).expand(flat.numel(), weight.shape[1])
    near = ((weight[flat].abs() - t).abs() <= BOUNDARY_BAND * t)
    weight = weight.clone()
    rows, cols = near.nonzero(as_tuple=True)
    weight[flat[rows], cols] = 0.0
    return weight


def lookup(backend, ids, weight, threshold, mode, gk, sparse, grad_seed):
    """Output and gradients (as the op returns them) for a random upstream gradient."""
    w = weight.detach().requires_grad_(True)  # keeps the drawn layout (a clone would not)
    s = threshold.detach().requires_grad_(True)
    if backend == "reference":
        out = reference.soft_threshold_embedding(ids, w, s, mode, gk, sparse)
    else:
        out = soft_threshold_embedding(ids, w, s, mode=mode, gk=gk, sparse=sparse, backend=backend)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    gw, gs = torch.autograd.grad(out, (w, s), upstream.to(out.device, out.dtype), allow_unused=True)
    return out.detach(), gw, gs


def summed_terms(mode, ids, dim):
    """The most terms one gradient entry sums (for its rounding tolerance)."""
    flat = ids.reshape(-1)
    n = flat.numel()
    if n == 0:
        return 1
    dup = int(torch.unique(flat, return_counts=True)[1].max())
    fields = ids.shape[-1] if mode in FIELD_MODES else 1
    return max(1, {"global": n * dim, "dimension": n, "feature": dup * dim, "feature_dim": dup,
                   "field": (n // fields) * dim, "field_dim": n // fields}[mode], dup)


def check_lookup_properties(backend, case, sparse, grad_seed):
    ids, weight, threshold, mode, gk, description = case
    note(repr(description))
    device = backend_device(backend)
    ids_d, weight_d, threshold_d = ids.to(device), weight.to(device), threshold.to(device)
    dtype = weight.dtype
    eps = torch.finfo(dtype).eps
    out, gw, gs = lookup(backend, ids_d, weight_d, threshold_d, mode, gk, sparse, grad_seed)
    out, gw, gs = out.cpu(), dense(gw).cpu(), dense(gs).cpu()
    d = weight.shape[1]
    assert out.shape == ids.shape + (d,) and out.dtype == dtype
    assert torch.isfinite(out).all() and torch.isfinite(gw).all() and torch.isfinite(gs).all()

    # Exact zeros where |w| <= gk * sigmoid(s) (in float64), non-zero with w's sign elsewhere. The
    # entries within BOUNDARY_BAND of their threshold were moved away (to 0), which is the margin.
    flat = out.reshape(-1, d).double()
    rows = weight.double()[ids.reshape(-1).long()]
    t = entry_thresholds(ids, threshold, mode, gk, weight.shape[0]).expand_as(rows)
    pruned = rows.abs() <= t
    assert (flat[pruned] == 0).all(), "an entry at or under its threshold is not exactly zero"
    kept = ~pruned
    assert (torch.sign(flat[kept]) == torch.sign(rows[kept])).all(), "a kept entry is zero or changed sign"
    assert (flat.abs() <= rows.abs()).all()

    ref_out, ref_gw, ref_gs = lookup("reference", ids, weight, threshold, mode, gk, False, grad_seed)
    torch.testing.assert_close(out, ref_out, rtol=8 * eps, atol=4 * eps * max(gk, 1.0))
    terms = summed_terms(mode, ids, d)
    grad_atol = GRAD_TOL["atol"] / EPS32 * eps * max(gk, 1.0) * max(1.0, math.sqrt(terms / 100))
    torch.testing.assert_close(gw, ref_gw, rtol=GRAD_TOL["rtol"] / EPS32 * eps, atol=grad_atol)
    torch.testing.assert_close(gs, ref_gs, rtol=GRAD_TOL["rtol"] / EPS32 * eps, atol=grad_atol)
    return out


def check_sparse_layout(backend, case, grad_seed):
    ids, weight, threshold, mode, gk, _ = case
    device = backend_device(backend)
    _, gw, gs = lookup(backend, ids.to(device), weight.to(device), threshold.to(device), mode, gk, True, grad_seed)
    assert gw.is_sparse and gs.is_sparse == (mode in PER_ROW_MODES)
    rows = gw.coalesce().indices()[0].cpu()
    assert torch.equal(rows, torch.unique(ids.reshape(-1).long()))  # exactly the looked-up rows
    if backend == "cpu":
        assert gw.is_coalesced()
    else:  # one entry per lookup, sorted (the number of distinct rows stays on the device)
        assert torch.equal(gw._indices()[0].cpu(), ids.reshape(-1).long().sort().values)


def check_repeatable(backend, case, sparse, grad_seed):
    """The backward sums each row's lookups in a fixed order: bitwise the same every time."""
    ids, weight, threshold, mode, gk, _ = case
    device = backend_device(backend)
    args = (ids.to(device), weight.to(device), threshold.to(device), mode, gk, sparse, grad_seed)
    first, second = lookup(backend, *args), lookup(backend, *args)
    for a, b in zip(first, second):
        assert torch.equal(dense(a), dense(b)), "the lookup is not bitwise repeatable"


@settings(max_examples=budget(6.0, 20))
@given(case=lookup_cases("cpu"), sparse=st.booleans(), grad_seed=st.integers(0, 2**16))
def test_cpu_lookup_matches_reference(case, sparse, grad_seed):
    check_lookup_properties("cpu", case, sparse, grad_seed=grad_seed)
    if sparse:
        check_sparse_layout("cpu", case, grad_seed)
    check_repeatable("cpu", case, sparse, grad_seed)


@settings(max_examples=budget(0.5, 6))
@given(case=lookup_cases("triton"), sparse=st.booleans(), grad_seed=st.integers(0, 2**16))
def test_triton_lookup_matches_reference(case, sparse, grad_seed):
    check_lookup_properties("triton", case, sparse, grad_seed)
    if sparse:
        check_sparse_layout("triton", case, grad_seed)
    check_repeatable("triton", case, sparse, grad_seed)


# ---------------------------------------------------------------------------------------------
# Fused row optimizers
# ---------------------------------------------------------------------------------------------

@st.composite
def optimizer_runs(draw):
    """A small table, its field split, and a short run of batches (some empty, some of one row)."""
    mode = draw(st.sampled_from(MODES))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    field_dims = draw(st.lists(st.integers(1, 9), min_size=1, max_size=3))
    dim = draw(st.sampled_from([1, 2, 3, 8, 17, 33]))
    steps = draw(st.integers(1, 12))
    run = []
    for _ in range(steps):
        batch = draw(st.one_of(st.just(0), st.integers(1, 6)))
        kind = draw(st.sampled_from(["uniform", "one_row", "few_rows"]))
        run.append((batch, kind))
    init = draw(st.sampled_from([-150.0, -6.0, -3.0, 0.0]))
    seed = draw(st.integers(0, 2**32 - 1))
    return dict(mode=mode, dtype=dtype, field_dims=field_dims, dim=dim, run=run, init=init, seed=seed)


def make_table(run, optimizer):
    torch.manual_seed(run["seed"])
    return PEPEmbedding(sum(run["field_dims"]), run["dim"], threshold_mode=run["mode"], threshold_init=run["init"],
                        field_dims=run["field_dims"], optimizer=optimizer, backend="cpu", dtype=run["dtype"])


def batches(run):
    """Per-field local ids and loss targets of every step, from the run's seed."""
    gen = torch.Generator().manual_seed(run["seed"] + 1)
    dims = torch.tensor(run["field_dims"])
    for batch, kind in run["run"]:
        high = {"uniform": dims, "one_row": torch.ones_like(dims), "few_rows": (dims + 2) // 3}[kind]
        ids = (torch.rand(batch, len(dims), generator=gen) * high).long()
        yield ids, torch.randn(batch, len(dims), generator=gen, dtype=run["dtype"])


def loss_of(out, target):
    # BCE-like through a per-dim weighting, so that every output entry has its own gradient.
    return torch.nn.functional.softplus(-(out.sum(-1) * target)).sum() + 0.1 * (out**2).sum()


@settings(max_examples=budget(2.0, 10))
@given(run=optimizer_runs(), lr=st.floats(1e-4, 0.1), weight_decay=st.sampled_from([0.0, 1e-5, 1e-2, 0.3]),
       betas=st.sampled_from([(0.9, 0.999), (0.0, 0.5), (0.5, 0.0)]), eps=st.sampled_from([1e-8, 1e-3]),
       reads=st.lists(st.sampled_from(["sync", "nnz", "state_dict", "pruned_weight", "forward"]), max_size=4))
def test_optimizer_adam_fast_equals_faithful_bitwise(run, lr, weight_decay, betas, eps, reads):
    """Fast Adam (looked-up rows only, replays the rest when read) gives faithful Adam's bits, whatever
    reads happen between the steps."""
    note(repr(run))
    tables = {}
    read_gen = torch.Generator().manual_seed(run["seed"] + 2)
    for adam_mode in ("faithful", "fast"):
        table = make_table(run, Adam(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, mode=adam_mode))
        shared = None if run["mode"] in PER_ROW_MODES else torch.optim.Adam([table.threshold], lr=lr,
                                                                            weight_decay=weight_decay)
        read_at = torch.randint(0, len(run["run"]), (len(reads),), generator=read_gen).tolist()
        for step, (ids, target) in enumerate(batches(run)):
            if shared is not None:
                shared.zero_grad(set_to_none=True)
            loss_of(table(ids), target).backward()
            if shared is not None:
                shared.step()
            assert table.weight.grad is None
            for read, at in zip(reads, read_at):
                if at == step and adam_mode == "fast":  # reads of the fast table must not change its numbers
                    {"sync": table.sync, "nnz": table.nnz, "state_dict": table.state_dict,
                     "pruned_weight": table.pruned_weight,
                     "forward": lambda: table(torch.zeros(1, len(run["field_dims"]), dtype=torch.long))}[read]()
        tables[adam_mode] = table
    faithful, fast = tables["faithful"], tables["fast"]
    fast.sync()
    for name in ("weight", "threshold", "weight_exp_avg", "weight_exp_avg_sq"):
        assert torch.equal(getattr(fast, name), getattr(faithful, name)), name
    if run["mode"] in PER_ROW_MODES:
        assert torch.equal(fast.threshold_exp_avg_sq, faithful.threshold_exp_avg_sq)
    assert torch.isfinite(fast.weight).all()
    assert fast.nnz() == faithful.nnz() == int(torch.count_nonzero(faithful.pruned_weight()))


@settings(max_examples=budget(2.0, 10))
@given(run=optimizer_runs(), rule=st.sampled_from(["sgd", "adagrad", "rowwise_adagrad"]), lr=st.floats(1e-3, 0.3),
       weight_decay=st.sampled_from([0.0, 1e-2, 0.3]), eps=st.sampled_from([1e-10, 1e-6, 1e-2]))
def test_optimizer_sgd_and_adagrad_match_reference(run, rule, lr, weight_decay, eps):
    """The fused SGD/Adagrad steps against reference.row_optimizer_step on the reference's gradients."""
    note(repr(run))
    optimizer = {"sgd": lambda: SGD(lr=lr, weight_decay=weight_decay),
                 "adagrad": lambda: Adagrad(lr=lr, eps=eps, weight_decay=weight_decay),
                 "rowwise_adagrad": lambda: Adagrad(lr=lr, eps=eps, weight_decay=weight_decay, rowwise=True)}[rule]()
    fused = make_table(run, optimizer)
    eager = make_table(run, None)
    weight, threshold = train_with_row_oracle(fused, eager, optimizer, batches(run), loss_of)
    tol = dict(rtol=1e-6, atol=1e-6) if run["dtype"] == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    assert torch.isfinite(fused.weight).all()
    torch.testing.assert_close(fused.weight.detach(), weight, **tol)
    torch.testing.assert_close(fused.threshold.detach(), threshold, **tol)
