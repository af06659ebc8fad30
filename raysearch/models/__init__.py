"""Models: a registry of backbones + pooling that map images to L2-normalised vectors.

The public names are loaded on first use, so importing `raysearch.models.names` (as the CLI does to
print its help) does not import torch.
"""

from __future__ import annotations

from typing import Any

_PUBLIC = (
    "DEFAULT_MODEL",
    "EmbeddingModel",
    "ModelConfig",
    "ModelSpec",
    "available_models",
    "build_model",
    "resolve_model",
)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        from raysearch.models import registry

        return getattr(registry, name)
    raise AttributeError(f"module 'raysearch.models' has no attribute {name!r}")


__all__ = list(_PUBLIC)
