"""The budget controller: its plan, its feedback on a model plant, and budget-pruned searches on
small synthetic runs (targets reached on schedule, no overshoot, deterministic, every mode)."""

import json
import math

import pytest
import torch

from pep_kernels.cli import main
from pep_kernels.data import make_synthetic_ctr
from pep_kernels.train import budget_counts, search
from pep_kernels.train.controller import BudgetController, cubic_planned_steps
from pep_kernels.train.report import sparse_bytes
from pep_kernels.train.spec import RunSpec

FIELD_DIMS = [400, 250, 100, 50]
BUDGETS = [0.5, 0.7, 0.8]
# 2 epochs of 4,800 examples at batch 128: 76 steps; the plan ends at step 60.
SEARCH = dict(epochs=2, lr=1e-3, batch_size=128, checkpoint_every=7, steps=60, log=lambda *_: None)


@pytest.fixture(scope="module")
def data():
    d = make_synthetic_ctr(4800, FIELD_DIMS, embedding_dim=4, seed=3)
    return d.x, d.y


def spec(mode="feature_dim", init=-8.0):
    return RunSpec("fm", FIELD_DIMS, 8, threshold_mode=mode, threshold_init=init)


def test_cubic_plan():
    counts = [500, 300, 100]
    steps = cubic_planned_steps(counts, 1000, 400)
    assert steps[-1] == 400 and steps == sorted(steps) and len(set(steps)) == 3
    # the cubic 1000 - 900 * (1 - (1 - x)^3) passes 500 at x = 1 - (4/9)^(1/3)
    assert steps[0] == round(400 * (1 - (4 / 9) ** (1 / 3)))
    controller = BudgetController(counts, steps, 1000)
    plan = [controller.planned_nnz(t) for t in range(0, 500)]
    assert plan[0] == 1000 and all(b <= a for a, b in zip(plan, plan[1:]))
    for count, step in zip(counts, steps):
        assert plan[step] == pytest.approx(count)
    # past the last planned step the plan falls on in a line, at the slope the cubic had there
    # (the cubic's derivative at x = 0.8 over the segment 300 -> 100, steps 158 to 400)
    slope = 200 * 3 * 0.2 ** 2 * 0.8 / (1 - 0.2 ** 3) / (400 - steps[1])
    assert plan[400] - plan[401] == pytest.approx(slope) and plan[400] - plan[450] == pytest.approx(50 * slope)
    assert plan[399] - plan[400] == pytest.approx(slope, rel=0.05) and controller.planned_nnz(10_000) == 0
    # budgets met at step 0 are planned one step apart and the plan holds the step-0 count for them
    assert cubic_planned_steps([900, 800, 100], 500, 100) == [1, 2, 100]
    held = BudgetController([900, 800, 100], [1, 2, 100], 500)
    assert held.planned_nnz(0) == held.planned_nnz(2) == 500
    with pytest.raises(ValueError, match="strictly increasing"):
        BudgetController(counts, [10, 10, 20], 1000)
    with pytest.raises(ValueError, match="largest first"):
        BudgetController([100, 300], [10, 20], 1000)
    with pytest.raises(ValueError, match="step budget must be a positive int"):
        cubic_planned_steps(counts, 1000, 0)


def test_controller_tracks_a_plan_whatever_the_scale_of_gk():
    """A plant: the count keeps the entries whose |W|, uniform in [0, 1], exceeds gk * t. With t
    = 1e-2 gk = 1 prunes 1% at once; with t = 1e-6 the feedback must first raise gk to ~1e4; with
    t = 1e-20 to ~e^46, as a threshold shared by many entries needs after the loss has pulled its s
    down for thousands of steps."""
    for t in (1e-2, 1e-6, 1e-20):
        controller = BudgetController([5000, 2000, 500], [100, 200, 300], 10_000)
        gk = controller.gk
        reached = {}
        for step in range(1, 400):
            nnz = round(10_000 * max(0.0, 1 - gk * t))
            for count in (5000, 2000, 500):
                if nnz <= count and count not in reached:
                    reached[count] = step
            if len(reached) == 3:
                break
            gk = controller.update(step, nnz)
        for count, planned in zip((5000, 2000, 500), (100, 200, 300)):
            assert abs(reached[count] - planned) <= 0.1 * planned, (t, reached)


def test_budget_search_passes_each_budget_on_schedule(tmp_path, data):
    summary = search(spec(), *data, tmp_path, BUDGETS, **SEARCH)
    assert summary["pruning"] == "budget" and not summary["unreached"]
    planned = [t["planned_step"] for t in summary["targets"]]
    assert planned[-1] == 60 and planned == sorted(planned)
    for target in summary["targets"]:
        assert abs(target["reached_step"] - target["planned_step"]) <= max(3, 0.1 * target["planned_step"]), summary
        assert target["nnz"] <= target["budget"]
    # no overshoot: the last snapshot is close to its budget and the search stops there
    last = summary["targets"][-1]
    assert last["nnz"] >= 0.95 * last["budget"] and summary["steps"] == last["reached_step"]
    assert json.loads((tmp_path / "search.json").read_text())["targets"] == summary["targets"]
    gks = [h[3] for h in summary["history"]]
    assert gks[0] == 1.0 and max(gks) > 1.0  # the controller, not the drift, did the pruning


def test_threshold_slope_prunes_high_dimensions_first_on_schedule(tmp_path, data):
    """With thresholds rising e^1 per dimension the controller still holds the plan, and the rows
    keep their low dimensions: the kept entries line up across rows, as they do not without it."""
    from pep_kernels.train import checkpoint

    def kept_per_dim(summary, run_dir):
        table, _ = checkpoint.load(run_dir / summary["snapshots"][-1]["path"])
        return (table["weight"] != 0).sum(0)

    sloped = RunSpec("fm", FIELD_DIMS, 8, threshold_init=-12.0, threshold_slope=1.0)
    summary = search(sloped, *data, tmp_path / "sloped", BUDGETS, **SEARCH)
    assert not summary["unreached"]
    for target in summary["targets"]:  # the tolerance of the other modes on this short plan
        assert abs(target["reached_step"] - target["planned_step"]) <= max(4, 0.15 * target["planned_step"]), summary
    plain = search(spec(init=-8.0), *data, tmp_path / "plain", BUDGETS, **SEARCH)
    kept, kept_plain = kept_per_dim(summary, tmp_path / "sloped"), kept_per_dim(plain, tmp_path / "plain")
    assert kept[:2].sum() > 0.8 * kept.sum() and kept_plain[:2].sum() < 0.5 * kept_plain.sum(), (kept, kept_plain)


def test_faithful_pruning_keeps_gk(tmp_path, data):
    summary = search(spec(init=-3.0), *data, tmp_path, BUDGETS, **dict(SEARCH, lr=1e-2, steps=None,
                                                                         pruning="faithful"))
    assert {h[3] for h in summary["history"]} == {1.0}
    assert [t["planned_step"] for t in summary["targets"]] == [None] * 3 and summary["plan"] is None
    with pytest.raises(ValueError, match="faithful pruning has no plan"):
        search(spec(), *data, tmp_path / "x", BUDGETS, **dict(SEARCH, pruning="faithful"))
    with pytest.raises(ValueError, match="unknown pruning 'magic'"):
        search(spec(), *data, tmp_path / "y", BUDGETS, **dict(SEARCH, pruning="magic"))
    logs = []
    short = search(spec(), *data, tmp_path / "z", BUDGETS, **dict(SEARCH, steps=1000, log=logs.append))
    assert "warning: the plan ends at step 1000, past the 76 steps of 2 epochs" in logs
    assert short["unreached"] and short["steps"] == 76


def test_budget_search_is_deterministic_resumes_and_fast_matches_faithful(tmp_path, data):
    whole = search(spec(), *data, tmp_path / "whole", BUDGETS, **SEARCH)
    again = search(spec(), *data, tmp_path / "again", BUDGETS, **SEARCH)
    assert again["history"] == whole["history"] and again["targets"] == whole["targets"]
    search(spec(), *data, tmp_path / "resumed", BUDGETS, **dict(SEARCH, epochs=1))  # one epoch, then resume
    resumed = search(spec(), *data, tmp_path / "resumed", BUDGETS, **SEARCH)
    assert resumed["history"] == whole["history"] and resumed["targets"] == whole["targets"]
    # gk changes the step only of looked-up rows, so fast training replays the same numbers
    fast = search(spec(), *data, tmp_path / "fast", BUDGETS, **dict(SEARCH, training="fast"))
    assert fast["history"] == whole["history"]
    with pytest.raises(ValueError, match="searched with budget pruning, not faithful"):
        search(spec(), *data, tmp_path / "whole", BUDGETS, **dict(SEARCH, steps=None, pruning="faithful"))


@pytest.mark.parametrize("mode", ["global", "dimension", "feature", "field", "field_dim"])
def test_every_threshold_mode_reaches_its_budgets(tmp_path, data, mode):
    summary = search(spec(mode), *data, tmp_path, BUDGETS, **dict(SEARCH, training="fast"))
    assert not summary["unreached"], summary["targets"]
    for target in summary["targets"]:
        assert abs(target["reached_step"] - target["planned_step"]) <= max(4, 0.15 * target["planned_step"]), mode


@pytest.mark.parametrize("mode", ["feature_dim", "feature", "global"])
def test_min_occurrences_cuts_rare_features_for_the_whole_search(tmp_path, data, mode):
    """Features seen fewer than 5 times (361 of the 800 rows here) are zeroed in the initial table
    and stay zero in every snapshot and in the last state; the other rows start as without the
    cut, the plan starts from the cut count, the budgets are still passed on schedule, and fast
    training replays the same numbers."""
    from pep_kernels.train import checkpoint

    budgets = [0.7, 0.8, 0.9]  # the cut alone takes the count to 45% sparsity
    x, _ = data
    rare = torch.cat([torch.bincount(torch.as_tensor(x)[:, f], minlength=n) < 5 for f, n in enumerate(FIELD_DIMS)])
    assert 0 < int(rare.sum()) < len(rare)
    full = search(spec(mode), *data, tmp_path / "full", budgets, **dict(SEARCH, epochs=1))
    cut = search(spec(mode), *data, tmp_path / "cut", budgets, **dict(SEARCH, min_occurrences=5))
    assert full["cut_rows"] == 0 and cut["cut_rows"] == int(rare.sum()) and cut["min_occurrences"] == 5
    initial = {name: checkpoint.load(tmp_path / name / "initial.safetensors")[0]["embedding.weight"]
               for name in ("full", "cut")}
    assert torch.equal(initial["cut"][~rare], initial["full"][~rare]) and not initial["cut"][rare].any()
    step0 = cut["snapshots"][0]["nnz"]
    assert step0 == int(torch.count_nonzero(checkpoint.load(tmp_path / "cut" / cut["snapshots"][0]["path"])[0]["weight"]))
    assert step0 < full["snapshots"][0]["nnz"] and cut["plan"]["initial_nnz"] == step0
    assert not cut["unreached"]
    for target in cut["targets"]:
        assert abs(target["reached_step"] - target["planned_step"]) <= max(4, 0.15 * target["planned_step"]), mode
    tables = [checkpoint.load(tmp_path / "cut" / snap["path"])[0]["weight"] for snap in cut["snapshots"]]
    tables.append(checkpoint.load(tmp_path / "cut" / "checkpoint.safetensors")[0]["model.embedding.weight"])
    for table in tables:
        assert not table[rare].any()
    fast = search(spec(mode), *data, tmp_path / "fast", budgets, **dict(SEARCH, min_occurrences=5, training="fast"))
    assert fast["history"] == cut["history"]
    with pytest.raises(ValueError, match="belongs to another run"):
        search(spec(mode), *data, tmp_path / "cut", budgets, **dict(SEARCH, min_occurrences=6))
    with pytest.raises(ValueError, match="min_occurrences must be an int >= 0, got -1"):
        search(spec(mode), *data, tmp_path / "bad", budgets, **dict(SEARCH, min_occurrences=-1))


@pytest.mark.parametrize("mode", ["global", "dimension", "field", "field_dim"])
def test_shared_thresholds_reach_the_last_budget_against_their_drift(tmp_path, data, mode):
    """At lr 0.1 the loss pulls a shared s down by ~0.1 a step and the count trails the plan by a
    steady margin; the plan falling on past its last step still brings the count to the last
    budget (a plan that flattened there left it unreached in every shared mode)."""
    summary = search(spec(mode), *data, tmp_path, BUDGETS, **dict(SEARCH, lr=0.1, training="fast"))
    assert not summary["unreached"], summary["targets"]
    assert summary["targets"][-1]["reached_step"] <= 1.3 * 60, summary["targets"]


def test_search_warns_when_no_gk_can_prune(tmp_path, data):
    """sigmoid(-100) is 0 in float32: no threshold scale prunes, gk climbs to the top of its range
    and the search says why its budgets are out of reach."""
    logs = []
    summary = search(spec("dimension", init=-100.0), *data, tmp_path, BUDGETS, **dict(SEARCH, log=logs.append))
    assert len(summary["unreached"]) == 3 and summary["final_nnz"] == sum(FIELD_DIMS) * 8
    warnings = [m for m in logs if "gk reached the top of its range (e^80)" in m]
    assert len(warnings) == 1, logs


def test_explicit_planned_steps_and_byte_budgets(tmp_path, data):
    table = sum(FIELD_DIMS) * 8
    target_bytes = sparse_bytes(sum(FIELD_DIMS), 8, 2000)
    assert budget_counts([f"{target_bytes}B"], table, 8) == [2000]
    assert budget_counts([f"{target_bytes + 3}B"], table, 8) == [2000]  # an entry takes 4 bytes here (bitmask rows)
    with pytest.raises(ValueError, match="needs the embedding dim"):
        budget_counts(["1000B"], table)
    with pytest.raises(ValueError, match="smaller than"):
        budget_counts(["100B"], table, 8)
    with pytest.raises(ValueError, match="neither a sparsity"):
        budget_counts(["big"], table, 8)
    summary = search(spec(), *data, tmp_path, [0.5, f"{target_bytes}B"],
                     **dict(SEARCH, steps=None, planned_steps=[20, 50]))
    assert [t["budget"] for t in summary["targets"]] == [3200, 2000]
    assert [t["planned_step"] for t in summary["targets"]] == [20, 50]
    assert all(abs(t["reached_step"] - t["planned_step"]) <= 5 for t in summary["targets"]), summary["targets"]
    with pytest.raises(ValueError, match="one planned step per budget"):
        search(spec(), *data, tmp_path / "x", [0.5, 0.7], **dict(SEARCH, steps=None, planned_steps=[20]))


def test_cli_search_plans_by_default(tmp_path, capsys):
    run = tmp_path / "run"
    main(["search", "--data", "synthetic=3000", "--out", str(run), "--budgets", "0.5", "0.7", "--epochs", "2",
          "--steps", "30", "--batch-size", "128", "--threshold-init", "-8", "--embedding-dim", "8"])
    out = capsys.readouterr().out
    assert "planned step" in out and "reached step" in out
    summary = json.loads((run / "search.json").read_text())
    assert summary["pruning"] == "budget" and summary["targets"][-1]["planned_step"] == 30
    assert (run / "planned_vs_reached.png").stat().st_size > 0
    main(["search", "--data", "synthetic=3000", "--out", str(tmp_path / "faithful"), "--budgets", "0.5",
          "--epochs", "1", "--pruning", "faithful", "--lr", "0.01", "--threshold-init", "-3"])
    assert json.loads((tmp_path / "faithful" / "search.json").read_text())["pruning"] == "faithful"
    main(["search", "--data", "synthetic=3000", "--out", str(tmp_path / "cut"), "--budgets", "0.5", "--epochs", "1",
          "--threshold-init", "-8", "--embedding-dim", "8", "--min-occurrences", "20"])
    cut = json.loads((tmp_path / "cut" / "search.json").read_text())
    assert cut["min_occurrences"] == 20 and 0 < cut["cut_rows"]
    assert "features seen fewer than 20 times" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["search", "--data", "synthetic=3000", "--out", str(tmp_path / "bad"), "--budgets", "0.5",
              "--pruning", "faithful", "--steps", "10"])
    assert "--pruning faithful has no plan" in capsys.readouterr().err
    assert math.isfinite(summary["final_nnz"])


@pytest.mark.parametrize("pruning", ["budget", "faithful"])
def test_the_controller_uses_only_the_counts_the_search_takes(tmp_path, data, monkeypatch, pruning):
    """No extra pass over the table: one count every count_every steps and one at the end, either way."""
    from pep_kernels import PEPEmbedding

    calls = []
    count = PEPEmbedding.nnz
    monkeypatch.setattr(PEPEmbedding, "nnz", lambda self: calls.append(1) or count(self))
    options = dict(SEARCH, count_every=4, training="fast", epochs=1)
    if pruning == "faithful":
        options.update(steps=None, pruning="faithful")
    summary = search(spec(), *data, tmp_path, BUDGETS, **options)
    assert len(calls) == len(summary["history"]) + 1 == summary["steps"] // 4 + 1
