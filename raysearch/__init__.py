"""raysearch: index and search very large image collections on a Ray cluster.

The Python API (`open_index`, `build`, `Collection`, `Hit`: raysearch.api) is imported on first
use, so `import raysearch` stays light (no torch, Ray or FAISS). The build pipeline itself lives
in `raysearch.builder`.
"""

from raysearch.version import __version__

API_NAMES = ("Collection", "Hit", "build", "open_index")


def __getattr__(name: str):
    if name in API_NAMES:
        from raysearch import api

        return getattr(api, name)
    raise AttributeError(f"module 'raysearch' has no attribute {name!r}")


__all__ = ["__version__", *API_NAMES]
