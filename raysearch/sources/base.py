"""What every image source yields: batches of (image_id, uri) rows, streamed, in a stable order."""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from typing import Protocol

import pyarrow as pa

LISTING_SCHEMA = pa.schema([("image_id", pa.string()), ("uri", pa.string())])


class ImageSource(Protocol):
    """A collection of images. `iter_batches` streams it; nothing holds the whole listing."""

    spec: str
    kind: str
    root: str

    def iter_batches(self, batch_rows: int = 10_000) -> Iterator[pa.Table]:
        """Yield tables with LISTING_SCHEMA, in the same order on every call."""
        ...


def strip_extension(path: str) -> str:
    base = posixpath.basename(path)
    dot = base.rfind(".")
    if dot > 0:
        return path[: len(path) - len(base) + dot]
    return path


def image_id_for(path: str, root: str) -> str:
    """Stable id: `path` relative to `root`, '/'-separated, without extension.

    Paths outside `root` keep their full path (scheme and leading '/' dropped), so ids stay unique.
    """
    path = path.replace("\\", "/")
    root = root.replace("\\", "/").rstrip("/")
    if root and path.startswith(root + "/"):
        rel = path[len(root) + 1:]
    else:
        rel = path.split("://", 1)[-1].lstrip("/")
    return strip_extension(rel)


def table(image_ids: list[str], uris: list[str]) -> pa.Table:
    return pa.table({"image_id": pa.array(image_ids, pa.string()), "uri": pa.array(uris, pa.string())})
