"""Model names, importable without torch (the CLI needs them to print its help quickly)."""

DEFAULT_MODEL = "efficientnet_lite0_gem"
TORCHSCRIPT_PREFIX = "torchscript:"
