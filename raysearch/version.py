"""The package's version, importable from every floor without importing the package's face."""

__version__ = "0.1.0"
