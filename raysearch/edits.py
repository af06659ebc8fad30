"""Seeded, DISC21-style image edits: what copies of a published image look like in the wild.

Every edit is a function (PIL image, numpy Generator) -> PIL image; the same seed gives the same
edit. `apply_edit(name, image, seed)` is the entry point; `EDITS` lists them, `STRONG_EDITS` the ones
that change the picture most, and "combo" chains two or three random edits.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps

EditFn = Callable[[Image.Image, np.random.Generator], Image.Image]

_WORDS = ("lol", "wow", "best day", "mood", "so true", "classic", "look at this", "no way", "repost", "2021")


def _rgb(img: Image.Image) -> Image.Image:
    return img if img.mode == "RGB" else img.convert("RGB")


def _color(rng: np.random.Generator) -> tuple[int, int, int]:
    r, g, b = rng.integers(0, 256, size=3)
    return int(r), int(g), int(b)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=max(8, size))
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def crop(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Keep a random window of 40-90% of each side."""
    w, h = img.size
    fw, fh = rng.uniform(0.4, 0.9, size=2)
    cw, ch = max(8, int(w * fw)), max(8, int(h * fh))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return img.crop((x, y, x + cw, y + ch))


def center_crop(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Keep the centred window of a random fraction in [0.5, 0.85) of each side (the same for both)."""
    w, h = img.size
    f = rng.uniform(0.5, 0.85)
    cw, ch = int(w * f), int(h * f)
    return img.crop(((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch))


def rotate(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Rotate by a random angle of 5-30 degrees either way (bilinear), expanding the canvas to hold
    the whole picture; the uncovered corners are black."""
    angle = float(rng.uniform(5, 30) * rng.choice([-1, 1]))
    return img.rotate(angle, resample=Image.BILINEAR, expand=True, fillcolor=(0, 0, 0))


def rotate90(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Rotate by 90 degrees, counter-clockwise or clockwise with equal chance."""
    return img.transpose(Image.ROTATE_90 if rng.random() < 0.5 else Image.ROTATE_270)


def hflip(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Mirror left to right; draws nothing from `rng`."""
    return ImageOps.mirror(img)


def color_jitter(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Scale brightness and then contrast, each by a random factor in [0.6, 1.4), then saturation by
    one in [0.3, 1.7)."""
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.6, 1.4))
    img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.6, 1.4))
    return ImageEnhance.Color(img).enhance(rng.uniform(0.3, 1.7))


def grayscale(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Convert to grey levels, returned as a three-channel RGB image; draws nothing from `rng`."""
    return ImageOps.grayscale(img).convert("RGB")


def blur(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Gaussian blur with a random radius in [1, 3) pixels."""
    return img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(1.0, 3.0))))


def jpeg(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Re-encode as JPEG at a random quality from 10 to 39 and decode it again (RGB)."""
    buf = io.BytesIO()
    _rgb(img).save(buf, format="JPEG", quality=int(rng.integers(10, 40)))
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def text_overlay(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Write 1-3 phrases drawn from a fixed list, in random colours at random places, in a font 6-14% of the
    image's height (at least 8 px; a fixed bitmap font without FreeType)."""
    img = img.copy()
    w, h = img.size
    draw = ImageDraw.Draw(img)
    font = _font(int(h * rng.uniform(0.06, 0.14)))
    for _ in range(int(rng.integers(1, 4))):
        text = str(rng.choice(_WORDS))
        draw.text((int(rng.integers(0, max(1, w - 20))), int(rng.integers(0, max(1, h - 20)))), text, fill=_color(rng), font=font)
    return img


def shape_overlay(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Draw 1-3 filled ellipses or rectangles (equal chance) in random colours at random places, each
    5-25% of the image's width and, independently, of its height."""
    img = img.copy()
    w, h = img.size
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 4))):
        sw, sh = int(w * rng.uniform(0.05, 0.25)), int(h * rng.uniform(0.05, 0.25))
        x, y = int(rng.integers(0, max(1, w - sw))), int(rng.integers(0, max(1, h - sh)))
        box = (x, y, x + sw, y + sh)
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=_color(rng))
    return img


def pad(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Add a border of one random flat colour: 5-30% of the width on the left and right, 5-30% of
    the height above and below (the same on both sides)."""
    w, h = img.size
    px, py = int(w * rng.uniform(0.05, 0.3)), int(h * rng.uniform(0.05, 0.3))
    out = Image.new("RGB", (w + 2 * px, h + 2 * py), _color(rng))
    out.paste(_rgb(img), (px, py))
    return out


def resize(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Downscale both sides by one random factor in [0.3, 0.7) (bilinear, at least 16 px a side)."""
    w, h = img.size
    f = rng.uniform(0.3, 0.7)
    return img.resize((max(16, int(w * f)), max(16, int(h * f))), Image.BILINEAR)


def meme(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """White bands above and below with a caption, the classic meme layout."""
    w, h = img.size
    band = int(h * rng.uniform(0.15, 0.3))
    out = Image.new("RGB", (w, h + 2 * band), (255, 255, 255))
    out.paste(_rgb(img), (0, band))
    draw = ImageDraw.Draw(out)
    font = _font(int(band * 0.6))
    draw.text((int(w * 0.05), int(band * 0.2)), str(rng.choice(_WORDS)).upper(), fill=(0, 0, 0), font=font)
    draw.text((int(w * 0.05), h + band + int(band * 0.2)), str(rng.choice(_WORDS)).upper(), fill=(0, 0, 0), font=font)
    return out


def overlay_onto_background(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Paste the picture, shrunk, onto a random flat background (a screenshot or collage)."""
    w, h = img.size
    f = rng.uniform(0.5, 0.8)
    small = _rgb(img).resize((max(8, int(w * f)), max(8, int(h * f))), Image.BILINEAR)
    out = Image.new("RGB", (w, h), _color(rng))
    out.paste(small, (int(rng.integers(0, w - small.width + 1)), int(rng.integers(0, h - small.height + 1))))
    return out


def vflip(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Flip upside down; draws nothing from `rng`."""
    return ImageOps.flip(img)


def pixelate(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Blocky mosaic: shrink to 1/6-1/3 with nearest neighbour, then back up."""
    w, h = img.size
    f = rng.uniform(1 / 6, 1 / 3)
    small = img.resize((max(4, int(w * f)), max(4, int(h * f))), Image.NEAREST)
    return small.resize((w, h), Image.NEAREST)


def noise(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Additive Gaussian pixel noise (sensor noise, re-photographed screens)."""
    arr = np.asarray(_rgb(img), dtype=np.float32)
    arr = arr + rng.normal(0.0, rng.uniform(8.0, 25.0), size=arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def perspective(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A mild keystone: each corner moves inwards by up to 15% of the side (photo of a screen)."""
    w, h = img.size
    dx, dy = w * 0.15, h * 0.15
    # Source quadrilateral for Image.transform(QUAD): upper left, lower left, lower right, upper right.
    corners = [
        (rng.uniform(0, dx), rng.uniform(0, dy)), (rng.uniform(0, dx), h - rng.uniform(0, dy)),
        (w - rng.uniform(0, dx), h - rng.uniform(0, dy)), (w - rng.uniform(0, dx), rng.uniform(0, dy)),
    ]
    quad = tuple(float(c) for corner in corners for c in corner)
    return _rgb(img).transform((w, h), Image.QUAD, quad, resample=Image.BILINEAR, fillcolor=_color(rng))


EDITS: dict[str, EditFn] = {
    "crop": crop,
    "center_crop": center_crop,
    "rotate": rotate,
    "rotate90": rotate90,
    "hflip": hflip,
    "color_jitter": color_jitter,
    "grayscale": grayscale,
    "blur": blur,
    "jpeg": jpeg,
    "text": text_overlay,
    "shapes": shape_overlay,
    "pad": pad,
    "resize": resize,
    "meme": meme,
    "overlay": overlay_onto_background,
}
STRONG_EDITS = ("crop", "rotate", "overlay", "meme", "combo")
# What `combo` chains (itself included, as it always has), fixed so that a seed keeps giving the same
# combination when edits are added to EDITS.
COMBO_EDITS = tuple(n for n in EDITS if n not in ("rotate90", "hflip")) + ("combo",)


def combo(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Two or three different edits in a row (never two geometric ones that shrink the picture)."""
    for name in rng.choice(list(COMBO_EDITS), size=int(rng.integers(2, 4)), replace=False):
        img = EDITS[str(name)](img, rng)
    return img


EDITS["combo"] = combo
# Added after `combo`, so they leave its seeded choices unchanged.
EDITS["vflip"] = vflip
EDITS["pixelate"] = pixelate
EDITS["noise"] = noise
EDITS["perspective"] = perspective


def apply_edit(name: str, img: Image.Image, seed: int) -> Image.Image:
    """Apply edit `name` with a generator seeded by `seed`; returns an RGB image."""
    if name == "none":
        return _rgb(img)
    if name not in EDITS:
        raise ValueError(f"unknown edit {name!r}; choose from {sorted(EDITS)}")
    return _rgb(EDITS[name](_rgb(img), np.random.default_rng(seed)))
