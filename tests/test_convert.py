"""pep_kernels.convert (conversion.py): a user's model converted in one call (weights and contract
kept, values and gradients against the reference, a trajectory against torch's Adam), the serving
swap, bad input."""

import pytest
import torch
from torch import nn

from utils import GRAD_TOL, out_tol
from pep_kernels import (MaskedEmbedding, MaskedEmbeddingBag, PEPEmbedding, PEPEmbeddingBag, PrunedEmbedding,
                         PrunedEmbeddingBag, SparseRowStore, reference)
from pep_kernels import PEPConfig, convert, convert_to_serving
from pep_kernels.conversion import pep_tables
from pep_kernels.optim import Adam


class TwoTables(nn.Module):
    """A user's model: two tables of their own sizes and widths, ids of any shape, an MLP."""

    def __init__(self):
        super().__init__()
        self.user = nn.Embedding(37, 5)
        self.history = nn.Sequential(nn.Embedding(23, 3, padding_idx=0))
        self.head = nn.Linear(5 + 3, 1)

    def forward(self, user, history):
        return self.head(torch.cat([self.user(user), self.history(history).sum(1)], 1)).squeeze(1)


def inputs(batch=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 37, (batch,), generator=g), torch.randint(0, 23, (batch, 4), generator=g)


def test_convert_swaps_every_table_keeping_its_weights():
    torch.manual_seed(0)
    model = TwoTables()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    same = convert(model, PEPConfig(threshold_mode="feature", threshold_init=-4.0))
    assert same is model
    tables = pep_tables(model)
    assert list(tables) == ["user", "history.0"]
    assert [(t.num_embeddings, t.embedding_dim, t.threshold_mode) for t in tables.values()] == \
        [(37, 5, "feature"), (23, 3, "feature")]
    assert torch.equal(tables["user"].weight, before["user.weight"])
    assert torch.equal(tables["history.0"].weight, before["history.0.weight"])
    assert torch.equal(model.head.weight, before["head.weight"])  # the rest is untouched
    assert (tables["user"].threshold == -4.0).all()


def test_convert_with_thresholds_off_scores_what_the_model_scored():
    """sigmoid(-150) is 0 in float32: nothing is pruned, and the converted model's outputs and
    gradients are the original's, bit for bit (the forward contract is kept)."""
    torch.manual_seed(0)
    original = TwoTables()
    converted = convert(TwoTables(), PEPConfig(threshold_init=-150.0))
    converted.load_state_dict({k: v for k, v in original.state_dict().items()}, strict=False)
    for table, source in ((converted.user, original.user), (converted.history[0], original.history[0])):
        with torch.no_grad():
            table.weight.copy_(source.weight)
    user, history = inputs()
    assert torch.equal(converted(user, history), original(user, history))
    converted(user, history).sum().backward()
    original(user, history).sum().backward()
    assert torch.equal(converted.user.weight.grad, original.user.weight.grad)
    assert torch.equal(converted.history[0].weight.grad, original.history[0].weight.grad)


@pytest.mark.parametrize("mode", ["global", "dimension", "feature", "feature_dim"])
def test_converted_tables_match_the_reference(mode):
    torch.manual_seed(0)
    model = convert(TwoTables(), PEPConfig(threshold_mode=mode, threshold_init=-1.5))
    with torch.no_grad():
        for table in pep_tables(model).values():
            table.threshold.add_(torch.rand_like(table.threshold))  # thresholds apart from each other
    user, history = inputs()
    out = model(user, history)
    weights = {fqn: t.weight.detach().clone().requires_grad_() for fqn, t in pep_tables(model).items()}
    thresholds = {fqn: t.threshold.detach().clone().requires_grad_() for fqn, t in pep_tables(model).items()}
    user_rows = reference.soft_threshold_embedding(user, weights["user"], thresholds["user"], mode)
    history_rows = reference.soft_threshold_embedding(history, weights["history.0"], thresholds["history.0"], mode)
    expected = model.head(torch.cat([user_rows, history_rows.sum(1)], 1)).squeeze(1)
    torch.testing.assert_close(out, expected, **out_tol(1.0))
    out.sum().backward()
    expected.sum().backward()
    for fqn, table in pep_tables(model).items():
        torch.testing.assert_close(table.weight.grad, weights[fqn].grad, **GRAD_TOL)
        torch.testing.assert_close(table.threshold.grad, thresholds[fqn].grad, **GRAD_TOL)


def test_converted_model_trains_as_the_published_recipe():
    """Fused faithful Adam in every converted table against torch's Adam on the reference's dense
    gradients of a reference model with the same weights: 20 steps to fp32 tolerance."""
    torch.manual_seed(0)
    model = convert(TwoTables(), PEPConfig(threshold_init=-3.0, optimizer=Adam(lr=1e-2, weight_decay=1e-3,
                                                                               mode="faithful")))
    tables = pep_tables(model)
    params = {fqn: (t.weight.detach().clone().requires_grad_(), t.threshold.detach().clone().requires_grad_())
              for fqn, t in tables.items()}
    head = nn.Linear(8, 1)
    head.load_state_dict(model.head.state_dict())
    oracle = torch.optim.Adam([p for pair in params.values() for p in pair] + list(head.parameters()), lr=1e-2,
                              weight_decay=1e-3)
    rest = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)  # W and s have no .grad: skipped
    for step in range(20):
        user, history = inputs(seed=step)
        target = torch.rand(16)
        rest.zero_grad()
        nn.functional.mse_loss(model(user, history), target).backward()
        rest.step()
        oracle.zero_grad()
        rows = [reference.soft_threshold_embedding(ids, *params[fqn], "feature_dim")
                for ids, fqn in ((user, "user"), (history, "history.0"))]
        nn.functional.mse_loss(head(torch.cat([rows[0], rows[1].sum(1)], 1)).squeeze(1), target).backward()
        oracle.step()
    for fqn, table in tables.items():
        torch.testing.assert_close(table.weight.detach(), params[fqn][0].detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(table.threshold.detach(), params[fqn][1].detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.head.weight, head.weight, rtol=1e-5, atol=1e-6)


def test_filter_fn_picks_the_tables():
    torch.manual_seed(0)
    seen = []

    def only_user(module, fqn):
        seen.append((type(module).__name__, fqn))
        return fqn == "user"

    model = convert(TwoTables(), PEPConfig(), filter_fn=only_user)
    assert isinstance(model.user, PEPEmbedding) and type(model.history[0]) is nn.Embedding
    assert seen == [("Embedding", "user"), ("Embedding", "history.0")]  # asked about tables only


def test_a_table_converts_itself():
    table = nn.Embedding(10, 4)
    pep = convert(table, PEPConfig())
    assert isinstance(pep, PEPEmbedding) and torch.equal(pep.weight, table.weight)


def test_convert_refuses_what_pep_cannot_keep():
    with pytest.raises(ValueError, match="user: max_norm=1.0"):
        convert(nn.ModuleDict({"user": nn.Embedding(5, 2, max_norm=1.0)}))
    with pytest.raises(ValueError, match="user: scale_grad_by_freq"):
        convert(nn.ModuleDict({"user": nn.Embedding(5, 2, scale_grad_by_freq=True)}))
    frozen = nn.Embedding.from_pretrained(torch.randn(5, 2))
    with pytest.raises(ValueError, match="user: the table is frozen"):
        convert(nn.ModuleDict({"user": frozen}))
    padded = nn.Embedding(5, 2, padding_idx=1)
    with torch.no_grad():
        padded.weight[1] = 1.0
    with pytest.raises(ValueError, match="the row of padding_idx 1 must be zeros"):
        convert(nn.ModuleDict({"user": padded}))
    with pytest.raises(ValueError, match="threshold_mode must be one of"):
        PEPConfig(threshold_mode="field")
    with pytest.raises(ValueError, match="threshold_init must be a finite number"):
        PEPConfig(threshold_init=float("nan"))
    with pytest.raises(TypeError, match="optimizer must be None or a pep_kernels.optim rule"):
        PEPConfig(optimizer=torch.optim.Adam)
    with pytest.raises(TypeError, match="config must be a PEPConfig"):
        convert(TwoTables(), {"threshold_mode": "feature"})


def test_a_padding_row_stays_zero():
    torch.manual_seed(0)
    model = convert(TwoTables(), PEPConfig(threshold_init=-6.0, optimizer=Adam(lr=0.1, weight_decay=1e-2)))
    for step in range(5):
        user, history = inputs(seed=step)
        history[:, 0] = 0  # the padding id in every example
        model(user, history).square().sum().backward()
    assert not model.history[0].pruned_weight()[0].any()
    assert model.history[0].pruned_weight()[1:].any()


def test_convert_to_serving_scores_what_the_trained_model_scores(tmp_path):
    torch.manual_seed(0)
    model = convert(TwoTables(), PEPConfig(threshold_init=-2.0, optimizer=Adam(lr=0.05, weight_decay=1e-3)))
    for step in range(10):
        user, history = inputs(seed=step)
        model(user, history).square().mean().backward()
    model.history[0] = MaskedEmbedding(model.history[0].weight.detach(), model.history[0].mask())  # retrained twin
    user, history = inputs(seed=99)
    expected = model(user, history)
    stores = {"user": SparseRowStore.from_module(model.user)}
    with pytest.raises(ValueError, match=r"missing \['history.0'\]"):
        convert_to_serving(model, stores)
    stores["history.0"] = SparseRowStore.from_module(model.history[0])
    stores["history.0"].save(tmp_path / "history.store")
    stores["history.0"] = SparseRowStore.load(tmp_path / "history.store")
    convert_to_serving(model, stores)
    assert isinstance(model.user, PrunedEmbedding) and isinstance(model.history[0], PrunedEmbedding)
    assert torch.equal(model(user, history), expected)
    with pytest.raises(ValueError, match="holds no PEP or retrained table"):
        convert_to_serving(model)
    wrong = convert(TwoTables(), PEPConfig())
    with pytest.raises(ValueError, match="user: the store holds a 23 x 3 table, the model's is 37 x 5"):
        convert_to_serving(wrong, {"user": stores["history.0"], "history.0": stores["history.0"]})


BAG_FORMS = {  # nn.EmbeddingBag settings, and its input: (input, offsets, per_sample_weights)
    "sum": (dict(mode="sum"), "offsets"),
    "mean": (dict(mode="mean"), "offsets"),
    "2d": (dict(mode="mean"), "2d"),
    "weighted": (dict(mode="sum"), "weighted"),
    "last_offset": (dict(mode="sum", include_last_offset=True), "last_offset"),
    "padding": (dict(mode="mean", padding_idx=2), "offsets"),
}


def bag_input(form, num_rows=29, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, num_rows, (24,), generator=g)
    ids[:6] = 2  # duplicates, and the padding id
    offsets = torch.tensor([0, 3, 3, 10, 17])  # an empty bag
    if form == "2d":
        return ids.view(4, 6), None, None
    if form == "last_offset":
        return ids, torch.cat([offsets, torch.tensor([24])]), None
    return ids, offsets, torch.rand(24, generator=g) if form == "weighted" else None


@pytest.mark.parametrize("form", BAG_FORMS)
def test_bags_convert_with_their_contract(form):
    """Unpruned (threshold -150), a converted nn.EmbeddingBag pools what it did, bit for bit, in
    every form of its input, and backpropagates it (a row's gradient sums its lookups' in another
    order: to fp32 tolerance)."""
    settings, kind = BAG_FORMS[form]
    torch.manual_seed(0)
    bag = nn.EmbeddingBag(29, 6, **settings)
    model = convert(nn.ModuleDict({"bag": bag}), PEPConfig(threshold_init=-150.0))
    pep = model["bag"]
    assert isinstance(pep, PEPEmbeddingBag) and torch.equal(pep.weight, bag.weight)
    assert (pep.mode, pep.include_last_offset, pep.padding_idx) == (bag.mode, bag.include_last_offset, bag.padding_idx)
    ids, offsets, weights = bag_input(kind)
    assert torch.equal(pep(ids, offsets, weights), bag(ids, offsets, weights))
    pep(ids, offsets, weights).sum().backward()
    bag(ids, offsets, weights).sum().backward()
    torch.testing.assert_close(pep.weight.grad, bag.weight.grad, **GRAD_TOL)


@pytest.mark.parametrize("mode", ["global", "dimension", "feature", "feature_dim"])
@pytest.mark.parametrize("form", ["mean", "weighted", "padding"])
def test_converted_bags_match_the_reference(mode, form):
    settings, kind = BAG_FORMS[form]
    torch.manual_seed(0)
    pep = convert(nn.EmbeddingBag(29, 6, **settings), PEPConfig(threshold_mode=mode, threshold_init=-2.0))
    with torch.no_grad():
        pep.weight.mul_(4.0)
        pep.threshold.add_(torch.rand_like(pep.threshold))
    weight, threshold = pep.weight.detach().clone().requires_grad_(), pep.threshold.detach().clone().requires_grad_()
    ids, offsets, weights = bag_input(kind)
    out = pep(ids, offsets, weights)
    expected = reference.soft_threshold_embedding_bag(ids, weight, threshold, offsets, mode, pooling=pep.mode,
                                                      per_sample_weights=weights, padding_idx=pep.padding_idx)
    assert 0 < int(pep.nnz()) < 29 * 6  # some entries pruned, some kept
    torch.testing.assert_close(out, expected, **out_tol(1.0))
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(pep.weight.grad, weight.grad, **GRAD_TOL)
    torch.testing.assert_close(pep.threshold.grad, threshold.grad, **GRAD_TOL)


def test_bags_pep_cannot_keep_are_refused():
    with pytest.raises(ValueError, match="bag: mode 'max'; PEP bags pool by 'sum' or 'mean'"):
        convert(nn.ModuleDict({"bag": nn.EmbeddingBag(5, 2, mode="max")}))
    with pytest.raises(ValueError, match="bag: max_norm"):
        convert(nn.ModuleDict({"bag": nn.EmbeddingBag(5, 2, max_norm=2.0)}))


def test_trained_bags_serve_from_their_stores():
    torch.manual_seed(0)
    model = convert(nn.ModuleDict({"a": nn.EmbeddingBag(29, 6, mode="sum", padding_idx=2),
                                   "b": nn.EmbeddingBag(29, 6, mode="sum", include_last_offset=True)}),
                    PEPConfig(threshold_init=-2.0, optimizer=Adam(lr=0.05, weight_decay=1e-3)))
    a_input, b_input = bag_input("offsets"), bag_input("last_offset")
    for _ in range(10):
        (model["a"](*a_input).square().mean() + model["b"](*b_input).square().mean()).backward()
    model["b"] = MaskedEmbeddingBag(model["b"].weight.detach(), model["b"].mask(), mode="sum",
                                    include_last_offset=True)  # its retrained twin
    expected = model["a"](*a_input), model["b"](*b_input)
    convert_to_serving(model)
    assert isinstance(model["a"], PrunedEmbeddingBag) and isinstance(model["b"], PrunedEmbeddingBag)
    assert torch.equal(model["a"](*a_input), expected[0]) and torch.equal(model["b"](*b_input), expected[1])


def test_torchrec_collection_converts_table_by_table():
    torchrec = pytest.importorskip("torchrec", reason="torchrec is an optional extra (requirements-torchrec.txt)")
    from pep_kernels.collection import PEPEmbeddingBagCollection

    torch.manual_seed(0)
    ebc = torchrec.EmbeddingBagCollection(is_weighted=True, tables=[
        torchrec.EmbeddingBagConfig(name="t1", embedding_dim=4, num_embeddings=10, feature_names=["f1", "f2"]),
        torchrec.EmbeddingBagConfig(name="t2", embedding_dim=3, num_embeddings=7, feature_names=["f3"])])
    features = torchrec.KeyedJaggedTensor.from_lengths_sync(
        keys=["f1", "f2", "f3"], values=torch.tensor([1, 2, 3, 4, 5, 6, 0, 1, 6]),
        lengths=torch.tensor([2, 0, 1, 1, 2, 3]), weights=torch.rand(9))
    expected = ebc(features)
    seen = []
    model = convert(nn.ModuleDict({"ebc": ebc}), PEPConfig(threshold_init=-150.0),
                    filter_fn=lambda module, fqn: seen.append(fqn) or fqn.endswith("t1"))
    assert seen == ["ebc.embedding_bags.t1", "ebc.embedding_bags.t2"]
    converted = model["ebc"]
    assert isinstance(converted, PEPEmbeddingBagCollection) and converted.is_weighted()
    assert isinstance(converted.embedding_bags["t1"], PEPEmbeddingBag)
    assert converted.embedding_bags["t2"] is ebc.embedding_bags["t2"]  # left as it was
    got = converted(features)
    assert got.keys() == ["f1", "f2", "f3"] and got.length_per_key() == [4, 4, 3]
    assert torch.equal(got.values(), expected.values())
    untouched = convert(nn.ModuleDict({"ebc": ebc}), PEPConfig(), filter_fn=lambda module, fqn: False)
    assert untouched["ebc"] is ebc
    with pytest.raises(ValueError, match=r"lacks the features \['f3'\]"):
        converted(torchrec.KeyedJaggedTensor.from_lengths_sync(keys=["f1", "f2"], values=torch.tensor([1]),
                                                               lengths=torch.tensor([1, 0]), weights=torch.ones(1)))
