"""CTR models: every model with a full table and with PEP, the shared layers, the factory."""

import pytest
import torch
from torch import nn

from pep_kernels import PEPEmbedding
from pep_kernels.models import MODELS, FieldEmbedding, LinearTerm, LogisticRegression, build_model
from pep_kernels.models.autoint import FieldSelfAttention
from pep_kernels.models.dcn import CrossNetworkV2
from pep_kernels.models.fm import pairwise_interaction

FIELD_DIMS = [5, 7, 3]
DIM = 4
BATCH = 16
# Small hyper-parameters so that every model runs in milliseconds; the extra cases cover the
# other structural options.
CASES = [
    pytest.param("lr", {}, id="lr"),
    pytest.param("fm", {}, id="fm"),
    pytest.param("deepfm", dict(mlp_dims=(8, 8)), id="deepfm"),
    pytest.param("autoint", dict(atten_embed_dim=8, num_layers=2, mlp_dims=(8,)), id="autoint"),
    pytest.param("autoint", dict(atten_embed_dim=8, num_layers=1, mlp_dims=(8,), has_residual=False),
                 id="autoint-no-residual"),
    pytest.param("dcnv2", dict(num_cross_layers=2, mlp_dims=(8, 8)), id="dcnv2"),
    pytest.param("dcnv2", dict(num_cross_layers=2, mlp_dims=(8, 8), structure="stacked"), id="dcnv2-stacked"),
    pytest.param("widedeep", dict(mlp_dims=(8, 8)), id="widedeep"),
]
TABLES = ["full", "pep"]


def make_model(name, table, kwargs):
    dim = 1 if name == "lr" else DIM
    if table == "full":
        embedding = FieldEmbedding(FIELD_DIMS, dim)
    else:  # a threshold start at which some entries are pruned and the thresholds get gradients
        embedding = PEPEmbedding(sum(FIELD_DIMS), dim, field_dims=FIELD_DIMS, threshold_init=-3.0, backend="cpu")
    return build_model(name, FIELD_DIMS, embedding, **kwargs)


def random_ids(batch=BATCH):
    return torch.stack([torch.randint(0, n, (batch,)) for n in FIELD_DIMS], 1)


def test_every_model_has_a_case():
    assert {case.values[0] for case in CASES} == set(MODELS)


@pytest.mark.parametrize("table", TABLES)
@pytest.mark.parametrize("name, kwargs", CASES)
def test_logits_have_shape_batch_and_are_finite(name, kwargs, table):
    model = make_model(name, table, kwargs)
    x = random_ids()
    for train in (True, False):
        out = model.train(train)(x)
        assert out.shape == (BATCH,) and out.dtype == torch.float32
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("table", TABLES)
@pytest.mark.parametrize("name, kwargs", CASES)
def test_backward_reaches_every_parameter(name, kwargs, table):
    model = make_model(name, table, kwargs)
    x, y = random_ids(), torch.randint(0, 2, (BATCH,)).float()
    nn.functional.binary_cross_entropy_with_logits(model(x), y).backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None, param_name
        assert torch.isfinite(param.grad).all(), param_name
    # Biases in front of a BatchNorm have a zero gradient by construction; the embedding must not.
    for param_name, param in model.embedding.named_parameters():
        assert param.grad.abs().sum() > 0, param_name


@pytest.mark.parametrize("table", TABLES)
@pytest.mark.parametrize("name, kwargs", CASES)
def test_adam_lowers_the_loss_on_a_learnable_task(name, kwargs, table):
    model = make_model(name, table, kwargs)
    x = random_ids(64)
    y = (x[:, 0] % 2).float()  # the parity of field 0's id: linear in the one-hot features

    def eval_loss():
        with torch.no_grad():
            return nn.functional.binary_cross_entropy_with_logits(model.eval()(x), y).item()

    before = eval_loss()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(30):
        optimizer.zero_grad()
        nn.functional.binary_cross_entropy_with_logits(model.train()(x), y).backward()
        optimizer.step()
    assert eval_loss() < 0.8 * before


@pytest.mark.parametrize("table", TABLES)
@pytest.mark.parametrize("name, kwargs", CASES)
def test_eval_is_deterministic_and_seed_fixes_the_model(name, kwargs, table):
    x = random_ids()
    outputs = []
    for _ in range(2):
        torch.manual_seed(3)
        model = make_model(name, table, kwargs).eval()
        with torch.no_grad():
            first, second = model(x), model(x)
        assert torch.equal(first, second)
        outputs.append(first)
    assert torch.equal(*outputs)


def test_build_model_names_the_valid_models():
    with pytest.raises(ValueError, match="'mlp'.*lr, fm, deepfm, autoint, dcnv2, widedeep"):
        build_model("mlp", FIELD_DIMS, FieldEmbedding(FIELD_DIMS, DIM))


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="embedding_dim 1.*got 4"):
        LogisticRegression(FIELD_DIMS, FieldEmbedding(FIELD_DIMS, DIM))
    with pytest.raises(ValueError, match="structure"):
        build_model("dcnv2", FIELD_DIMS, FieldEmbedding(FIELD_DIMS, DIM), structure="serial")
    with pytest.raises(TypeError, match="embedding_dim"):
        build_model("deepfm", FIELD_DIMS, nn.Identity())


def test_linear_term_checks_field_ids():
    linear = LinearTerm(FIELD_DIMS)
    assert torch.equal(linear(random_ids()), torch.zeros(BATCH))  # zero-initialised
    with pytest.raises(IndexError, match="id 7 in field 1"):
        linear(torch.tensor([[0, 7, 0]]))


def test_pairwise_interaction_is_the_sum_over_field_pairs():
    v = torch.randn(BATCH, len(FIELD_DIMS), DIM)
    pairs = [(f, g) for f in range(len(FIELD_DIMS)) for g in range(f + 1, len(FIELD_DIMS))]
    expected = sum((v[:, f] * v[:, g]).sum(1) for f, g in pairs)
    torch.testing.assert_close(pairwise_interaction(v), expected)


def test_cross_layers_follow_dcn_v2():
    cross = CrossNetworkV2(6, 2)
    x0 = torch.randn(BATCH, 6)
    x1 = x0 * cross.layers[0](x0) + x0
    x2 = x0 * cross.layers[1](x1) + x1
    torch.testing.assert_close(cross(x0), x2)


@pytest.mark.parametrize("heads", [1, 2])
def test_field_self_attention_is_torchs_multihead_attention(heads):
    torch.manual_seed(0)
    attention = FieldSelfAttention(8, heads)
    x = torch.randn(BATCH, 9, 8, requires_grad=True)
    x_reference = x.detach().clone().requires_grad_()
    out = attention(x)
    expected = nn.MultiheadAttention.forward(attention, x_reference, x_reference, x_reference, need_weights=False)[0]
    # fp32, sums of at most 3 * 8 products in another order: a few ulps of values of order 1.
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x.grad, x_reference.grad, rtol=1e-6, atol=1e-6)


def test_field_self_attention_drops_attention_weights_only_in_training():
    attention = FieldSelfAttention(8, 2, dropout=0.5)
    x = torch.randn(BATCH, 3, 8)
    torch.testing.assert_close(attention.eval()(x), attention(x))
    assert not torch.allclose(attention.train()(x), attention.eval()(x))
