"""Errors a user can fix (bad input, bad data, an unfinished run). The CLI turns each into a one-line
message and exit code 2. This module imports nothing heavy, so the CLI can catch them cheaply."""


class RaysearchError(Exception):
    """Base class of raysearch's own user-facing errors."""


class EmbeddingError(RaysearchError, RuntimeError):
    """The embedding stage could not finish (too many bad images, mismatched resume, ...)."""


class IndexFormatError(RaysearchError, ValueError):
    """The index directory is incomplete, corrupt or not a raysearch index."""


class ActivationError(RaysearchError, RuntimeError):
    """Activation could not finish (too many unusable images, mismatched resume, ...)."""
