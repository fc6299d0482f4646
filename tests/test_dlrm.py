"""The worked example: a plain PyTorch DLRM, its batches and MovieLens-100K's multi-hot view."""

import pytest
import torch
from torch import nn

from pep_kernels.data import BagField, CTRData, load_movielens_100k
from pep_kernels.models import DLRM, DLRMBatches


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
