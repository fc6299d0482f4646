"""One training step of the embedding part on CPU, against the baselines of
../shared/BENCHMARKING.md, on the shapes `criteo`, `avazu` and `skewed` (feature_dim thresholds,
make_inputs' tables: about half of the entries pruned).

    pip install --no-deps -r benchmarks/requirements-fbgemm.txt  # the FBGEMM baseline
    pytest benchmarks/test_train_step.py --benchmark-group-by=group

A step looks up a (B, F) batch of ids, takes the loss (out * target).sum() with a fixed random
target, runs backward and the optimizer's update:

- "pep fast" (the candidate): `PEPEmbedding(optimizer=Adam(mode="fast", lr=1e-3,
  weight_decay=1e-5))`; the update of the looked-up rows of W and s is fused into the backward.
- "pep faithful": the same with `mode="faithful"` (every row of W, s and their moments, every step).
- "eager": the published recipe, `pep_kernels.reference.soft_threshold_embedding` on dense W and s
  Parameters, backward, `torch.optim.Adam([W, s], lr=1e-3, weight_decay=1e-5).step()`,
  `zero_grad(set_to_none=True)`.
- "compiled eager": `torch.compile` of that whole step function, optimizer step included. Dynamo
  breaks the graph at the reference's id range check (`.item()`) and at `backward()`, so it runs
  as compiled graphs: forward + loss (with its compiled backward) and the Adam update.
- "pep fast rowwise adagrad": `PEPEmbedding(optimizer=Adagrad(rowwise=True))`, like for like with
  FBGEMM (it updates two tables, W and the per-row thresholds s; FBGEMM updates W).
- "fbgemm rowwise adagrad": FBGEMM's `SplitTableBatchedEmbeddingBagsCodegen`, one N x d table on
  the host (`EmbeddingLocation.HOST`, `ComputeDevice.CPU`, `EXACT_ROWWISE_ADAGRAD`), one id per
  bag; the update is fused into the backward. Omitted, with a warning, when `fbgemm_gpu` does not
  import.
- "floor": `index_select` of the W rows and s rows: the forward's memory traffic, no backward.

Every call of a candidate takes the next of BATCHES pre-drawn batches of ids, in the same order
for every candidate: `fast` Adam's cost depends on how long ago each looked-up row was last
updated, so repeating one batch would hide it.

`fast` Adam catches a row up on its skipped steps when the row is next looked up: step by step
for gaps of up to 4 steps, in one closed-form segment per 256 steps beyond. Its cost grows with
the gaps, so a fresh table's steps are cheap and grow until the gaps reach their steady state (after
about 100 steps on `criteo` and about 1000 on `skewed`). A training run spends nearly all its
steps in that steady state, so the candidate's table starts there: `age` sets its step counter
to AGE and each row's last update to where AGE steps on the shape's id distribution leave it.
The other candidates' costs do not depend on the past.
"""

import itertools
import warnings

import pytest
import torch
from torch import nn

from pep_kernels import PEPEmbedding, reference
from pep_kernels.optim import Adagrad, Adam
import fbgemm_baselines as fb
from fbgemm_baselines import FBGEMM_MISSING
from shapes import SHAPES, lookup_probabilities, make_ids, make_inputs


SHAPE_NAMES = ("criteo", "avazu", "skewed")
BATCHES = 64
LR, WEIGHT_DECAY = 1e-3, 1e-5  # the published PEP recipe
ADAGRAD_LR, ADAGRAD_EPS = 1e-2, 1e-8  # both row-wise Adagrads; FBGEMM's default eps
AGE = 10_000  # steps of training behind the candidate's table: the steady state on every shape


def age(table, shape, generator):
    """Puts the replay bookkeeping of a `fast` Adam table where AGE training steps on the shape's
    ids leave it: step counter AGE, and each row last updated a geometric number of steps ago
    (its chance per step is that of being looked up in a batch), at step 0 if not in AGE steps.
    The values of W, s and their moments stay as they are: the cost does not depend on them."""
    looked_up = -torch.expm1(shape.lookups * torch.log1p(-lookup_probabilities(shape)))
    uniform = 1 - torch.rand(shape.rows, generator=generator, dtype=torch.float64)  # (0, 1]: finite log
    steps_ago = torch.floor(torch.log(uniform) / torch.log1p(-looked_up))
    last_update = (AGE - steps_ago).clamp(min=0).long()
    state = table.state_dict()
    state.update(optimizer_step=torch.tensor(AGE), weight_last_step=last_update, threshold_last_step=last_update)
    table.load_state_dict(state)


def train_steps(shape):
    """name -> step(ids) for every candidate; all tables start as make_inputs' W and s."""
    _, weight, threshold, gk = make_inputs(shape)
    gen = torch.Generator().manual_seed(1)
    target = torch.randn(shape.batch, shape.fields, shape.dim, generator=gen)

    def loss(out):
        return (out.view(target.shape) * target).sum()

    def pep(optimizer):
        table = PEPEmbedding(shape.rows, shape.dim, threshold_mode="feature_dim", gk=gk, optimizer=optimizer)
        with torch.no_grad():
            table.weight.copy_(weight)
            table.threshold.copy_(threshold)
        return table

    def fused(table):
        return lambda ids: loss(table(ids)).backward()

    def eager():
        w, s = nn.Parameter(weight.clone()), nn.Parameter(threshold.clone())
        adam = torch.optim.Adam([w, s], lr=LR, weight_decay=WEIGHT_DECAY)

        def step(ids):
            loss(reference.soft_threshold_embedding(ids, w, s, "feature_dim", gk)).backward()
            adam.step()
            adam.zero_grad(set_to_none=True)

        return step

    def fbgemm():
        tbe = fb.SplitTableBatchedEmbeddingBagsCodegen(
            [(shape.rows, shape.dim, fb.EmbeddingLocation.HOST, fb.ComputeDevice.CPU)],
            optimizer=fb.OptimType.EXACT_ROWWISE_ADAGRAD, learning_rate=ADAGRAD_LR, eps=ADAGRAD_EPS,
        )
        tbe.split_embedding_weights()[0].copy_(weight)
        offsets = torch.arange(shape.lookups + 1)
        return lambda ids: loss(tbe(ids.reshape(-1), offsets)).backward()

    def floor(ids):
        flat = ids.reshape(-1)
        return torch.index_select(weight, 0, flat), torch.index_select(threshold, 0, flat)

    fast = pep(Adam(lr=LR, weight_decay=WEIGHT_DECAY, mode="fast"))
    age(fast, shape, gen)
    steps = {
        "pep fast": fused(fast),
        "pep faithful": fused(pep(Adam(lr=LR, weight_decay=WEIGHT_DECAY, mode="faithful"))),
        "eager": eager(),
        # dynamic=False: each shape gets its own static-shape graphs, not a dynamic-shape recompile.
        "compiled eager": torch.compile(eager(), dynamic=False),
        "pep fast rowwise adagrad": fused(pep(Adagrad(lr=ADAGRAD_LR, eps=ADAGRAD_EPS, rowwise=True))),
    }
    if FBGEMM_MISSING:
        warnings.warn(f"fbgemm_gpu does not import ({FBGEMM_MISSING}): the FBGEMM baseline is omitted", stacklevel=1)
    else:
        steps["fbgemm rowwise adagrad"] = fbgemm()
    steps["floor"] = floor
    return steps


def cycling(step, batches):
    """A call of `step` on the next batch at every call, in the order of `batches`."""
    order = itertools.cycle(batches)
    return lambda: step(next(order))


@pytest.mark.parametrize("name", SHAPE_NAMES)
def test_train_step(benchmark, interleaved, name):
    shape = SHAPES[name]
    batches = make_ids(shape, torch.Generator().manual_seed(2), BATCHES)
    fns = {label: cycling(step, batches) for label, step in train_steps(shape).items()}
    benchmark.group = f"train step {name}"
    interleaved(benchmark.group, "pep fast", fns,
                case={"pass": "train step", "shape": name, "mode": "feature_dim", "dtype": "float32"})
    benchmark(fns["pep fast"])
