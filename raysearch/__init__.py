"""raysearch: index and search very large image collections on a Ray cluster."""

from raysearch.version import __version__

__all__ = ["__version__"]
