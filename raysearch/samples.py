"""Sample photographs for the demo, tests and benchmarks: scikit-image's bundled pictures (no network)
and seeded random crops of them, written as JPEG files in a folder."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

# scikit-image pictures that are photographs (or scans) of real scenes, shipped inside the package.
PHOTO_NAMES = (
    "astronaut", "brick", "camera", "chelsea", "clock", "coffee", "coins", "grass", "gravel",
    "hubble_deep_field", "immunohistochemistry", "moon", "page", "retina", "rocket", "text", "cell",
    "colorwheel", "motorcycle",
)


def sample_photographs() -> dict[str, np.ndarray]:
    """name -> RGB uint8 array, for every photograph in PHOTO_NAMES."""
    import skimage.data as data

    out: dict[str, np.ndarray] = {}
    for name in PHOTO_NAMES:
        if name == "motorcycle":
            arr = data.stereo_motorcycle()[0]
        else:
            arr = getattr(data, name)()
        arr = np.asarray(arr)
        if arr.dtype != np.uint8:
            arr = (255 * (arr.astype(np.float64) / max(1e-9, float(arr.max())))).astype(np.uint8)
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        out[name] = np.ascontiguousarray(arr[..., :3])
    return out


@dataclass(frozen=True)
class SampleImage:
    image_id: str
    path: str
    photo: str                     # which photograph it was cut from
    box: tuple[int, int, int, int]  # (left, top, right, bottom) in that photograph


def random_crop_box(h: int, w: int, rng: np.random.Generator, min_frac: float = 0.3, max_frac: float = 0.8) -> tuple[int, int, int, int]:
    fh, fw = rng.uniform(min_frac, max_frac, size=2)
    ch, cw = max(32, int(h * fh)), max(32, int(w * fw))
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    return left, top, left + cw, top + ch


def write_reference_set(folder: str, n_images: int, seed: int = 0, quality: int = 92) -> list[SampleImage]:
    """Write `n_images` JPEGs to `folder`: every photograph whole, then random crops of them in
    turn. Ids are '<photo>' for whole pictures and '<photo>_crop<k>' for crops."""
    if n_images < 1:
        raise ValueError(f"n_images must be >= 1, got {n_images}")
    os.makedirs(folder, exist_ok=True)
    photos = sample_photographs()
    names = list(photos)
    rng = np.random.default_rng(seed)
    out: list[SampleImage] = []
    for i in range(n_images):
        name = names[i % len(names)]
        arr = photos[name]
        h, w = arr.shape[:2]
        if i < len(names):
            image_id, box = name, (0, 0, w, h)
        else:
            image_id, box = f"{name}_crop{i // len(names)}", random_crop_box(h, w, rng)
        path = os.path.join(folder, image_id + ".jpg")
        left, top, right, bottom = box
        Image.fromarray(arr[top:bottom, left:right]).save(path, quality=quality)
        out.append(SampleImage(image_id, path, name, box))
    return out
