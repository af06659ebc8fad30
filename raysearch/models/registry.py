"""Model registry: a name -> how to build the network, how to preprocess for it, and its output size.

A `ModelConfig` is what the user asks for (`--model`, `--weights`, `--pooling`, ...). `resolve_model`
fills in every default from the registry entry and returns a `ModelSpec`, which is complete: it is
written into the index manifest and is all a query server or the activation pipeline needs to embed
images exactly as the build did.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from raysearch.images import RESIZE_POLICIES
from raysearch.models import backbones, trained
from raysearch.models.names import DEFAULT_MODEL, TORCHSCRIPT_PREFIX  # noqa: F401 - re-exported
from raysearch.models.spec import IMAGENET_MEAN, IMAGENET_STD, ModelConfig, ModelSpec
from raysearch.models.pooling import POOLINGS, pool

@dataclass(frozen=True)
class _Entry:
    build: Callable[[str | None], nn.Module]   # weights path -> backbone returning a feature map
    dim: int
    input_size: int
    resize: str
    pooling: str
    needs_weights: bool
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    description: str = ""


_REGISTRY: dict[str, _Entry] = {
    "efficientnet_lite0_gem": _Entry(
        build=backbones.build_efficientnet_lite0, dim=backbones.LITE0_DIM, input_size=224,
        resize="squash", pooling="gem", needs_weights=False,
        description="EfficientNet-Lite0 (ImageNet weights bundled), GeM p=3, 1280-d",
    ),
    "resnet50_gem": _Entry(
        build=lambda w: backbones.build_resnet(50, w), dim=2048, input_size=288,
        resize="squash", pooling="gem", needs_weights=True,
        description="torchvision ResNet-50 trunk, GeM p=3, 2048-d; --weights PATH required",
    ),
    "resnet101_gem": _Entry(
        build=lambda w: backbones.build_resnet(101, w), dim=2048, input_size=288,
        resize="squash", pooling="gem", needs_weights=True,
        description="torchvision ResNet-101 trunk, GeM p=3, 2048-d; --weights PATH required",
    ),
}
TORCHSCRIPT_INPUT_SIZE = 288


def available_models() -> dict[str, str]:
    """Registered names with a one-line description (plus the torchscript:PATH form)."""
    out = {name: e.description for name, e in _REGISTRY.items()}
    out[TORCHSCRIPT_PREFIX + "PATH"] = "any TorchScript model: normalised image batch -> vectors (e.g. SSCD)"
    return out


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def resolve_model(config: ModelConfig) -> ModelSpec:
    """Check the user's model choice and fill in the registry defaults. Raises ValueError early."""
    if config.pooling is not None and config.pooling not in POOLINGS:
        raise ValueError(f"--pooling must be one of {POOLINGS}, got {config.pooling!r}")
    if config.resize is not None and config.resize not in RESIZE_POLICIES:
        raise ValueError(f"--resize must be one of {RESIZE_POLICIES}, got {config.resize!r}")
    if config.input_size is not None and not (32 <= config.input_size <= 4096):
        raise ValueError(f"--input-size must be between 32 and 4096, got {config.input_size}")
    if not config.scales or any(not (0.1 <= s <= 2.0) for s in config.scales):
        raise ValueError(f"scales must be between 0.1 and 2.0, got {config.scales}")
    if config.gem_p <= 0:
        raise ValueError(f"gem_p must be positive, got {config.gem_p}")
    weights = config.weights
    if weights is not None:
        weights = os.path.abspath(os.path.expanduser(weights))
        if not os.path.isfile(weights):
            raise ValueError(f"--weights: no such file {config.weights!r}")

    if config.name.startswith(TORCHSCRIPT_PREFIX):
        path = os.path.abspath(os.path.expanduser(config.name[len(TORCHSCRIPT_PREFIX):]))
        if not os.path.isfile(path):
            raise ValueError(f"--model {config.name!r}: no such TorchScript file {path}")
        if config.pooling is not None:
            raise ValueError("--pooling does not apply to a TorchScript model (it pools itself)")
        input_size = config.input_size or TORCHSCRIPT_INPUT_SIZE
        partial = ModelSpec(
            name=TORCHSCRIPT_PREFIX + path, dim=0, input_size=input_size,
            resize=config.resize or "squash", mean=IMAGENET_MEAN, std=IMAGENET_STD, pooling=None,
            gem_p=config.gem_p, weights=None, weights_sha256=_sha256(path), scales=tuple(config.scales),
        )
        # The output size is whatever the scripted model produces: run it once to find out.
        with torch.no_grad():
            out = load_torchscript(path)(torch.zeros(1, 3, input_size, input_size))
        if out.ndim != 2:
            raise ValueError(f"TorchScript model {path} must return (batch, dim) vectors, got shape {tuple(out.shape)}")
        return dataclasses.replace(partial, dim=int(out.shape[1]))

    if config.name not in _REGISTRY and trained.is_model_dir_name(config.name):
        # A model directory written by `raysearch train` (model.json + its TorchScript file).
        return trained.resolve_trained_model(config)
    entry = _REGISTRY.get(config.name)
    if entry is None:
        names = ", ".join(sorted(_REGISTRY)) + f", {TORCHSCRIPT_PREFIX}PATH"
        raise ValueError(f"unknown model {config.name!r}; choose one of: {names}")
    if entry.needs_weights and weights is None:
        raise ValueError(f"model {config.name!r} needs --weights PATH (a local torchvision state dict)")
    if weights is None:
        weights_path = None
        digest = None
    else:
        weights_path = weights
        digest = _sha256(weights)
    return ModelSpec(
        name=config.name, dim=entry.dim, input_size=config.input_size or entry.input_size,
        resize=config.resize or entry.resize, mean=entry.mean, std=entry.std,
        pooling=config.pooling or entry.pooling, gem_p=config.gem_p, weights=weights_path,
        weights_sha256=digest, scales=tuple(config.scales),
    )


def load_torchscript(path: str) -> torch.jit.ScriptModule:
    try:
        with warnings.catch_warnings():
            # TorchScript is deprecated in favour of torch.export, but published copy-detection
            # models (SSCD) ship as TorchScript files: loading them stays supported.
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(path, map_location="cpu").eval()
    except Exception as e:  # torch raises RuntimeError/ValueError variants for bad files
        raise ValueError(f"cannot load TorchScript model {path}: {e}") from e


class EmbeddingModel(nn.Module):
    """Float RGB images in [0, 1], shape (B, 3, H, W) -> L2-normalised descriptors (B, dim).

    Normalisation (mean/std), the backbone, pooling and multi-scale combination all live here, so
    the same module serves the build, the query path and (differentiably) image activation.
    """

    def __init__(self, spec: ModelSpec, trunk: nn.Module, pools_itself: bool):
        super().__init__()
        self.spec = spec
        self.trunk = trunk
        self.pools_itself = pools_itself
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)

    def _describe(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        # float(): under bf16 autocast (GPU) the trunk returns bf16; GeM's cube and mean, and the
        # descriptor itself, stay float32 (a no-op in float32).
        out = self.trunk(x).float()
        if not self.pools_itself:
            out = pool(out, self.spec.pooling or "gem", self.spec.gem_p)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.spec.scales) == 1 and self.spec.scales[0] == 1.0:
            return F.normalize(self._describe(x), dim=-1)
        # Multi-scale: describe the image at each scale, combine the L2-normalised descriptors
        # with a generalised mean (p = gem_p) over scales, then normalise again.
        descs = []
        for s in self.spec.scales:
            xs = x if s == 1.0 else F.interpolate(
                x, scale_factor=s, mode="bilinear", align_corners=False, antialias=True
            )
            descs.append(F.normalize(self._describe(xs), dim=-1))
        stacked = torch.stack(descs, dim=0)
        if self.pools_itself:
            # Scripted models may output signed descriptors, where a power mean is undefined.
            return F.normalize(stacked.mean(dim=0), dim=-1)
        p = self.spec.gem_p
        combined = stacked.clamp(min=1e-6).pow(p).mean(dim=0).pow(1.0 / p)
        return F.normalize(combined, dim=-1)


def build_model(spec: ModelSpec, device: str | torch.device = "cpu", for_inference: bool = False) -> EmbeddingModel:
    """Instantiate the network for `spec`, in eval mode on `device`.

    Parameters
    ----------
    spec : the resolved model.
    device : where its weights go.
    for_inference : also fold batch norms into the convolutions (`backbones.fold_batchnorm`) and
        store the weights channels_last (NHWC): the layout oneDNN and cuDNN run fastest, 1.65x on
        2 CPU threads for EfficientNet-Lite0. Outputs equal the plain model's within 1e-6 cosine
        (tests/unit/test_embed_speed.py); gradients with respect to the input still flow
        (activation), but the weights can no longer be trained.

    Returns
    -------
    EmbeddingModel
    """
    if trained.is_trained_spec(spec):
        model = EmbeddingModel(spec, trained.load_trained_torchscript(spec), pools_itself=True)
    elif spec.name.startswith(TORCHSCRIPT_PREFIX):
        trunk: nn.Module = load_torchscript(spec.name[len(TORCHSCRIPT_PREFIX):])
        model = EmbeddingModel(spec, trunk, pools_itself=True)
    else:
        entry = _REGISTRY[spec.name]
        model = EmbeddingModel(spec, entry.build(spec.weights), pools_itself=False)
    model = model.eval()
    if for_inference:
        if not isinstance(model.trunk, torch.jit.ScriptModule):
            # A TorchScript trunk is kept as it is: it may not be traceable, and freezing it
            # (torch.jit.freeze) would drop the input gradient that activation needs.
            model.trunk = backbones.fold_batchnorm(model.trunk)
        model = model.to(memory_format=torch.channels_last)
    return model.to(device)
