"""The network being trained: a registry backbone (or a TorchScript one) cut into blocks, GeM pooling,
an optional linear projection (randomly initialised, or a fitted whitening of the unit descriptors)
and L2 normalisation.

`DescriptorNet` maps a normalised batch (B, 3, S, S) float to (B, d) unit vectors. Its first
`n_frozen` blocks take no gradient and run in eval mode (BatchNorm keeps its ImageNet statistics),
which on a CPU is what makes fine-tuning affordable. `export_torchscript` writes the same function
as a TorchScript file, the form `raysearch build --model MODEL_DIR` loads.
"""

from __future__ import annotations

import copy
import io
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from raysearch.models.pooling import gem
from raysearch.models.registry import TORCHSCRIPT_PREFIX, build_model, resolve_model
from raysearch.models.spec import IMAGENET_MEAN, IMAGENET_STD, ModelConfig
from raysearch.train.config import PROJECTION_INITS


@dataclass(frozen=True)
class InitModel:
    """What training starts from, as recorded in model.json."""

    name: str
    weights: str | None
    weights_sha256: str | None
    input_size: int
    resize: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def backbone_blocks(trunk: nn.Module) -> list[nn.Module]:
    """The trunk of a registry model as the ordered blocks that `train_blocks` counts from the end.

    EfficientNet-Lite0: stem, its 16 inverted-residual blocks, head conv (18 blocks). ResNet:
    stem (conv1, bn1, relu, maxpool), then every bottleneck of layer1..layer4 (17 for ResNet-50).
    Anything else is one block.
    """
    if all(hasattr(trunk, a) for a in ("stem", "blocks", "head")) and isinstance(trunk.blocks, nn.Sequential):
        return [trunk.stem, *trunk.blocks, trunk.head]
    body = getattr(trunk, "body", None)
    if isinstance(body, nn.Sequential) and len(body) == 8:
        return [nn.Sequential(*body[:4]), *body[4], *body[5], *body[6], *body[7]]
    return [trunk]


class InputNormalizer:
    """View pixels, uint8 (B, S, S, 3), -> the network's input on `device`: (B, 3, S, S) float in
    [0, 1], normalised with the init model's mean and std. The training loop and the projection's
    fit both feed the network through it, so the fit sees exactly what training sees."""

    def __init__(self, mean, std, device) -> None:
        self.device = device
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)

    def __call__(self, pixels) -> torch.Tensor:
        x = torch.from_numpy(pixels).to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
        return (x - self.mean) / self.std


class L2Normalize(nn.Module):
    """Rows scaled to unit length (the input of a whitened projection, fitted on unit descriptors)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1)


def make_projection(features: int, dim: int | None, init: str = "random") -> nn.Module:
    """The projection after pooling. 'random': a linear map to `dim` (torch's default
    initialisation) or none without `dim`. 'whitening': L2 normalisation then a linear map to `dim`
    (default: `features`), whose weights `set_projection` fills with a fitted whitening
    (raysearch.train.whitening)."""
    if init not in PROJECTION_INITS:
        raise ValueError(f"--init-projection must be one of {PROJECTION_INITS}, got {init!r}")
    if init == "whitening":
        return nn.Sequential(L2Normalize(), nn.Linear(features, dim or features))
    return nn.Linear(features, dim) if dim else nn.Identity()


def set_projection(net: "DescriptorNet", weight, bias) -> None:
    """Load a fitted (dim, features) weight and (dim,) bias into a whitening projection."""
    linear = net.projection[-1] if isinstance(net.projection, nn.Sequential) else None
    if not isinstance(linear, nn.Linear):
        raise ValueError("the network has no whitening projection to load (build it with init='whitening')")
    weight, bias = torch.as_tensor(weight, dtype=torch.float32), torch.as_tensor(bias, dtype=torch.float32)
    if tuple(weight.shape) != tuple(linear.weight.shape) or tuple(bias.shape) != tuple(linear.bias.shape):
        raise ValueError(f"projection of shape {tuple(weight.shape)} does not fit the network's {tuple(linear.weight.shape)}")
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)


class _Descriptor(nn.Module):
    """The exported function: blocks -> GeM (unless the trunk pools itself) -> projection -> L2."""

    def __init__(self, trunk: nn.Sequential, projection: nn.Module, gem_p: float, pools_itself: bool):
        super().__init__()
        self.trunk = trunk
        self.projection = projection
        self.gem_p = gem_p
        self.pools_itself = pools_itself

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.trunk(x)
        if not self.pools_itself:
            f = gem(f, self.gem_p)
        return F.normalize(self.projection(f), dim=-1)


class DescriptorNet(nn.Module):
    """Normalised images (B, 3, S, S) -> unit descriptors (B, dim); blocks [:n_frozen] frozen."""

    def __init__(self, blocks: list[nn.Module], n_frozen: int, features: int, dim: int | None,
                 gem_p: float, pools_itself: bool, projection_init: str = "random"):
        super().__init__()
        if not 0 <= n_frozen < len(blocks):
            raise ValueError(f"n_frozen must be in [0, {len(blocks) - 1}], got {n_frozen}")
        self.frozen = nn.Sequential(*blocks[:n_frozen])
        self.trainable = nn.Sequential(*blocks[n_frozen:])
        self.projection: nn.Module = make_projection(features, dim, projection_init)
        self.gem_p = float(gem_p)
        self.pools_itself = pools_itself
        self.dim = int(dim or features)
        for p in self.frozen.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> "DescriptorNet":
        super().train(mode)
        self.frozen.eval()  # frozen BatchNorm keeps its running statistics
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.frozen):
            # No activations are kept for blocks that take no gradient: less memory, faster.
            with torch.no_grad():
                x = self.frozen(x)
        f = self.trainable(x)
        if not self.pools_itself:
            f = gem(f, self.gem_p)
        return F.normalize(self.projection(f), dim=-1)

    def exportable(self) -> _Descriptor:
        """A CPU, eval-mode copy computing the same function, with gradients flowing everywhere."""
        net = copy.deepcopy(self).eval()
        if any(p.device.type != "cpu" for p in net.parameters()):
            net = net.cpu()
        trunk = nn.Sequential(*net.frozen, *net.trainable)
        return _Descriptor(trunk, net.projection, net.gem_p, net.pools_itself).eval()


def _load_scripted(path: str) -> torch.jit.ScriptModule:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation notice
            return torch.jit.load(path, map_location="cpu")
    except Exception as e:  # torch raises RuntimeError/ValueError variants for bad files
        raise ValueError(f"--init {TORCHSCRIPT_PREFIX}{path}: cannot load TorchScript model: {e}") from e


def resolve_init(init: str, weights: str | None, input_size: int | None) -> InitModel:
    """Check the starting model and find its preprocessing (raises ValueError early)."""
    if init.startswith(TORCHSCRIPT_PREFIX):
        import os

        from raysearch import storage
        from raysearch.models.registry import TORCHSCRIPT_INPUT_SIZE

        path = os.path.abspath(os.path.expanduser(init[len(TORCHSCRIPT_PREFIX):]))
        if not os.path.isfile(path):
            raise ValueError(f"--init {init!r}: no such TorchScript file {path}")
        if weights is not None:
            raise ValueError("--weights does not apply to a TorchScript --init (its weights are inside it)")
        return InitModel(TORCHSCRIPT_PREFIX + path, None, storage.file_digest(path)[1], input_size or TORCHSCRIPT_INPUT_SIZE,
                         "squash", IMAGENET_MEAN, IMAGENET_STD)
    spec = resolve_model(ModelConfig(name=init, weights=weights, input_size=input_size))
    if spec.name.startswith("trained:"):
        raise ValueError(f"--init {init!r}: continuing from a trained model directory is not supported; "
                         "use --init torchscript:MODEL_DIR/<its .pt file>")
    return InitModel(spec.name, spec.weights, spec.weights_sha256, spec.input_size, spec.resize,
                     tuple(spec.mean), tuple(spec.std))  # type: ignore[arg-type]


def parse_train_blocks(value: str | int, n_blocks: int) -> int:
    """'all' or N (the last N blocks train) -> the number of frozen blocks."""
    if isinstance(value, str) and value.strip().lower() == "all":
        return 0
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"--train-blocks must be 'all' or a positive number, got {value!r}") from None
    if n < 1:
        raise ValueError(f"--train-blocks must be 'all' or a positive number, got {value!r}")
    return max(0, n_blocks - n)


def build_descriptor_net(init: InitModel, dim: int | None, gem_p: float, train_blocks: str | int,
                         projection_init: str = "random") -> DescriptorNet:
    """The network to train, on CPU, in train mode. `train_blocks`: 'all' or the number of final
    trunk blocks that train (see `backbone_blocks`); GeM and the projection always train.
    `projection_init`: see `make_projection`."""
    if dim is not None and dim < 1:
        raise ValueError(f"--dim must be >= 1, got {dim}")
    if gem_p <= 0:
        raise ValueError(f"--gem-p must be > 0, got {gem_p}")
    if init.name.startswith(TORCHSCRIPT_PREFIX):
        trunk: nn.Module = _load_scripted(init.name[len(TORCHSCRIPT_PREFIX):])
    else:
        spec = resolve_model(ModelConfig(name=init.name, weights=init.weights))
        trunk = build_model(spec).trunk
    with torch.no_grad():
        probe = trunk.eval()(torch.zeros(1, 3, 64, 64))
    if probe.ndim == 4:
        pools_itself = False
    elif probe.ndim == 2:
        pools_itself = True
    else:
        raise ValueError(f"--init {init.name}: expected a (B, C, h, w) feature map or (B, d) vectors, "
                         f"got shape {tuple(probe.shape)}")
    blocks = backbone_blocks(trunk)
    n_frozen = parse_train_blocks(train_blocks, len(blocks))
    if n_frozen and len(blocks) == 1:
        raise ValueError(f"--train-blocks {train_blocks}: {init.name} is a single block; use --train-blocks all")
    if projection_init == "whitening" and dim is not None and dim > int(probe.shape[1]):
        raise ValueError(f"--dim {dim}: a whitened projection keeps at most the trunk's {int(probe.shape[1])} dimensions")
    net = DescriptorNet(blocks, n_frozen, int(probe.shape[1]), dim, gem_p, pools_itself, projection_init)
    return net.train()


def export_torchscript(net: DescriptorNet) -> bytes:
    """The trained function as TorchScript bytes: normalised (B, 3, S, S) float -> (B, d) unit rows."""
    with warnings.catch_warnings():
        # TorchScript is deprecated in favour of torch.export, but it is the format raysearch's
        # torchscript:PATH models (and published copy-detection models such as SSCD) use.
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(net.exportable())
        buf = io.BytesIO()
        torch.jit.save(scripted, buf)
    return buf.getvalue()
