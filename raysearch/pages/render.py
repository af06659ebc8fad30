"""Rendering pages: the package's jinja2 templates, thumbnails and figures as data: URIs.

A page written here is one HTML file that needs nothing else: thumbnails are small JPEGs and plots
PNGs, both embedded as data: URIs, so a report can be mailed, archived or opened offline.
"""

from __future__ import annotations

import base64
import functools
import io
import logging
from typing import Any

import jinja2
import numpy as np
from PIL import Image

from raysearch import storage
from raysearch.images import DecodeError, decode_image

log = logging.getLogger("raysearch")

THUMBNAIL_SIZE = 160        # longest side, pixels: small enough that a page of 500 stays a few MB
THUMBNAIL_QUALITY = 80
MAX_THUMBNAIL_SIZE = 1024


@functools.lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    """The jinja2 environment over raysearch/pages/templates (autoescaped: ids and uris come from
    users' file names)."""
    return jinja2.Environment(
        loader=jinja2.PackageLoader("raysearch.pages", "templates"),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        undefined=jinja2.StrictUndefined,   # a template naming a missing value fails, not renders blank
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render(template: str, **context: Any) -> str:
    """The template `template` (a file name under templates/) rendered with `context`."""
    return environment().get_template(template).render(**context)


def write_page(path: str, html: str) -> str:
    """Write `html` to `path` (local or fsspec URI) atomically, creating a local folder; returns path."""
    storage.atomic_write(path, html.encode("utf-8"))
    return path


def thumbnail_jpeg(data: bytes, size: int = THUMBNAIL_SIZE, max_pixels: int | None = None) -> bytes:
    """Image file bytes -> a JPEG whose longest side is at most `size` pixels (EXIF orientation
    applied, any mode converted to RGB). Raises DecodeError for bytes that are not a usable image
    and ValueError for a size outside 16..MAX_THUMBNAIL_SIZE."""
    if not 16 <= size <= MAX_THUMBNAIL_SIZE:
        raise ValueError(f"thumbnail size must be between 16 and {MAX_THUMBNAIL_SIZE}, got {size}")
    # draft_size lets a large JPEG decode at a fraction of its resolution (DCT scaling).
    img = Image.fromarray(decode_image(data, draft_size=size, max_pixels=max_pixels))
    img.thumbnail((size, size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=THUMBNAIL_QUALITY, optimize=True)
    return out.getvalue()


def data_uri(data: bytes, mime: str) -> str:
    """`data:` URI of `data` (base64)."""
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def thumbnail_uri(uri: str | None, size: int = THUMBNAIL_SIZE) -> str | None:
    """A thumbnail of the image at `uri` (local path or fsspec URI) as a data: URI; None when there
    is no uri or the image cannot be read (the page then shows a placeholder and says why in the
    log, at debug level: one unreadable image should not stop a report)."""
    if not uri:
        return None
    try:
        return data_uri(thumbnail_jpeg(storage.read_bytes(uri), size), "image/jpeg")
    except (OSError, DecodeError) as e:
        log.debug("no thumbnail for %s: %s", uri, e)
        return None


def thumbnail_array_uri(pixels: np.ndarray, size: int = THUMBNAIL_SIZE) -> str:
    """A thumbnail of an (H, W, 3) uint8 image as a data: URI (for images computed, not stored)."""
    img = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8))
    img.thumbnail((size, size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=THUMBNAIL_QUALITY)
    return data_uri(out.getvalue(), "image/jpeg")


class Thumbnails:
    """Thumbnails by uri, each read and encoded once per page (a reference that answers many queries
    appears many times)."""

    def __init__(self, size: int = THUMBNAIL_SIZE):
        self.size = size
        self._done: dict[str, str | None] = {}

    def __call__(self, uri: str | None) -> str | None:
        """The data: URI of `uri`'s thumbnail, or None (see `thumbnail_uri`)."""
        if not uri:
            return None
        if uri not in self._done:
            self._done[uri] = thumbnail_uri(uri, self.size)
        return self._done[uri]
