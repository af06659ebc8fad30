"""Image bytes -> RGB uint8 arrays, and the resize policies models use.

Every way a file can fail to be a usable picture ends in `DecodeError` with a short reason; callers
turn that into an error row (image_id, uri, reason) instead of crashing a build.
"""

from __future__ import annotations

import io
import warnings
import zlib
from typing import Literal

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# Refuse anything larger than this many pixels (PIL's own default limit is 89 MP and only warns).
MAX_PIXELS = 178_956_970

ResizePolicy = Literal["squash", "crop", "pad"]
RESIZE_POLICIES: tuple[str, ...] = ("squash", "crop", "pad")

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
)


class DecodeError(ValueError):
    """The bytes are not a decodable image; `reason` is a short human-readable explanation."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparent pixels are composited onto white."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img)
        if mode == "F":
            lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
            arr = (arr - lo) / (hi - lo or 1.0) * 255.0
        else:
            # 16-bit (or 32-bit integer) samples: keep the top 8 bits of the range actually used.
            arr = arr.astype(np.float64) * (255.0 / (65535.0 if arr.max(initial=0) > 255 else 255.0))
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")
        mode = "L"
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode != "RGB":
        return img.convert("RGB")
    return img


def decode_image(data: bytes, draft_size: int | None = None, max_pixels: int | None = None) -> np.ndarray:
    """Decode image bytes to an RGB uint8 array of shape (H, W, 3).

    EXIF orientation is applied; grayscale, palette, CMYK, 16-bit and alpha images are converted
    (alpha composited on white); GIFs give their first frame. `draft_size` lets JPEG decoding
    shrink by DCT scaling while keeping both sides >= draft_size, which is much faster for
    large photographs that will be resized anyway. `max_pixels` (default MAX_PIXELS) refuses larger
    images from their header alone, before any pixel is decoded (a service lowers it to bound its
    memory).

    Raises DecodeError for empty, truncated, corrupt, non-image or oversized inputs.
    """
    if not data:
        raise DecodeError("empty file (0 bytes)")
    max_pixels = MAX_PIXELS if max_pixels is None else max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise DecodeError(f"image too large: {w}x{h} pixels (limit {max_pixels})")
            if draft_size and img.format == "JPEG":
                # libjpeg-turbo decodes at 1/2, 1/4 or 1/8 scale (a 12 MP photograph for 224 px: 1/8).
                # At 1/8 most of the time goes to entropy-decoding the whole file: 29 of the 35 ms a
                # 2 MB 4000x3000 JPEG takes here (87 ms at full scale); OpenCV's reduced decoding
                # (IMREAD_REDUCED_COLOR_8, the same library) took as long.
                img.draft("RGB", (draft_size, draft_size))
            img.load()
            img = ImageOps.exif_transpose(img)
            img = _to_rgb(img)
            arr = np.asarray(img, dtype=np.uint8)
    except DecodeError:
        raise
    except UnidentifiedImageError:
        raise DecodeError("not an image (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DecodeError(f"decompression bomb refused: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError, zlib.error, IndexError, TypeError) as e:
        # Truncated files raise OSError("image file is truncated ..."); corrupt headers
        # raise SyntaxError/ValueError inside PIL's plugins.
        msg = str(e) or type(e).__name__
        if "truncated" in msg.lower():
            raise DecodeError(f"truncated image: {msg}") from None
        raise DecodeError(f"corrupt image: {msg}") from None
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DecodeError(f"unexpected decoded shape {arr.shape}")
    return arr


def resize_image(arr: np.ndarray, size: int, policy: ResizePolicy = "squash") -> np.ndarray:
    """Resize an (H, W, 3) uint8 image to (size, size, 3).

    squash: scale both sides to `size` (aspect ratio not kept, nothing lost);
    crop:   scale the shorter side to `size`, then take the centre square;
    pad:    scale the longer side to `size`, then pad the rest with grey (letterbox).
    """
    if policy not in RESIZE_POLICIES:
        raise ValueError(f"resize policy must be one of {RESIZE_POLICIES}, got {policy!r}")
    img = Image.fromarray(arr)
    w, h = img.size
    if policy == "squash":
        out = img.resize((size, size), Image.BICUBIC, reducing_gap=3.0)
    elif policy == "crop":
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((nw, nh), Image.BICUBIC, reducing_gap=3.0)
        left, top = (nw - size) // 2, (nh - size) // 2
        out = img.crop((left, top, left + size, top + size))
    else:
        scale = size / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        img = img.resize((nw, nh), Image.BICUBIC, reducing_gap=3.0)
        out = Image.new("RGB", (size, size), (124, 116, 104))
        out.paste(img, ((size - nw) // 2, (size - nh) // 2))
    return np.asarray(out, dtype=np.uint8)


def is_image_path(path: str) -> bool:
    dot = path.rfind(".")
    return dot >= 0 and path[dot:].lower() in IMAGE_EXTENSIONS


# Truncated files must raise (and become error rows), never be silently padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False
