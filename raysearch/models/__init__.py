"""Models: a registry of backbones + pooling that map images to L2-normalised vectors."""

from raysearch.models.registry import (
    DEFAULT_MODEL,
    EmbeddingModel,
    ModelConfig,
    ModelSpec,
    available_models,
    build_model,
    resolve_model,
)

__all__ = [
    "DEFAULT_MODEL",
    "EmbeddingModel",
    "ModelConfig",
    "ModelSpec",
    "available_models",
    "build_model",
    "resolve_model",
]
