"""raysearch: index and search very large image collections on a Ray cluster."""

__version__ = "0.1.0"
