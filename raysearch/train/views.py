"""Training views: what a network must learn to see as "the same image".

Each view of an image is a random resized crop, squashed to the input size, followed by one or more
edits drawn from raysearch's edit suite (`raysearch.edits`: crops, flips, rotations, colour, blur,
JPEG, text and shape overlays, borders, memes, perspective, ...), the same suite that evaluation
copies are made with. Every view is seeded by (seed, epoch, image_id, view index), so an image gets
the same views whichever worker reads it and in whatever order.

`mix_views` then replaces some first views by a mixup (pixel blend) or cutmix (pasted box) of two
images of the batch, as SSCD does; the returned membership matrix records how much of each source a
view shows, and the loss treats a mixed view as a positive of both sources.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from raysearch.edits import EDITS, apply_edit

# "combo" chains random edits itself; views already chain `edits_per_view` of them.
DEFAULT_VIEW_EDITS: tuple[str, ...] = tuple(name for name in EDITS if name != "combo")


@dataclass(frozen=True)
class ViewConfig:
    """How views are made. `edits_per_view` is an inclusive (min, max) count; `crop_scale` the
    range of the crop's area as a share of the image; `crop_ratio` its width/height range."""

    size: int = 224
    n_views: int = 2
    crop_scale: tuple[float, float] = (0.25, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    edits: tuple[str, ...] = DEFAULT_VIEW_EDITS
    edits_per_view: tuple[int, int] = (1, 3)
    mixup_prob: float = 0.0
    cutmix_prob: float = 0.0
    mix_alpha: float = 2.0

    def __post_init__(self) -> None:
        if not 16 <= self.size <= 4096:
            raise ValueError(f"input_size must be between 16 and 4096, got {self.size}")
        if self.n_views < 2:
            raise ValueError(f"views must be >= 2 (a view needs a positive), got {self.n_views}")
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")
        rlo, rhi = self.crop_ratio
        if not 0.0 < rlo <= rhi:
            raise ValueError(f"crop_ratio must satisfy 0 < min <= max, got {self.crop_ratio}")
        unknown = [e for e in self.edits if e not in EDITS]
        if unknown:
            raise ValueError(f"edits: unknown edit(s) {unknown}; choose from {sorted(EDITS)}")
        elo, ehi = self.edits_per_view
        if not 0 <= elo <= ehi:
            raise ValueError(f"edits_per_view must satisfy 0 <= min <= max, got {self.edits_per_view}")
        if ehi > 0 and not self.edits:
            raise ValueError("edits is empty but edits_per_view asks for edits")
        for name in ("mixup_prob", "cutmix_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.mixup_prob + self.cutmix_prob > 1.0:
            raise ValueError(f"mixup_prob + cutmix_prob must be <= 1, got {self.mixup_prob} + {self.cutmix_prob}")
        if self.mix_alpha <= 0:
            raise ValueError(f"mix_alpha must be > 0, got {self.mix_alpha}")


def view_seed(seed: int, epoch: int, image_id: str, view: int) -> int:
    """A 63-bit seed for one view of one image, independent of batch order and worker."""
    digest = hashlib.blake2b(f"{seed}\0{epoch}\0{view}\0{image_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _random_resized_crop(img: Image.Image, rng: np.random.Generator, scale: tuple[float, float],
                         ratio: tuple[float, float]) -> Image.Image:
    w, h = img.size
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return img.crop((x, y, x + cw, y + ch))
    return img  # no crop of that shape fits (a very elongated image): keep it whole


def make_view(image: np.ndarray, config: ViewConfig, seed: int) -> np.ndarray:
    """One view: (H, W, 3) uint8 -> (size, size, 3) uint8, determined by `seed`."""
    rng = np.random.default_rng(seed)
    size = config.size
    img = _random_resized_crop(Image.fromarray(image), rng, config.crop_scale, config.crop_ratio)
    # Edits run at the input size: cheaper than at full size, and what the network sees anyway.
    img = img.resize((size, size), Image.BILINEAR)
    lo, hi = config.edits_per_view
    count = min(int(rng.integers(lo, hi + 1)), len(config.edits))
    if count:
        for name in rng.choice(np.asarray(config.edits, dtype=object), size=count, replace=False):
            img = apply_edit(str(name), img, int(rng.integers(0, 2**62)))
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


@dataclass(frozen=True)
class Views:
    """Views of a batch of n images, image-major: rows i*n_views .. i*n_views + n_views - 1 are the
    views of image i. pixels (n * n_views, S, S, 3) uint8; instance (n * n_views,) int64, the
    image's position in the batch; view (n * n_views,) int64, the view index."""

    pixels: np.ndarray
    instance: np.ndarray
    view: np.ndarray


def make_views(images: list[np.ndarray], image_ids: list[str], config: ViewConfig, seed: int, epoch: int) -> Views:
    """`config.n_views` views of each image (RGB uint8 arrays of any size)."""
    if len(images) != len(image_ids):
        raise ValueError(f"{len(images)} images but {len(image_ids)} image ids")
    v = config.n_views
    pixels = np.empty((len(images) * v, config.size, config.size, 3), dtype=np.uint8)
    for i, (image, image_id) in enumerate(zip(images, image_ids)):
        for k in range(v):
            pixels[i * v + k] = make_view(image, config, view_seed(seed, epoch, image_id, k))
    instance = np.repeat(np.arange(len(images), dtype=np.int64), v)
    view = np.tile(np.arange(v, dtype=np.int64), len(images))
    return Views(pixels, instance, view)


def _cutmix_box(h: int, w: int, lam: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of a box covering about 1 - lam of an h x w image."""
    cut = math.sqrt(max(0.0, 1.0 - lam))
    ch, cw = int(round(h * cut)), int(round(w * cut))
    cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
    top, bottom = max(0, cy - ch // 2), min(h, cy + (ch - ch // 2))
    left, right = max(0, cx - cw // 2), min(w, cx + (cw - cw // 2))
    return top, left, bottom, right


def mix_views(views: Views, n_images: int, config: ViewConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Replace some first views by a mixup or cutmix with the first view of another image.

    Returns (pixels (N, S, S, 3) uint8, a new array; membership (N, n_images) float32: row r holds
    lam for its own image and 1 - lam for the partner when mixed, else one-hot). Only first views
    are mixed, so every image keeps at least one clean view for the mixed one to be matched with.
    """
    membership = np.zeros((len(views.instance), n_images), dtype=np.float32)
    membership[np.arange(len(views.instance)), views.instance] = 1.0
    pixels = views.pixels.copy()
    if n_images < 2 or (config.mixup_prob == 0.0 and config.cutmix_prob == 0.0):
        return pixels, membership
    first = np.flatnonzero(views.view == 0)
    clean = views.pixels  # partners are taken from the unmixed views
    row_of = {int(views.instance[r]): int(r) for r in first}
    for r in first:
        u = rng.random()
        if u >= config.mixup_prob + config.cutmix_prob:
            continue
        i = int(views.instance[r])
        j = int(rng.integers(0, n_images - 1))
        j = j + 1 if j >= i else j  # any other image of the batch
        partner = clean[row_of[j]]
        lam = float(rng.beta(config.mix_alpha, config.mix_alpha))
        if u < config.mixup_prob:
            mixed = lam * clean[r].astype(np.float32) + (1.0 - lam) * partner.astype(np.float32)
            pixels[r] = np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
        else:
            h, w = clean[r].shape[:2]
            top, left, bottom, right = _cutmix_box(h, w, lam, rng)
            pixels[r] = clean[r]
            pixels[r, top:bottom, left:right] = partner[top:bottom, left:right]
            lam = 1.0 - (bottom - top) * (right - left) / float(h * w)  # the share actually kept
        membership[r, i] = lam
        membership[r, j] = 1.0 - lam
    return pixels, membership
