"""What a model is, as data: the user's choice (ModelConfig) and the resolved, complete description
(ModelSpec) stored in manifests. No torch here, so services that only read manifests stay light."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from raysearch.models.names import DEFAULT_MODEL

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelConfig:
    """What the user asked for; None means "the registry's default for this model"."""

    name: str = DEFAULT_MODEL
    weights: str | None = None
    pooling: str | None = None
    gem_p: float = 3.0
    input_size: int | None = None
    resize: str | None = None
    scales: tuple[float, ...] = (1.0,)


@dataclass(frozen=True)
class ModelSpec:
    """A fully resolved model: everything needed to rebuild it and preprocess for it."""

    name: str
    dim: int
    input_size: int
    resize: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pooling: str | None
    gem_p: float
    weights: str | None
    weights_sha256: str | None
    scales: tuple[float, ...] = (1.0,)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"model spec has unknown fields {sorted(unknown)}")
        d = dict(d)
        for key in ("mean", "std", "scales"):
            if key in d and d[key] is not None:
                d[key] = tuple(d[key])
        return cls(**d)


def vectors_model_spec(dim: int, name: str = "external-vectors") -> ModelSpec:
    """A ModelSpec for vectors that no registered model made (they can be searched by vector, not
    by image)."""
    return ModelSpec(
        name=name, dim=dim, input_size=224, resize="squash", mean=IMAGENET_MEAN, std=IMAGENET_STD,
        pooling=None, gem_p=3.0, weights=None, weights_sha256=None,
    )
