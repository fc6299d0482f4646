"""The worked example: a plain PyTorch DLRM, its batches and MovieLens-100K's multi-hot view; the
DLRM and a TorchRec EmbeddingBagCollection model converted, searched to a byte budget, retrained,
exported and served from stores; `pep demo --model dlrm`."""

import pytest
import torch
from torch import nn

from pep_kernels import PEPConfig, PEPEmbeddingBag, PrunedEmbeddingBag, convert, convert_to_serving
from pep_kernels.cli import main
from pep_kernels.data import BagField, CTRData, load_movielens_100k
from pep_kernels.models import DLRM, DLRMBatches
from pep_kernels.optim import Adam
from pep_kernels.train.batches import run_model
from pep_kernels.train.tables import export_stores, load_retrained_model, load_stores, retrain_model, search_model


def small_data(n=300, seed=0):
    """Two one-hot fields, one multi-hot bag (empty bags included), two dense features."""
    g = torch.Generator().manual_seed(seed)
    x = torch.stack([torch.randint(0, 11, (n,), generator=g), torch.randint(0, 5, (n,), generator=g)], 1)
    lengths = torch.randint(0, 4, (n,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    bag = BagField("tags", 7, torch.randint(0, 7, (int(offsets[-1]),), generator=g), offsets)
    dense = torch.randn(n, 2, generator=g)
    y = (torch.rand(n, generator=g) < 0.5).float()
    return CTRData(x, y, [11, 5], ["a", "b"], bags=[bag], dense=dense, dense_names=["u", "v"])


def test_dlrm_forward_is_the_reference_dlrm():
    data = small_data()
    torch.manual_seed(0)
    model = DLRM(2, DLRMBatches.tables(data), embedding_dim=4, bottom_mlp=(8,), top_mlp=(6,))
    assert list(model.embeddings) == ["a", "b", "tags"]
    assert all(isinstance(t, nn.EmbeddingBag) and t.mode == "sum" for t in model.embeddings.values())
    assert model.embeddings["a"].weight.abs().max() <= (1 / 11) ** 0.5  # the reference's uniform(+-sqrt(1/n))
    (dense, indices, offsets), _ = next(iter(DLRMBatches(data, 64, shuffle=False)))
    rows = torch.arange(64)
    bottom = torch.relu(model.bottom[2](torch.relu(model.bottom[0](dense))))
    vectors = [bottom, model.embeddings["a"].weight[data.x[rows, 0]], model.embeddings["b"].weight[data.x[rows, 1]]]
    tags = data.bags[0]
    vectors.append(torch.stack([model.embeddings["tags"].weight[tags.values[tags.offsets[i]:tags.offsets[i + 1]]].sum(0)
                                for i in range(64)]))
    dots = [(vectors[i] * vectors[j]).sum(1) for i in range(4) for j in range(i + 1, 4)]
    top_in = torch.cat([bottom, torch.stack(dots, 1)], 1)
    expected = model.top[2](torch.relu(model.top[0](top_in))).squeeze(1)
    torch.testing.assert_close(model(dense, indices, offsets), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="need ids and offsets for each of the 3 tables"):
        model(dense, indices[:2], offsets[:2])


def test_dlrm_without_dense_features():
    data = small_data()
    data = CTRData(data.x, data.y, data.field_dims, data.field_names, bags=data.bags)
    model = DLRM(0, DLRMBatches.tables(data), embedding_dim=4)
    assert model.bottom is None
    (dense, indices, offsets), y = next(iter(DLRMBatches(data, 50)))
    assert dense is None and model(dense, indices, offsets).shape == y.shape == (50,)


def test_batches_cover_every_example_once_per_epoch():
    data = small_data()
    batches = DLRMBatches(data, 64, seed=3)
    assert len(batches) == 5
    seen = []
    for (dense, indices, offsets), y in batches:
        assert [len(o) for o in offsets] == [len(y)] * 3 and torch.equal(offsets[0], torch.arange(len(y)))
        # the rows are found back from their dense features, unique per example here
        rows = [int((data.dense == d).all(1).nonzero()) for d in dense]
        seen += rows
        assert torch.equal(indices[0], data.x[rows, 0]) and torch.equal(y, data.y[rows])
        expected = torch.cat([data.bags[0].values[data.bags[0].offsets[r]:data.bags[0].offsets[r + 1]] for r in rows])
        assert torch.equal(indices[2], expected)
    assert sorted(seen) == list(range(300))
    first = [y for _, y in batches]
    batches.set_epoch(1)
    assert not all(torch.equal(a, b) for a, b in zip(first, (y for _, y in batches)))  # another order
    batches.set_epoch(0)
    assert all(torch.equal(a, b) for a, b in zip(first, (y for _, y in batches)))  # the same again


def test_movielens_100k_as_a_dlrm_sees_it():
    try:
        plain = load_movielens_100k()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    data = load_movielens_100k(genres_as_bag=True, dense=True)
    assert data.field_names == ["user_id", "item_id", "timestamp_bucket", "gender", "occupation", "zip_code"]
    kept = [plain.field_names.index(name) for name in data.field_names]
    assert torch.equal(data.x, plain.x[:, kept]) and torch.equal(data.y, plain.y)
    genres = data.bags[0]
    assert genres.name == "genres" and genres.num_values == 19
    lengths = genres.offsets[1:] - genres.offsets[:-1]
    assert int(lengths.min()) >= 1 and int(lengths.max()) == 6
    # the bag holds the genres of the genre-set token of the plain field, one id each
    token = plain.x[:, plain.field_names.index("genres")]
    for row in (0, 1, 500, 72854):
        same_token = (token == token[row]).nonzero().reshape(-1)[:2].tolist()
        bags = [genres.values[genres.offsets[r]:genres.offsets[r + 1]].tolist() for r in same_token]
        assert bags[0] == bags[-1] and bags[0] == sorted(set(bags[0]))
    assert data.dense_names == ["age", "year"]
    torch.testing.assert_close(data.dense.mean(0), torch.zeros(2), atol=1e-6, rtol=0)
    std = data.dense.std(0, correction=0)
    assert abs(float(std[0]) - 1) < 1e-5 and 0.9999 < float(std[1]) < 1  # the few rows without a year sit at the mean
    # age is monotone in the plain field's age groups
    groups = plain.x[:, plain.field_names.index("age")]
    assert all(data.dense[groups == g, 0].max() < data.dense[groups == g + 1, 0].min() for g in range(6))


# --- the worked example: converted in one call, searched to a byte budget, retrained, exported, served

QUIET = dict(log=lambda *_: None)
CONFIG = PEPConfig(threshold_init=-6.0, optimizer=Adam(lr=1e-2, weight_decay=1e-5, mode="faithful"))


def splits(data):
    n = len(data)
    ends = (0, int(0.8 * n), int(0.9 * n), n)
    return [data.take(torch.arange(a, b)) for a, b in zip(ends, ends[1:])]


@torch.no_grad()
def scores(model, batches):
    model.eval()
    return torch.cat([run_model(model, inputs) for inputs, _ in batches])


def byte_budget_flow(tmp_path, make_model, batches, budget):
    """The workflow of the README's example: search to `budget` bytes, retrain, export, serve.
    Returns the search summary, the retrain result, and the retrained and served scores."""
    train, val, test = batches
    run = search_model(convert(make_model(), CONFIG), train, tmp_path / "run", [f"{budget}B"], epochs=6, steps=60,
                       lr=1e-2, **QUIET)
    model = convert(make_model(), CONFIG)
    result = retrain_model(model, tmp_path / "run", 1, train, val, test, epochs=3, patience=1, lr=1e-2,
                           save_path=tmp_path / "retrained.safetensors", **QUIET)
    retrained = scores(model, test)
    export_stores(model, tmp_path / "stores")
    loaded, _ = load_retrained_model(convert(make_model(), CONFIG), tmp_path / "retrained.safetensors")
    served = convert_to_serving(loaded, load_stores(tmp_path / "stores"))
    return run, result, retrained, served


def test_dlrm_converted_searched_retrained_and_served(tmp_path):
    data = small_data(3000)
    batches = [DLRMBatches(data_part, 256, shuffle=i > 0) if i == 0 else DLRMBatches(data_part, 1000, shuffle=False)
               for i, data_part in enumerate(splits(data))]

    def make_model():
        torch.manual_seed(0)
        return DLRM(2, DLRMBatches.tables(data), embedding_dim=8, bottom_mlp=(8,), top_mlp=(8,))

    model = convert(make_model(), CONFIG)
    assert all(isinstance(t, PEPEmbeddingBag) for t in model.embeddings.values())
    full_bytes = 4 * 8 * (11 + 5 + 7)
    run, result, retrained, served = byte_budget_flow(tmp_path, make_model, batches, full_bytes // 2)
    assert not run["unreached"] and run["levels"][1]["store_bytes"] <= full_bytes // 2
    assert result["store_bytes"] <= full_bytes // 2 and 0.4 < result["test_auc"] <= 1
    assert all(isinstance(t, PrunedEmbeddingBag) for t in served.embeddings.values())
    assert sum(t.store.nbytes for t in served.embeddings.values()) == result["store_bytes"]
    assert torch.equal(scores(served, batches[2]), retrained)  # the stores score exactly what the model scores


def kjt_batches(data, batch_size):
    """(KeyedJaggedTensor of every field and bag, labels) batches, for a TorchRec model."""
    from torchrec import KeyedJaggedTensor

    for rows in torch.arange(len(data)).split(batch_size):
        part = data.take(rows)
        lengths = [torch.ones(len(rows), dtype=torch.int64)] * part.x.shape[1] + \
            [bag.offsets[1:] - bag.offsets[:-1] for bag in part.bags]
        values = [part.x[:, f] for f in range(part.x.shape[1])] + [bag.values for bag in part.bags]
        yield KeyedJaggedTensor.from_lengths_sync(keys=[*part.field_names, *(b.name for b in part.bags)],
                                                  values=torch.cat(values), lengths=torch.cat(lengths)), part.y


class Batches:
    def __init__(self, data, batch_size):
        self.data, self.batch_size = data, batch_size

    def __len__(self):
        return -(-len(self.data) // self.batch_size)

    def __iter__(self):
        return kjt_batches(self.data, self.batch_size)


def test_torchrec_collection_converted_searched_retrained_and_served(tmp_path):
    torchrec = pytest.importorskip("torchrec", reason="torchrec is an optional extra (requirements-torchrec.txt)")
    from pep_kernels.collection import PEPEmbeddingBagCollection

    data = small_data(3000)
    tables = DLRMBatches.tables(data)

    class CollectionModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.ebc = torchrec.EmbeddingBagCollection(tables=[
                torchrec.EmbeddingBagConfig(name=f"t_{name}", embedding_dim=8, num_embeddings=n, feature_names=[name])
                for name, n in tables.items()])
            self.top = nn.Sequential(nn.Linear(8 * len(tables), 8), nn.ReLU(), nn.Linear(8, 1))

        def forward(self, features):
            return self.top(self.ebc(features).values()).squeeze(1)

    def make_model():
        torch.manual_seed(0)
        return CollectionModel()

    original = make_model()
    model = convert(make_model(), PEPConfig(threshold_init=-150.0))
    assert isinstance(model.ebc, PEPEmbeddingBagCollection)
    # the collection's names, and a threshold beside each table's weight
    thresholds = {f"ebc.embedding_bags.t_{name}.threshold" for name in tables}
    assert set(model.state_dict()) == set(original.state_dict()) | thresholds
    features, _ = next(kjt_batches(data, 100))
    expected, got = original.ebc(features), model.ebc(features)
    assert got.keys() == expected.keys() and got.length_per_key() == expected.length_per_key()
    assert torch.equal(got.values(), expected.values())  # nothing pruned at -150: nn.EmbeddingBag's bits

    batches = [Batches(part, 256 if i == 0 else 1000) for i, part in enumerate(splits(data))]
    full_bytes = 4 * 8 * sum(tables.values())
    run, result, retrained, served = byte_budget_flow(tmp_path, make_model, batches, full_bytes // 2)
    assert not run["unreached"] and sorted(run["levels"][1]["tables"]) == [f"ebc.embedding_bags.t_{n}" for n in
                                                                          sorted(tables)]
    assert result["store_bytes"] <= full_bytes // 2
    assert all(isinstance(t, PrunedEmbeddingBag) for t in served.ebc.embedding_bags.values())
    assert torch.equal(scores(served, batches[2]), retrained)


def test_demo_runs_the_dlrm_example(tmp_path, capsys):
    main(["demo", "--model", "dlrm", "--data", "synthetic=3000", "--epochs", "2", "--out", str(tmp_path / "demo")])
    out = capsys.readouterr().out  # 6 steps cannot reach the budgets: the demo's table, without its rows
    assert "full (fp32, dense)" in out and "entries kept per table" in out and "budgets not reached" in out
    assert (tmp_path / "demo" / "demo.json").stat().st_size > 0
