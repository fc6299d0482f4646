"""The workflow on small synthetic runs: budgets, search snapshots and resume, retrain, metrics, files."""

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss, roc_auc_score

from pep_kernels import MaskedEmbedding, reference
from pep_kernels.data import make_synthetic_ctr
from pep_kernels.train import budget_counts, evaluate, evaluate_per_batch, retrain, search
from pep_kernels.train import checkpoint
from pep_kernels.models import FieldEmbedding
from pep_kernels.train.magnitude import magnitude_mask, magnitude_ticket
from pep_kernels.train.retrain import load_ticket
from pep_kernels.train.spec import RunSpec

FIELD_DIMS = [40, 25, 10, 5]
# lr and threshold start chosen so that a few hundred steps prune a good share of the table; the
# published recipe's pruning (the budget controller has its own tests, test_controller.py).
SEARCH = dict(epochs=3, lr=1e-2, batch_size=256, checkpoint_every=7, pruning="faithful", log=lambda *_: None)


@pytest.fixture(scope="module")
def data():
    d = make_synthetic_ctr(6000, FIELD_DIMS, embedding_dim=4, seed=3)
    return (d.x[:4800], d.y[:4800]), (d.x[4800:5400], d.y[4800:5400]), (d.x[5400:], d.y[5400:])


def spec():
    return RunSpec("fm", FIELD_DIMS, 8, threshold_init=-3.0)


def test_budget_counts():
    assert budget_counts([0.5, 0.9, 100, 0.9], 1000) == [500, 100]
    assert budget_counts([0.95], 80) == [4]
    for bad in (0, 1.5, -3, 1.0 + 1e-9):
        with pytest.raises(ValueError, match="neither a sparsity in"):
            budget_counts([bad], 1000)


def test_search_saves_initial_state_and_a_snapshot_per_budget(tmp_path, data):
    summary = search(spec(), *data[0], tmp_path, [0.2, 0.4, 0.99], **SEARCH)
    initial, meta = checkpoint.load(tmp_path / "initial.safetensors")
    assert meta["spec"] == spec().to_dict()
    assert {"embedding.weight", "embedding.threshold", "linear.weight", "bias"} <= set(initial)
    snaps = summary["snapshots"]
    step0 = reference.soft_threshold(initial["embedding.weight"], initial["embedding.threshold"])
    assert snaps[0]["step"] == 0 and snaps[0]["budget"] is None and snaps[0]["nnz"] == int(torch.count_nonzero(step0))
    reached = snaps[1:]
    assert [s["budget"] for s in reached] == [512, 384]  # 0.99 (6 non-zeros) is not reached here
    assert summary["unreached"] == [6]
    for s in reached:
        tables, m = checkpoint.load(tmp_path / s["path"])
        assert int(torch.count_nonzero(tables["weight"])) == m["nnz"] <= m["budget"]
    steps, counts = zip(*[(h[0], h[1]) for h in summary["history"]])
    assert list(steps) == list(range(1, len(steps) + 1))
    # a budget is taken at the first step whose count reaches it
    for s in reached:
        first = next(step for step, c in zip(steps, counts) if c <= s["budget"])
        assert s["step"] == first


def test_search_resumes_to_the_same_result(tmp_path, data):
    whole = search(spec(), *data[0], tmp_path / "whole", [0.2, 0.4], **SEARCH)
    cut = dict(SEARCH, epochs=1)
    search(spec(), *data[0], tmp_path / "resumed", [0.2, 0.4], **cut)  # stops after one epoch
    resumed = search(spec(), *data[0], tmp_path / "resumed", [0.2, 0.4], **SEARCH)
    assert resumed["history"] == whole["history"]
    assert [s["nnz"] for s in resumed["snapshots"]] == [s["nnz"] for s in whole["snapshots"]]
    a, _ = checkpoint.load(tmp_path / "whole" / "checkpoint.safetensors")
    b, _ = checkpoint.load(tmp_path / "resumed" / "checkpoint.safetensors")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    with pytest.raises(ValueError, match="belongs to another run"):
        search(spec(), *data[0], tmp_path / "whole", [0.2], **dict(SEARCH, seed=5))


def test_search_with_tuple_model_kwargs_resumes(tmp_path, data):
    # the checkpoint holds the spec as JSON, where (8, 8) reads back as [8, 8]: still the same run
    deep = RunSpec("deepfm", FIELD_DIMS, 8, model_kwargs={"mlp_dims": (8, 8)}, threshold_init=-3.0)
    search(deep, *data[0], tmp_path, [0.999], **dict(SEARCH, epochs=1))
    resumed = search(deep, *data[0], tmp_path, [0.999], **SEARCH)
    assert resumed["steps"] == 3 * 19  # resumed after the first epoch and ran the other two
    with pytest.raises(ValueError, match="model_kwargs must be JSON data"):
        RunSpec("deepfm", FIELD_DIMS, 8, model_kwargs={"mlp_dims": object()})


def test_fast_search_matches_faithful_and_counts_less_often(tmp_path, data):
    faithful = search(spec(), *data[0], tmp_path / "faithful", [0.2, 0.4], **SEARCH)
    fast = search(spec(), *data[0], tmp_path / "fast", [0.2, 0.4], **dict(SEARCH, training="fast"))
    assert fast["history"] == faithful["history"]  # the same numbers at every step
    assert [s["step"] for s in fast["snapshots"]] == [s["step"] for s in faithful["snapshots"]]
    a, _ = checkpoint.load(tmp_path / "faithful" / "checkpoint.safetensors")
    b, _ = checkpoint.load(tmp_path / "fast" / "checkpoint.safetensors")
    assert torch.equal(a["model.embedding.weight"], b["model.embedding.weight"])
    sparse = search(spec(), *data[0], tmp_path / "every5", [0.2, 0.4], **dict(SEARCH, training="fast", count_every=5))
    assert [h[0] for h in sparse["history"]][:3] == [5, 10, 15]
    # a budget is seen at the first counted step at or after the step it is reached
    for s, t in zip(sparse["snapshots"][1:], faithful["snapshots"][1:]):
        assert 0 <= s["step"] - t["step"] < 5 and s["nnz"] <= s["budget"]
    with pytest.raises(ValueError, match="unknown training mode 'lazy'"):
        search(spec(), *data[0], tmp_path / "bad", [0.2], **dict(SEARCH, training="lazy"))
    with pytest.raises(ValueError, match="belongs to another run"):
        search(spec(), *data[0], tmp_path / "fast", [0.2, 0.4], **SEARCH)  # a fast run resumed as faithful


def test_retrain_winning_ticket_and_control(tmp_path, data):
    summary = search(spec(), *data[0], tmp_path, [0.4], **SEARCH)
    snap = summary["snapshots"][-1]
    ticket, meta = load_ticket(tmp_path, snap["path"])
    initial, _ = checkpoint.load(tmp_path / "initial.safetensors")
    mask = checkpoint.load(tmp_path / snap["path"])[0]["weight"] != 0
    assert torch.equal(ticket.embedding.weight.detach(), initial["embedding.weight"] * mask)
    assert torch.equal(ticket.linear.weight.detach(), initial["linear.weight"])
    control, _ = load_ticket(tmp_path, snap["path"], rewind=False)
    assert not torch.equal(control.embedding.weight, ticket.embedding.weight)

    result = retrain(tmp_path, snap["path"], *data, epochs=3, patience=1, batch_size=256, log=lambda *_: None)
    assert result["nnz"] <= snap["nnz"] and result["sparsity"] >= 0.4 - 1e-9
    assert 0.5 < result["test_auc"] <= 1 and result["test_logloss"] > 0
    assert 1 <= result["best_epoch"] <= 3


def test_masked_embedding_keeps_pruned_entries_zero():
    weight = torch.randn(10, 4)
    mask = torch.rand(10, 4) > 0.5
    emb = MaskedEmbedding(weight, mask, field_dims=[6, 4])
    optimizer = torch.optim.Adam(emb.parameters(), lr=0.1, weight_decay=1e-2)
    for _ in range(5):
        optimizer.zero_grad()
        emb(torch.randint(0, 4, (8, 2))).pow(2).sum().backward()
        optimizer.step()
    assert torch.equal(emb.weight.detach()[~mask], torch.zeros(int((~mask).sum())))
    assert emb.nnz() <= int(mask.sum()) and torch.equal(emb.mask(), mask)
    with pytest.raises(IndexError, match="id 6 in field 0"):
        emb(torch.tensor([[6, 0]]))
    with pytest.raises(ValueError, match="mask of its shape"):
        MaskedEmbedding(weight, mask[:, :2])


def test_masked_embedding_without_copy_takes_the_weight_itself():
    weight = torch.randn(10, 4)
    mask = torch.rand(10, 4) > 0.5
    expected = MaskedEmbedding(weight, mask).weight.detach()
    assert not torch.equal(weight, expected)  # the copy left `weight` as it was
    emb = MaskedEmbedding(weight, mask, copy=False)
    assert emb.weight.data_ptr() == weight.data_ptr() and torch.equal(weight, expected)


def test_load_retrained_masks_the_saved_table(tmp_path):
    """A retrained model file whose table is not zero where its mask is False (a retrain never
    writes one) loads as its masked table: the model's weight is the loaded tensor, masked in place."""
    from pep_kernels.train.retrain import load_retrained

    spec = RunSpec("fm", [6, 4], 3)
    model = spec.build(MaskedEmbedding(torch.randn(10, 3), torch.rand(10, 3) > 0.5, field_dims=[6, 4]))
    state = dict(model.state_dict(), **{"embedding.weight": torch.randn(10, 3)})
    checkpoint.save(tmp_path / "model.safetensors", state, {"spec": spec.to_dict()})
    loaded, _ = load_retrained(tmp_path / "model.safetensors")
    keep = state["embedding.keep"]
    assert torch.equal(loaded.embedding.keep, keep)
    assert torch.equal(loaded.embedding.weight.detach(), torch.where(keep, state["embedding.weight"], 0.0))


def test_metrics_match_sklearn():
    torch.manual_seed(0)

    class Fixed(torch.nn.Module):
        def forward(self, x):
            return x[:, 0].float()

    x = torch.randn(3000, 1)
    y = (torch.rand(3000) < torch.sigmoid(x[:, 0])).float()
    p = torch.sigmoid(x[:, 0]).numpy()
    got = evaluate(Fixed(), x, y, batch_size=700)
    assert got["auc"] == pytest.approx(roc_auc_score(y.numpy(), p))
    assert got["logloss"] == pytest.approx(log_loss(y.numpy(), p), rel=1e-6)
    per_batch = evaluate_per_batch(Fixed(), x, y, batch_size=1024)
    expected = np.mean([roc_auc_score(y[i:i + 1024].numpy(), p[i:i + 1024]) for i in range(0, 3000, 1024)])
    assert per_batch["auc"] == pytest.approx(expected)
    with pytest.raises(ValueError, match="needs both labels"):
        evaluate(Fixed(), x, torch.ones(3000))


def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "state.safetensors"
    checkpoint.save(path, {"a": torch.ones(3)}, {"v": 1})

    def broken(tensors, filename, metadata):
        open(filename, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(path, {"a": torch.zeros(3)}, {"v": 2})
    tensors, meta = checkpoint.load(path)
    assert torch.equal(tensors["a"], torch.ones(3)) and meta == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.safetensors"]


def test_damaged_files_raise_value_error(tmp_path):
    path = tmp_path / "state.safetensors"
    checkpoint.save(path, {"a": torch.ones(3)}, {"v": 1})
    data = path.read_bytes()
    for damaged in (data[:20], b"\xff" * 64, data[:-4]):
        path.write_bytes(damaged)
        with pytest.raises(ValueError, match="not a readable pep_kernels file"):
            checkpoint.load(path)
    with pytest.raises(FileNotFoundError):
        checkpoint.load(tmp_path / "missing.safetensors")


def test_magnitude_pruning_keeps_the_largest_entries():
    weight = torch.tensor([[0.1, -0.9, 0.3], [0.0, 0.5, -0.2]])
    mask = magnitude_mask(weight, 3)
    assert torch.equal(mask, torch.tensor([[False, True, True], [False, True, False]]))
    with pytest.raises(ValueError, match=r"nnz must be in \[0, 6\], got 7"):
        magnitude_mask(weight, 7)
    spec_ = spec()
    torch.manual_seed(0)
    full = spec_.build(FieldEmbedding(FIELD_DIMS, 8))
    initial = {k: v.clone() for k, v in full.state_dict().items()}
    trained = torch.randn(80, 8)
    model = magnitude_ticket(spec_, initial, trained, 100)
    assert model.embedding.mask().sum() == 100
    kept = model.embedding.mask()
    assert trained.abs()[kept].min() >= trained.abs()[~kept].max()
    assert torch.equal(model.embedding.weight.detach(), initial["embedding.embedding.weight"] * kept)
    assert torch.equal(model.linear.weight.detach(), initial["linear.weight"])
