"""What a run is made of, saved with it so that retrain and evaluate rebuild the same model."""

import json
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
    threshold_slope: float = 0.0
    gk: float = 1.0

    def __post_init__(self):
        # The saved (JSON) form, so that a spec equals itself read back from its run's files:
        # mlp_dims=(100, 100) comes back as [100, 100], and a resumed search compares the two.
        self.field_dims = list(self.field_dims)
        try:
            self.model_kwargs = json.loads(json.dumps(self.model_kwargs))
        except (TypeError, ValueError) as e:
            raise ValueError(f"model_kwargs must be JSON data (they are saved with the run), got "
                             f"{self.model_kwargs!r}: {e}") from None

    @property
    def num_embeddings(self):
        return sum(self.field_dims)

    def pep_embedding(self, backend="auto", optimizer=None):
        return PEPEmbedding(self.num_embeddings, self.embedding_dim, threshold_mode=self.threshold_mode,
                            threshold_init=self.threshold_init, threshold_slope=self.threshold_slope, gk=self.gk,
                            field_dims=self.field_dims, backend=backend, optimizer=optimizer)

    def build(self, embedding):
        try:
            return build_model(self.model, self.field_dims, embedding, **self.model_kwargs)
        except TypeError as e:  # model_kwargs the model does not take
            raise ValueError(f"model {self.model!r} cannot be built with model_kwargs {self.model_kwargs}: {e}") from None

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        """The spec saved in a run file (untrusted): ValueError naming the first bad field."""
        if not isinstance(d, dict):
            raise ValueError(f"the run spec must be a JSON object, got {type(d).__name__}")
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown run spec fields {sorted(unknown)}")
        missing = [name for name in ("model", "field_dims", "embedding_dim") if name not in d]
        if missing:
            raise ValueError(f"the run spec lacks {missing}")

        def positive_int(value):
            return isinstance(value, int) and not isinstance(value, bool) and value >= 1

        def number(value):
            return isinstance(value, (int, float)) and not isinstance(value, bool)

        checks = {
            "model": (lambda v: isinstance(v, str), "a model name"),
            "field_dims": (lambda v: isinstance(v, list) and v and all(positive_int(f) for f in v),
                           "a non-empty list of positive ints"),
            "embedding_dim": (positive_int, "a positive int"),
            "model_kwargs": (lambda v: isinstance(v, dict), "a JSON object"),
            "threshold_mode": (lambda v: isinstance(v, str), "a mode name"),
            "threshold_init": (number, "a number"),
            "threshold_slope": (number, "a number"),
            "gk": (number, "a number"),
        }
        for name, value in d.items():
            ok, what = checks[name]
            if not ok(value):
                raise ValueError(f"run spec field {name} must be {what}, got {value!r}"[:300])
        return cls(**d)
