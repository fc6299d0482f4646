"""Helpers shared by the tests: device facts, the modes and shapes every kernel is tested on,
tolerances, and builders of lookups and oracle training runs. Import it as `from utils import ...`
(tests/ is on sys.path under pytest); conftest.py only configures pytest."""

import torch

from pep_kernels import reference, threshold_shape

HAS_CUDA = torch.cuda.is_available()
# Kernel backends and the device their tests run on.
KERNEL_BACKENDS = ["cpu", "triton"]


def backend_device(backend):
    return "cuda" if backend == "triton" and HAS_CUDA else "cpu"


MODES = ("global", "dimension", "feature", "feature_dim", "field", "field_dim")
FIELD_MODES = ("field", "field_dim")
PER_ROW_MODES = ("feature", "feature_dim")
ODD_DIMS = (1, 3, 17, 24, 33, 128)

# fp32 tolerances. Outputs differ from the reference only through the last bit of sigmoid, so
# by at most a few ulps of the threshold (<= gk): atol = 4 * eps * gk. Gradients are sums of at
# most ~100 O(1) terms added in another order: error <= 100 * 2**-24 * O(1) ~ 6e-6.
EPS32 = torch.finfo(torch.float32).eps
GRAD_TOL = dict(rtol=1e-5, atol=1e-5)


def out_tol(gk):
    return dict(rtol=1e-6, atol=4 * EPS32 * max(gk, 1.0))


def make_lookup(mode, num_rows, dim, batch=8, fields=3, device="cpu", dtype=torch.float32, seed=0,
                index_dtype=torch.int64, threshold_dtype=None):
    """A table, thresholds spread so that a good share of entries is pruned, and ids with
    duplicates. Field modes get ids of shape (batch, fields)."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(num_rows, dim, generator=gen).to(device=device, dtype=dtype)
    num_fields = fields if mode in FIELD_MODES else None
    shape = threshold_shape(mode, num_rows, dim, num_fields)
    threshold = (torch.rand(shape, generator=gen) * 2 - 1.5).to(device=device, dtype=threshold_dtype or dtype)
    ids = torch.randint(0, num_rows, (batch, fields), generator=gen).to(device=device, dtype=index_dtype)
    return ids, weight, threshold


def leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def dense(grad):
    return grad.to_dense() if grad is not None and grad.is_sparse else grad


def train_with_row_oracle(fused, eager, rule, batches, loss_of):
    """Trains `fused` (a PEPEmbedding with an SGD/Adagrad rule, per-field ids) on `batches` and
    mirrors every step on copies of `eager`'s tables with `reference.row_optimizer_step` on the
    reference's gradients; shared thresholds take a plain SGD step of 0.1 on both sides.
    Returns the oracle's (weight, threshold)."""
    per_row = fused.threshold_mode in PER_ROW_MODES
    weight, threshold = eager.weight.detach().clone(), eager.threshold.detach().clone()
    states = {name: {k: torch.zeros(shape, dtype=p.dtype) for k, shape in rule.state_shapes(p).items()}
              for name, p in (("weight", weight), ("threshold", threshold))}
    offsets = torch.tensor([0] + eager.field_dims.tolist()[:-1]).cumsum(0)
    for ids, target in batches:
        w, s = weight.clone().requires_grad_(True), threshold.clone().requires_grad_(True)
        loss_of(reference.soft_threshold_embedding(ids + offsets, w, s, fused.threshold_mode), target).backward()
        touched = torch.unique(ids + offsets)
        reference.row_optimizer_step(rule, weight, states["weight"], touched, w.grad[touched])
        if per_row:
            reference.row_optimizer_step(rule, threshold, states["threshold"], touched, s.grad[touched])
        else:
            threshold -= 0.1 * s.grad
        fused.threshold.grad = None
        loss_of(fused(ids), target).backward()
        if not per_row:
            with torch.no_grad():
                fused.threshold -= 0.1 * fused.threshold.grad
    return weight, threshold


# ------------------------------------------------------------ the line-by-line encoder (oracle)
# The Criteo and Avazu encoder as it was before the column-wise one (pep_kernels.data._streaming),
# kept here, condensed but rule for rule, as the oracle the column-wise encoder must equal:
# Python splits each line, counts every field's tokens, and numbers them by decreasing count,
# ties by token, values seen fewer than min_count times sharing the next id.


def _line_label(raw):
    if raw not in ("0", "1"):
        raise _OracleMalformed(f"label is {raw!r}")
    return int(raw)


class _OracleMalformed(Exception):
    pass


def _criteo_row(line):
    import re

    from pep_kernels.data import criteo_integer_token

    columns = line.split("\t")
    if len(columns) != 40:
        raise _OracleMalformed(f"found {len(columns)} columns")
    label = _line_label(columns[0])
    if not all(raw == "" or re.fullmatch(r"-?[0-9]+", raw) for raw in columns[1:14]):
        raise _OracleMalformed("not an integer")
    return label, [criteo_integer_token(raw) for raw in columns[1:14]] + columns[14:]


def _avazu_row_parser(header):
    from pep_kernels.data import AVAZU_FIELD_NAMES

    label_column, field_columns = header.index("click"), [header.index(name) for name in AVAZU_FIELD_NAMES]

    def parse(line):
        columns = line.split(",")
        if len(columns) != len(header):
            raise _OracleMalformed(f"found {len(columns)} columns")
        return _line_label(columns[label_column]), [columns[c] for c in field_columns]

    return parse


def line_by_line_encode(path, kind, min_count=10, max_rows=None, on_error="raise"):
    """(x int64 (n, F), y float32 (n,), field_dims, skipped lines) of a Criteo ("criteo") or Avazu
    ("avazu") file, as the line-by-line encoder made them."""
    import numpy as np
    from collections import Counter

    labels, rows, skipped = [], [], 0
    with open(path, encoding="latin-1", newline="\n") as lines:
        parse = _criteo_row if kind == "criteo" else _avazu_row_parser(lines.readline().rstrip("\r\n").split(","))
        for line in lines:
            try:
                label, row = parse(line.rstrip("\r\n"))
            except _OracleMalformed:
                if on_error == "raise":
                    raise ValueError(f"malformed line in {path}") from None
                skipped += 1
                continue
            labels.append(label)
            rows.append(row)
            if len(rows) == max_rows:
                break
    columns = list(zip(*rows))
    x, field_dims = np.empty((len(rows), len(columns)), np.int64), []
    for f, column in enumerate(columns):
        counter = Counter(column)
        frequent = sorted((v for v, c in counter.items() if c >= min_count), key=lambda v: (-counter[v], v))
        ids = {v: i for i, v in enumerate(frequent)}
        rare = [v for v, c in counter.items() if c < min_count]
        ids.update(dict.fromkeys(rare, len(frequent)))
        x[:, f] = [ids[v] for v in column]
        field_dims.append(len(frequent) + (1 if rare else 0))
    return x, np.array(labels, np.float32), field_dims, skipped
