"""The workflow on a user's model with several PEP tables (pep_kernels.train.tables): one budget
for the whole model (shared or split evenly), snapshots of every table, resume, retrain, export,
serving from the stores."""

import json

import pytest
import torch
from torch import nn

from pep_kernels import MaskedEmbedding, PEPEmbedding, PrunedEmbedding, SparseRowStore
from pep_kernels import PEPConfig, convert, convert_to_serving
from pep_kernels.conversion import pep_tables
from pep_kernels.data import make_synthetic_ctr
from pep_kernels.optim import Adam
from pep_kernels.store import encoded_nbytes
from pep_kernels.train import checkpoint, search
from pep_kernels.train.batches import TensorBatches
from pep_kernels.train.spec import RunSpec
from pep_kernels.train.tables import (ModelBudgets, export_stores, level_masks, load_retrained_model, load_stores,
                                      retrain_model, search_model)

FIELD_DIMS = [60, 30, 12]
QUIET = dict(log=lambda *_: None)


class ThreeTables(nn.Module):
    """Three features, each its own table of its own size and width."""

    def __init__(self):
        super().__init__()
        self.tables = nn.ModuleDict({"a": nn.Embedding(60, 8), "b": nn.Embedding(30, 4), "c": nn.Embedding(12, 6)})
        self.mlp = nn.Sequential(nn.Linear(18, 16), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, x):
        return self.mlp(torch.cat([table(x[:, f]) for f, table in enumerate(self.tables.values())], 1)).squeeze(1)


def make_model(seed=0):
    torch.manual_seed(seed)
    return convert(ThreeTables(), PEPConfig(threshold_init=-6.0, optimizer=Adam(lr=1e-2, weight_decay=1e-5)))


@pytest.fixture(scope="module")
def data():
    d = make_synthetic_ctr(6000, FIELD_DIMS, embedding_dim=4, seed=3)
    parts = (slice(0, 4800), slice(4800, 5400), slice(5400, 6000))
    return [(d.x[p], d.y[p]) for p in parts]


def batches(part, batch_size=256):
    return TensorBatches(*part, batch_size)


# 4 epochs of 19 steps; the plan ends at step 60
SEARCH = dict(epochs=4, steps=60, lr=1e-2, checkpoint_every=7, **QUIET)


def test_model_budgets():
    shapes = {"a": (60, 8), "b": (30, 4), "c": (12, 6)}  # 480 + 120 + 72 = 672 entries
    plan = ModelBudgets([0.5, 100, 0.5], shapes)
    assert plan.unit == "entries" and plan.totals == plan.costs == [336, 100]
    even = plan.groups("even")
    assert even["a"] == (["a"], [240, 71]) and even["b"] == (["b"], [60, 17]) and even["c"] == (["c"], [36, 10])
    assert plan.groups("shared") == {"all": (["a", "b", "c"], [336, 100])}
    in_bytes = ModelBudgets(["2000B"], shapes)
    offsets = 4 * (61 + 31 + 13)
    assert in_bytes.unit == "bytes" and in_bytes.costs == [2000 - offsets]
    assert in_bytes.cost({"a": 10, "b": 1, "c": 0}) == 5 * 11  # a 4-byte value and a 1-byte column id each
    with pytest.raises(ValueError, match="all be bytes"):
        ModelBudgets(["2000B", 0.5], shapes)
    with pytest.raises(ValueError, match="smaller than the stores of these tables with one non-zero"):
        ModelBudgets([f"{offsets + 4}B"], shapes)
    with pytest.raises(ValueError, match="neither a sparsity"):
        ModelBudgets([1.5], shapes)


def test_encoded_nbytes_is_the_stores_size():
    torch.manual_seed(0)
    for shape, density in (((50, 8), 0.1), ((50, 8), 0.9), ((7, 300), 0.05), ((20, 1), 0.5)):
        table = torch.randn(shape) * (torch.rand(shape) < density)
        dims = (table != 0).sum(1)
        store = SparseRowStore.from_dense(table)
        assert encoded_nbytes(*shape, int(dims.sum()), int(dims.count_nonzero())) == store.nbytes


def test_shared_budget_in_bytes_over_every_table(tmp_path, data):
    model = make_model()
    # the full tables' stores take 3206 bytes (dense fp32: 2688)
    summary = search_model(model, batches(data[0]), tmp_path, ["2500B", "1800B"], **SEARCH)
    assert summary["unit"] == "bytes" and summary["budgets"] == [2500, 1800] and not summary["unreached"]
    history = summary["history"]
    assert summary["history_columns"] == ["step", "nnz:tables.a", "nnz:tables.b", "nnz:tables.c", "gk:all"]
    levels = summary["levels"]
    assert [lv["level"] for lv in levels] == [0, 1, 2]
    assert levels[0]["store_bytes"] == 3206
    for level, total in zip(levels[1:], (2500, 1800)):
        assert level["store_bytes"] <= total
        (group, step), = level["steps"].items()
        assert group == "all" and level["files"] == [f"snapshot-level{level['level']}-all.safetensors"]
        tables, meta = checkpoint.load(tmp_path / level["files"][0])
        assert meta["step"] == step and sorted(tables) == ["tables.a", "tables.b", "tables.c"]
        row = next(h for h in history if h[0] == step)
        for i, fqn in enumerate(sorted(tables)):
            report = level["tables"][fqn]
            dims = (tables[fqn] != 0).sum(1)
            assert report["nnz"] == int(dims.sum()) == row[1 + i]
            assert report["dims_per_row_histogram"] == torch.bincount(dims, minlength=tables[fqn].shape[1] + 1).tolist()
            assert report["store_bytes"] == SparseRowStore.from_dense(tables[fqn]).nbytes
        # taken at the first step whose column-id store of all three tables (offsets: 4 (61 + 31 + 13) bytes,
        # 5 bytes an entry) fits the budget: one count, and one gk, for the model
        assert step == next(h[0] for h in history if 4 * 105 + 5 * sum(h[1:4]) <= total)
    assert json.loads((tmp_path / "search.json").read_text())["levels"] == levels


def test_even_split_gives_every_table_its_share(tmp_path, data):
    model = make_model()
    summary = search_model(model, batches(data[0]), tmp_path, [0.5, 0.8], allocation="even", **SEARCH)
    assert set(summary["groups"]) == {"tables.a", "tables.b", "tables.c"}
    assert summary["history_columns"][-3:] == ["gk:tables.a", "gk:tables.b", "gk:tables.c"]
    for level in summary["levels"][1:]:
        assert sorted(level["steps"]) == ["tables.a", "tables.b", "tables.c"] and len(level["files"]) == 3
        for fqn, report in level["tables"].items():
            assert report["nnz"] <= summary["groups"][fqn]["budgets"][level["level"] - 1]
        assert level["nnz"] <= summary["budgets"][level["level"] - 1]
    masks = level_masks(tmp_path, 2)
    assert {fqn: int(m.sum()) for fqn, m in masks.items()} == \
        {fqn: r["nnz"] for fqn, r in summary["levels"][2]["tables"].items()}


def test_one_table_searches_as_the_single_table_search(tmp_path, data):
    """A model holding one PEP table follows the trajectory of `search` on the same model: the
    same counts and gk after every step, the same snapshot steps."""
    spec = RunSpec("fm", FIELD_DIMS, 8, threshold_init=-6.0)
    single = search(spec, *data[0], tmp_path / "single", [0.5, 0.8], epochs=3, steps=40, lr=1e-2, batch_size=256,
                    training="faithful", **QUIET)
    torch.manual_seed(0)
    model = spec.build(spec.pep_embedding(optimizer=Adam(lr=1e-2, weight_decay=1e-5, mode="faithful")))
    multi = search_model(model, batches(data[0]), tmp_path / "multi", [0.5, 0.8], epochs=3, steps=40, lr=1e-2,
                         **QUIET)
    assert len(single["snapshots"]) == 3 and len(multi["history"]) > 30  # both budgets, over 30 steps
    assert [[h[0], h[1], h[3]] for h in single["history"]] == [[h[0], h[1], h[2]] for h in multi["history"]]
    assert [s["step"] for s in single["snapshots"]] == [lv["step"] for lv in multi["levels"]]


def test_search_resumes_to_the_same_result(tmp_path, data):
    whole = search_model(make_model(), batches(data[0]), tmp_path / "whole", [0.5, 0.8], allocation="even", **SEARCH)
    search_model(make_model(), batches(data[0]), tmp_path / "resumed", [0.5, 0.8], allocation="even",
                 **dict(SEARCH, epochs=1))  # stops after one epoch
    resumed = search_model(make_model(), batches(data[0]), tmp_path / "resumed", [0.5, 0.8], allocation="even",
                           **SEARCH)
    assert resumed["history"] == whole["history"] and resumed["levels"] == whole["levels"]
    a, _ = checkpoint.load(tmp_path / "whole" / "checkpoint.safetensors")
    b, _ = checkpoint.load(tmp_path / "resumed" / "checkpoint.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="belongs to another run.*allocation"):
        search_model(make_model(), batches(data[0]), tmp_path / "whole", [0.5, 0.8], **SEARCH)


def test_retrain_export_and_serve(tmp_path, data):
    train, val, test = (batches(part, 1024) for part in data)
    summary = search_model(make_model(), batches(data[0]), tmp_path / "run", ["2000B"], **SEARCH)
    initial, _ = checkpoint.load(tmp_path / "run" / "initial.safetensors")
    masks = level_masks(tmp_path / "run", 1)

    model = make_model(seed=5)  # made the same way, other draws: the retrain rewinds it to the run's step 0
    result = retrain_model(model, tmp_path / "run", 1, train, val, test, epochs=3, patience=1, lr=1e-2,
                           save_path=tmp_path / "retrained.safetensors", checkpoint_dir=tmp_path / "ckpt", **QUIET)
    assert all(isinstance(t, MaskedEmbedding) for t in model.tables.values())
    for fqn, mask in masks.items():
        table = model.get_submodule(fqn)
        assert torch.equal(table.keep, mask)
        assert not table.weight[~mask].any()  # pruned entries stayed zero through the retrain
        assert result["tables"][fqn]["nnz"] <= int(mask.sum())
    assert result["store_bytes"] <= 2000 and 0.5 < result["test_auc"] <= 1 and 1 <= result["best_epoch"] <= 3
    assert summary["levels"][1]["nnz"] >= result["nnz"]

    # the ticket: the run's initial weights times the mask, every other parameter at its step-0 value
    ticket = make_model(seed=5)
    retrain_model(ticket, tmp_path / "run", 1, train, val, test, epochs=1, patience=1, lr=0.0, **QUIET)
    assert torch.equal(ticket.tables.a.weight.detach(), initial["tables.a.weight"] * masks["tables.a"])
    assert torch.equal(ticket.mlp[0].weight.detach(), initial["mlp.0.weight"])

    loaded, meta = load_retrained_model(make_model(seed=7), tmp_path / "retrained.safetensors")
    assert meta["retrain"]["test_auc"] == result["test_auc"]
    x = data[2][0]
    loaded.eval()
    expected = loaded(x)
    assert torch.equal(expected, model.eval()(x))
    paths = export_stores(loaded, tmp_path / "stores")
    assert sorted(p.name for p in paths.values()) == ["tables.a.store", "tables.b.store", "tables.c.store"]
    stores = load_stores(tmp_path / "stores")
    assert sum(s.nbytes for s in stores.values()) == result["store_bytes"]
    convert_to_serving(loaded, stores)
    assert all(isinstance(t, PrunedEmbedding) for t in loaded.tables.values())
    assert torch.equal(loaded(x), expected)  # the stores score exactly what the retrained model scores


def test_bad_runs_are_refused(tmp_path, data):
    with pytest.raises(ValueError, match="holds no PEP table: convert it first"):
        search_model(ThreeTables(), batches(data[0]), tmp_path, [0.5], **SEARCH)
    with pytest.raises(ValueError, match="unknown allocation 'greedy'"):
        search_model(make_model(), batches(data[0]), tmp_path, [0.5], allocation="greedy", **SEARCH)
    with pytest.raises(ValueError, match="give the plan's step budget as steps"):
        search_model(make_model(), iter(batches(data[0])), tmp_path, [0.5], **dict(SEARCH, steps=None))
    search_model(make_model(), batches(data[0]), tmp_path / "run", [0.5], **SEARCH)
    other = convert(nn.ModuleDict({"a": nn.Embedding(60, 8)}), PEPConfig())
    with pytest.raises(ValueError, match="searched other tables"):
        retrain_model(other, tmp_path / "run", 1, batches(data[1]), batches(data[1]), **QUIET)
    with pytest.raises(ValueError, match="has no snapshot of level 3"):
        retrain_model(make_model(), tmp_path / "run", 3, batches(data[1]), batches(data[1]), **QUIET)
    with pytest.raises(ValueError, match="is not a search run folder"):
        retrain_model(make_model(), tmp_path, 1, batches(data[1]), batches(data[1]), **QUIET)
    assert isinstance(pep_tables(make_model())["tables.a"], PEPEmbedding)


@pytest.mark.parametrize("form", ["offsets", "2d", "include_last_offset", "per_sample_weights", "padding", "mean"])
def test_masked_bag_pools_the_masked_table_and_keeps_pruned_entries_zero(form):
    from pep_kernels import MaskedEmbeddingBag

    torch.manual_seed(0)
    weight, mask = torch.randn(20, 5), torch.rand(20, 5) > 0.5
    mode = "mean" if form == "mean" else "sum"
    kwargs = dict(mode=mode, include_last_offset=form == "include_last_offset",
                  padding_idx=3 if form == "padding" else None)
    bag = MaskedEmbeddingBag(weight, mask, **kwargs)
    ids = torch.tensor([3, 1, 3, 7, 7, 19, 0, 3])
    offsets = torch.tensor([0, 2, 2, 5]) if form != "include_last_offset" else torch.tensor([0, 2, 2, 5, 8])
    args = (ids.view(2, 4), None) if form == "2d" else (ids, offsets)
    psw = torch.rand(8) if form == "per_sample_weights" else None
    expected = nn.functional.embedding_bag(args[0], weight * mask, args[1], mode=mode, per_sample_weights=psw,
                                           include_last_offset=kwargs["include_last_offset"],
                                           padding_idx=kwargs["padding_idx"])
    assert torch.equal(bag(*args, per_sample_weights=psw), expected)
    optimizer = torch.optim.Adam(bag.parameters(), lr=0.1, weight_decay=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        bag(*args, per_sample_weights=psw).square().sum().backward()
        optimizer.step()
    assert not bag.weight.detach()[~mask].any() and bag.weight.detach()[mask].ne(weight[mask]).any()
    with pytest.raises(IndexError, match="out of range"):
        bag(torch.tensor([20]), torch.tensor([0]))
    with pytest.raises(ValueError, match="bag offsets must be non-decreasing"):
        bag(torch.tensor([1, 2, 3]), torch.tensor([0, 2, 1, 3] if kwargs["include_last_offset"] else [0, 2, 1]))
    with pytest.raises(ValueError, match="unknown mode 'max'"):
        MaskedEmbeddingBag(weight, mask, mode="max")


def test_faithful_pruning_leaves_gk_alone_and_counts_every_n_steps(tmp_path, data):
    summary = search_model(make_model(), batches(data[0]), tmp_path, [0.3], pruning="faithful", count_every=3,
                           **dict(SEARCH, steps=None))
    assert summary["plan"] is None and [h[0] for h in summary["history"][:3]] == [3, 6, 9]
    assert all(h[-1] == 1.0 for h in summary["history"])
    with pytest.raises(ValueError, match="faithful pruning has no plan"):
        search_model(make_model(), batches(data[0]), tmp_path / "x", [0.3], pruning="faithful", **SEARCH)
