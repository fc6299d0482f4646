"""CTR models over any embedding module with the (B, F) -> (B, F, d) contract.

Every model of MODELS is `Model(field_dims, embedding, **hyper_parameters)` and returns logits of
shape (B,). `DLRM` is apart: a plain PyTorch model with its own tables (one `nn.EmbeddingBag` per
feature), as users bring theirs to `pep_kernels.convert`.
"""

from .autoint import AutoInt
from .dcn import DCNv2
from .dlrm import DLRM, DLRMBatches
from .fm import DeepFM, FactorizationMachine
from .layers import FieldEmbedding, LinearTerm, MultiLayerPerceptron
from .lr import LogisticRegression
from .widedeep import WideAndDeep

MODELS = {
    "lr": LogisticRegression,
    "fm": FactorizationMachine,
    "deepfm": DeepFM,
    "autoint": AutoInt,
    "dcnv2": DCNv2,
    "widedeep": WideAndDeep,
}


def build_model(name, field_dims, embedding, **kwargs):
    """The model called `name` (a key of MODELS), so run configs can name their model."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names are {', '.join(MODELS)}")
    return MODELS[name](field_dims, embedding, **kwargs)


__all__ = [
    "MODELS", "AutoInt", "DCNv2", "DLRM", "DLRMBatches", "DeepFM", "FactorizationMachine", "FieldEmbedding",
    "LinearTerm", "LogisticRegression", "MultiLayerPerceptron", "WideAndDeep", "build_model",
]
