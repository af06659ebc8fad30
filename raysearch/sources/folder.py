"""Folder and glob sources, local or on any fsspec filesystem (s3://, gs://, ...).

Folders are walked one directory at a time in sorted order, so the listing streams (a million-file
bucket is never held in memory) and comes out in the same order on every run.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa

from raysearch import storage
from raysearch.images import is_image_path
from raysearch.sources.base import image_id_for, table

GLOB_CHARS = "*?["


def walk_files(uri: str, max_depth: int | None = None) -> Iterator[tuple[str, list[str]]]:
    """Yield (directory path, sorted file names) for every directory under `uri`, depth first,
    in sorted order, down to `max_depth` levels (1: only `uri` itself; None: all). Hidden files
    and folders (names starting with '.') are skipped. Paths are filesystem-internal (no scheme);
    use storage.unstrip to make URIs."""
    fs, root = storage.get_fs(uri)
    root = root.rstrip("/") or "/"
    local = storage.is_local(uri)
    walker = os.walk(root, onerror=_raise) if local else fs.walk(root, topdown=True)
    for dirpath, dirnames, filenames in walker:
        dirpath = dirpath.replace(os.sep, "/") if local else dirpath
        rel = dirpath[len(root):].strip("/")
        depth = rel.count("/") + 2 if rel else 1
        if max_depth is not None and depth >= max_depth:
            dirnames[:] = []
        else:
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        yield dirpath, sorted(f for f in filenames if not f.startswith("."))


def _raise(err: OSError) -> None:
    raise err


@dataclass(frozen=True)
class FolderSource:
    """Every image file (by extension) under a folder, recursively."""

    spec: str
    root: str
    kind: str = "folder"

    def iter_batches(self, batch_rows: int = 10_000) -> Iterator[pa.Table]:
        fs, root_path = storage.get_fs(self.root)
        root_path = root_path.rstrip("/")
        ids: list[str] = []
        uris: list[str] = []
        for dirpath, files in walk_files(self.root):
            for name in files:
                if not is_image_path(name):
                    continue
                path = posixpath.join(dirpath, name)
                ids.append(image_id_for(path, root_path))
                uris.append(storage.unstrip(fs, path))
                if len(ids) >= batch_rows:
                    yield table(ids, uris)
                    ids, uris = [], []
        if ids:
            yield table(ids, uris)


def glob_to_regex(pattern: str) -> re.Pattern[str]:
    """Translate a glob over '/'-separated paths: '*' and '?' stay within one path segment,
    '**' spans segments, '[...]' is a character class."""
    out = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                out.append(re.escape(c))
                i += 1
            else:
                body = pattern[i + 1 : end]
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append("[" + body.replace("\\", "\\\\") + "]")
                i = end + 1
        else:
            out.append(re.escape(c))
            i += 1
    return re.compile("".join(out) + r"\Z")


def split_glob(spec: str) -> tuple[str, str]:
    """Split 'data/photos/**/*.jpg' into the static root 'data/photos' and the pattern '**/*.jpg'."""
    scheme = ""
    rest = spec
    if "://" in spec:
        scheme, rest = spec.split("://", 1)
        scheme += "://"
    parts = rest.split("/")
    static: list[str] = []
    for part in parts:
        if any(ch in part for ch in GLOB_CHARS):
            break
        static.append(part)
    pattern = "/".join(parts[len(static):])
    root = "/".join(static)
    if not root and rest.startswith("/"):
        root = "/"
    return scheme + (root or "."), pattern


@dataclass(frozen=True)
class GlobSource:
    """Image files whose path relative to the glob's static prefix matches the pattern."""

    spec: str
    root: str
    pattern: str
    kind: str = "glob"

    def iter_batches(self, batch_rows: int = 10_000) -> Iterator[pa.Table]:
        regex = glob_to_regex(self.pattern)
        fs, root_path = storage.get_fs(self.root)
        root_path = root_path.rstrip("/")
        ids: list[str] = []
        uris: list[str] = []
        max_depth = None if "**" in self.pattern else self.pattern.count("/") + 1
        for dirpath, files in walk_files(self.root, max_depth):
            rel_dir = dirpath[len(root_path):].strip("/") if dirpath.startswith(root_path) else dirpath
            for name in files:
                rel = f"{rel_dir}/{name}" if rel_dir else name
                if not regex.match(rel) or not is_image_path(name):
                    continue
                path = posixpath.join(dirpath, name)
                ids.append(image_id_for(path, root_path))
                uris.append(storage.unstrip(fs, path))
                if len(ids) >= batch_rows:
                    yield table(ids, uris)
                    ids, uris = [], []
        if ids:
            yield table(ids, uris)
