"""What a run is made of, saved with it so that retrain and evaluate rebuild the same model."""

from dataclasses import asdict, dataclass, field

from ..models import build_model
from ..modules import PEPEmbedding


@dataclass
class RunSpec:
    model: str  # a name of pep_kernels.models.build_model
    field_dims: list
    embedding_dim: int
    model_kwargs: dict = field(default_factory=dict)
    threshold_mode: str = "feature_dim"
    threshold_init: float = -15.0
    gk: float = 1.0

    @property
    def num_embeddings(self):
        return sum(self.field_dims)

    def pep_embedding(self, backend="auto", optimizer=None):
        return PEPEmbedding(self.num_embeddings, self.embedding_dim, threshold_mode=self.threshold_mode,
                            threshold_init=self.threshold_init, gk=self.gk, field_dims=self.field_dims, backend=backend,
                            optimizer=optimizer)

    def build(self, embedding):
        return build_model(self.model, self.field_dims, embedding, **self.model_kwargs)

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown run spec fields {sorted(unknown)}")
        return cls(**d)
