"""Just-noticeable-difference (JND) heatmaps: how much each pixel can change before a viewer sees it.

The model is the classic pixel-domain one: a luminance-adaptation threshold that depends on the local
background brightness (the eye tolerates larger changes in dark and in bright areas than in mid-grey),
a contrast-masking threshold that grows with the local gradient (texture hides changes), and their
nonlinear additive combination, which discounts the overlap of the two effects:

    JND = LA + CM - c * min(LA, CM)

References for the formulas: Chou & Li (1995) for luminance adaptation and the background operator,
Yang et al. (2005) for the nonlinear additivity model, Wu et al. (2017) for the contrast term.
Everything works on float tensors and is differentiable, though the heatmap is only ever computed once
per image (it depends on the original, not on the perturbation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LUMA = (0.299, 0.587, 0.114)


def _background_kernel(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # Chou & Li's 5x5 weighted average: the centre excluded, inner ring weighted twice; weights sum to 32.
    k = torch.tensor(
        [[1, 1, 1, 1, 1],
         [1, 2, 2, 2, 1],
         [1, 2, 0, 2, 1],
         [1, 2, 2, 2, 1],
         [1, 1, 1, 1, 1]], dtype=dtype, device=device,
    )
    return (k / k.sum()).view(1, 1, 5, 5)


def luminance(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> (B, 1, H, W) luma in [0, 255]."""
    w = torch.tensor(LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return 255.0 * (x * w).sum(dim=1, keepdim=True)


def luminance_adaptation(y: torch.Tensor) -> torch.Tensor:
    """Visibility threshold (in grey levels) from the background luminance around each pixel."""
    bg = F.conv2d(F.pad(y, (2, 2, 2, 2), mode="replicate"), _background_kernel(y.device, y.dtype))
    dark = 17.0 * (1.0 - torch.sqrt(bg.clamp(min=0.0) / 127.0 + 1e-6)) + 3.0
    bright = 3.0 / 128.0 * (bg - 127.0) + 3.0
    return torch.where(bg <= 127.0, dark, bright)


def contrast_masking(y: torch.Tensor, beta: float = 0.117) -> torch.Tensor:
    """Visibility threshold from local contrast: Sobel gradient magnitude through a saturating curve."""
    sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=y.dtype, device=y.device)
    kernels = torch.stack([sobel, sobel.t()]).unsqueeze(1)  # horizontal and vertical edges
    grads = F.conv2d(F.pad(y, (1, 1, 1, 1), mode="replicate"), kernels)
    magnitude = torch.sqrt((grads ** 2).sum(dim=1, keepdim=True) + 1e-12)
    return beta * 16.0 * magnitude.pow(2.4) / (magnitude.pow(2) + 26.0 ** 2)


def jnd_heatmap(x: torch.Tensor, overlap: float = 0.3, floor: float = 5.0) -> torch.Tensor:
    """JND heatmap of RGB images.

    Parameters
    ----------
    x : (B, 3, H, W) float tensor in [0, 1].
    overlap : how much of the smaller of the two thresholds the combination discounts.
    floor : minimum threshold in grey levels (keeps flat areas from being frozen entirely).

    Returns
    -------
    (B, 1, H, W) float tensor: per-pixel tolerated change, in [0, 1] units (grey levels / 255).
    """
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(x.shape)}")
    y = luminance(x)
    la = luminance_adaptation(y)
    cm = contrast_masking(y)
    jnd = la + cm - overlap * torch.minimum(la, cm)
    return jnd.clamp(min=floor) / 255.0
