"""Image sources: turn a SOURCE string into a stream of (image_id, uri) rows.

SOURCE forms: a folder (local or any fsspec URI such as s3://bucket/photos), a glob
('photos/**/*.jpg'), a list file (.txt / .csv / .parquet), or a data set layout
('disc21:ROOT[:split]', 'gldv2:ROOT[:split]').
"""

from __future__ import annotations

import os

from raysearch import storage
from raysearch.sources.base import LAYOUT_PREFIXES, LISTING_SCHEMA, ImageSource, image_id_for
from raysearch.sources.folder import GLOB_CHARS, FolderSource, GlobSource, split_glob
from raysearch.sources.listfile import LIST_EXTENSIONS, ListFileSource



def _absolute(uri: str) -> str:
    return uri if "://" in uri else os.path.abspath(os.path.expanduser(uri))


def _parent(uri: str) -> str:
    if "://" in uri:
        return uri.rstrip("/").rsplit("/", 1)[0]
    return os.path.dirname(uri)


def open_source(spec: str) -> ImageSource:
    """Interpret a SOURCE string. Raises FileNotFoundError if it names nothing that exists and
    ValueError if it is malformed."""
    if not spec or not spec.strip():
        raise ValueError("SOURCE is empty")
    spec = spec.strip()
    if spec.startswith("disc21:"):
        from raysearch.sources.disc21 import open_disc21

        return open_disc21(spec)
    if spec.startswith("gldv2:"):
        from raysearch.sources.gldv2 import open_gldv2

        return open_gldv2(spec)
    if spec.startswith("file://"):
        spec = spec[len("file://"):]
    path_part = spec.split("://", 1)[-1]
    if any(ch in path_part for ch in GLOB_CHARS):
        root, pattern = split_glob(spec)
        root = _absolute(root)
        if not storage.isdir(root):
            raise FileNotFoundError(f"source not found: the folder {root} of glob {spec!r} does not exist")
        return GlobSource(spec=spec, root=root.rstrip("/"), pattern=pattern)
    uri = _absolute(spec)
    if not storage.exists(uri):
        raise FileNotFoundError(f"source not found: {spec}")
    if storage.isdir(uri):
        return FolderSource(spec=spec, root=uri.rstrip("/"))
    if uri.lower().endswith(LIST_EXTENSIONS):
        return ListFileSource(spec=spec, root=_parent(uri), list_uri=uri)
    raise ValueError(
        f"source {spec!r} is a file but not a list file ({', '.join(LIST_EXTENSIONS)}); "
        "give a folder, a glob or a list file"
    )


__all__ = [
    "LAYOUT_PREFIXES",
    "LISTING_SCHEMA",
    "FolderSource",
    "GlobSource",
    "ImageSource",
    "ListFileSource",
    "image_id_for",
    "open_source",
]
