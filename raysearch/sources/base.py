"""What every image source yields: batches of (image_id, uri) rows, streamed, in a stable order; and
the parsing every data set layout shares.

Layouts ('disc21:ROOT[:split]', 'gldv2:ROOT[:split]'): ROOT is a local folder or any fsspec URI
(s3://bucket/disc21). The split is the text after the last ':' when it names a split of the layout
(so 's3://...' roots need no escaping); without one, the layout's default split is used (DISC21:
references, GLDv2: index). See `raysearch.sources.disc21` and `raysearch.sources.gldv2` for the
folder and file names each layout recognises.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterator
from typing import Protocol

import pyarrow as pa

LISTING_SCHEMA = pa.schema([("image_id", pa.string()), ("uri", pa.string())])
# Data set layouts as SOURCE strings: 'disc21:ROOT[:split]' and 'gldv2:ROOT[:split]'.
LAYOUT_PREFIXES = ("disc21:", "gldv2:")


def split_layout_spec(spec: str, prefix: str, splits: tuple[str, ...], aliases: dict[str, str],
                      default: str) -> tuple[str, str]:
    """'disc21:s3://b/d:train' -> ('s3://b/d', 'train'). Raises ValueError for an empty root or an
    unknown split name."""
    body = spec[len(prefix):].strip()
    root, split = body, default
    if ":" in body:
        head, tail = body.rsplit(":", 1)
        # A tail with no '/' after a non-scheme colon names a split: 'ROOT:train'. 's3://b/x' keeps
        # its colon (the tail starts with '//').
        if tail and "/" not in tail and "\\" not in tail:
            name = tail.strip().lower()
            name = aliases.get(name, name)
            if name not in splits:
                raise ValueError(
                    f"{prefix.rstrip(':')} has no split {tail!r}; choose one of {', '.join(splits)}"
                    + (f" (or {', '.join(sorted(aliases))})" if aliases else "")
                )
            root, split = head.strip(), name
    if not root:
        raise ValueError(f"SOURCE {spec!r} names no data set folder; write {prefix}ROOT[:split]")
    if root.startswith("file://"):
        root = root[len("file://"):]
    if "://" not in root:
        root = os.path.abspath(os.path.expanduser(root))
    return root.rstrip("/") or "/", split


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
