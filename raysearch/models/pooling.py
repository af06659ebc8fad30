"""Global pooling of a CNN feature map (B, C, H, W) into one descriptor (B, C) per image.

GeM (generalised mean, Radenovic et al.), MAC (max), SPoC (average) and R-MAC (regional max over a
fixed grid of square regions at several scales, Tolias et al.). Outputs are not normalised here; the
model wrapper L2-normalises the final descriptor.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

POOLINGS: tuple[str, ...] = ("gem", "mac", "spoc", "rmac")


def gem(x: torch.Tensor, p: float = 3.0, eps: float = 1e-6) -> torch.Tensor:
    """(mean over H, W of clamp(x, eps)^p)^(1/p)."""
    return x.clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


def mac(x: torch.Tensor) -> torch.Tensor:
    return x.amax(dim=(-2, -1))


def spoc(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=(-2, -1))


def rmac_regions(h: int, w: int, levels: int = 3) -> list[tuple[int, int, int, int]]:
    """Square regions (top, left, height, width) of the R-MAC grid over an h x w feature map.

    Level l has regions of side 2*min(h, w)/(l+1), laid out uniformly with about 40% overlap
    (the layout of Tolias et al.); the extra regions go along the longer side.
    """
    regions: list[tuple[int, int, int, int]] = []
    short, long_ = min(h, w), max(h, w)
    extra = 0
    if long_ > short:
        # Extra regions along the long side at level 1: the count whose neighbours overlap closest to 40%.
        def overlap(m: int) -> float:
            return (short - (long_ - short) / m) / short

        extra = min(range(1, 7), key=lambda m: abs(overlap(m) - 0.4))
    for level in range(1, levels + 1):
        side = int(math.floor(2 * short / (level + 1)))
        if side < 1:
            break
        n_short = level
        n_long = level + extra
        n_h, n_w = (n_long, n_short) if h > w else (n_short, n_long)
        tops = _positions(h, side, n_h)
        lefts = _positions(w, side, n_w)
        regions.extend((t, l, side, side) for t in tops for l in lefts)
    return regions or [(0, 0, h, w)]


def _positions(length: int, side: int, count: int) -> list[int]:
    if count <= 1 or length <= side:
        return [max(0, (length - side) // 2)]
    step = (length - side) / (count - 1)
    return sorted({int(round(i * step)) for i in range(count)})


def rmac(x: torch.Tensor, levels: int = 3, eps: float = 1e-6) -> torch.Tensor:
    """Sum of L2-normalised region MACs over the R-MAC grid."""
    h, w = x.shape[-2:]
    out = torch.zeros(x.shape[:-2], dtype=x.dtype, device=x.device)
    for top, left, rh, rw in rmac_regions(h, w, levels):
        region = x[..., top : top + rh, left : left + rw].amax(dim=(-2, -1))
        out = out + F.normalize(region, dim=-1, eps=eps)
    return out


def pool(x: torch.Tensor, method: str, p: float = 3.0) -> torch.Tensor:
    if method == "gem":
        return gem(x, p)
    if method == "mac":
        return mac(x)
    if method == "spoc":
        return spoc(x)
    if method == "rmac":
        return rmac(x)
    raise ValueError(f"pooling must be one of {POOLINGS}, got {method!r}")
