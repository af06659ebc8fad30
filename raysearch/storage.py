"""Storage: every path in raysearch is a URI that fsspec understands (local paths, file://, s3://, ...).

Writes that must never be seen half-done (manifests, index shards, Parquet parts) go through
`atomic_write`: on a local disk the data is written to a temporary file in the same folder and renamed
over the target (rename is atomic on POSIX); on object stores a single PUT is already atomic.
"""

from __future__ import annotations

import contextlib
import logging
import hashlib
import io
import json
import os
import posixpath
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any

import fsspec
from fsspec.core import url_to_fs

log = logging.getLogger("raysearch")

_CHUNK = 8 << 20


def get_fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return (filesystem, path inside it) for a URI or local path."""
    fs, path = url_to_fs(str(uri))
    return fs, path


def absolute(uri: str) -> str:
    """A local path made absolute (Ray's workers do not share the driver's working directory);
    a URI (s3://, file://, ...) as given."""
    return uri if "://" in uri else os.path.abspath(os.path.expanduser(uri))


def is_local(uri: str) -> bool:
    """Whether `uri` is on the local filesystem (a plain path or file://)."""
    fs, _ = get_fs(uri)
    return "file" in _protocols(fs)


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)


def unstrip(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Turn a filesystem-internal path back into a URI that `get_fs` understands."""
    if "file" in _protocols(fs):
        return path
    return fs.unstrip_protocol(path)


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI with '/' (works for local paths and s3:// alike)."""
    uri = str(uri)
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        return scheme + "://" + posixpath.join(rest, *parts)
    return os.path.join(uri, *parts)


def exists(uri: str) -> bool:
    """Whether a file or folder exists at `uri`."""
    fs, path = get_fs(uri)
    return fs.exists(path)


def isdir(uri: str) -> bool:
    """Whether `uri` is a folder."""
    fs, path = get_fs(uri)
    return fs.isdir(path)


def makedirs(uri: str) -> None:
    """Create the folder `uri` and its parents; an existing folder is fine."""
    fs, path = get_fs(uri)
    fs.makedirs(path, exist_ok=True)


def size(uri: str) -> int:
    """Size of the file at `uri`, in bytes."""
    fs, path = get_fs(uri)
    return int(fs.size(path))


def read_bytes(uri: str) -> bytes:
    """The whole file at `uri`. Raises FileNotFoundError naming `uri` when it is missing."""
    fs, path = get_fs(uri)
    try:
        return fs.cat_file(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"no such file: {uri}") from e


def read_json(uri: str) -> Any:
    """The UTF-8 JSON file at `uri`, parsed."""
    return json.loads(read_bytes(uri).decode("utf-8"))


def atomic_write(uri: str, data: bytes) -> None:
    """Write `data` to `uri` so that readers see either the old file or the whole new one."""
    fs, path = get_fs(uri)
    if "file" in _protocols(fs):
        folder = os.path.dirname(path) or "."
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    else:
        # An object-store PUT is atomic: the key appears with all of its bytes or not at all.
        fs.pipe_file(path, data)


def atomic_write_json(uri: str, obj: Any) -> None:
    """Write `obj` as indented JSON (UTF-8, newline at the end) with `atomic_write`."""
    atomic_write(uri, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode("utf-8"))


@contextlib.contextmanager
def atomic_output(uri: str) -> Iterator[io.BytesIO]:
    """Context manager yielding a buffer whose contents are written atomically on success."""
    buf = io.BytesIO()
    yield buf
    atomic_write(uri, buf.getvalue())


@contextlib.contextmanager
def atomic_local_file(uri: str) -> Iterator[str]:
    """Context manager yielding a local path to write `uri`'s contents to, for files too large to
    hold in memory: on success the file is moved into place (local) or uploaded in one PUT
    (object stores), so readers see the whole file or none; on failure it is removed."""
    fs, path = get_fs(uri)
    local = "file" in _protocols(fs)
    folder = (os.path.dirname(path) or ".") if local else tempfile.mkdtemp(prefix="raysearch-upload-")
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        if local:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:
            fs.put_file(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if not local:
            shutil.rmtree(folder, ignore_errors=True)


def remove(uri: str, recursive: bool = False) -> None:
    """Delete the file at `uri` (a folder and its contents with `recursive`); nothing if it is absent."""
    fs, path = get_fs(uri)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


def listdir(uri: str) -> list[str]:
    """Names (not paths) of the entries directly under `uri`, sorted; [] if it does not exist."""
    fs, path = get_fs(uri)
    if not fs.exists(path):
        return []
    return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))


def file_digest(uri: str) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of a file, read in chunks so large shards need no RAM."""
    fs, path = get_fs(uri)
    h = hashlib.sha256()
    n = 0
    with fs.open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            n += len(chunk)
    return n, h.hexdigest()


def ensure_writable_dir(uri: str) -> None:
    """Create `uri` as a folder and prove that it accepts a file; raise PermissionError otherwise."""
    probe = join(uri, f".raysearch-write-test-{uuid.uuid4().hex}")
    try:
        makedirs(uri)
        atomic_write(probe, b"")
        remove(probe)
    except (OSError, PermissionError) as e:
        raise PermissionError(f"cannot write to output folder {uri}: {e}") from e


def local_copy(uri: str, folder: str) -> str:
    """Return a local path holding the file at `uri`, copying it into `folder` when it is remote."""
    if is_local(uri):
        return get_fs(uri)[1]
    fs, path = get_fs(uri)
    target = os.path.join(folder, posixpath.basename(path))
    fs.get_file(path, target)
    return target


def read_many(uris: list[str]) -> list[bytes | Exception]:
    """Fetch files; remote ones concurrently (fsspec's async cat), errors returned, not raised."""
    if not uris:
        return []
    out: list[bytes | Exception] = []
    if all("://" not in u for u in uris):
        for u in uris:
            try:
                with open(u, "rb") as f:
                    out.append(f.read())
            except OSError as e:
                out.append(e)
        return out
    fs, _ = get_fs(uris[0])
    paths = [get_fs(u)[1] for u in uris]
    try:
        got = fs.cat(paths, on_error="return")
    except Exception as e:  # a filesystem that fails the whole call: fall back to one by one
        got = {}
        for p in paths:
            try:
                got[p] = fs.cat_file(p)
            except Exception as inner:  # noqa: BLE001 - every failure becomes an error row
                got[p] = inner
        log.debug("batched read failed (%s), read files one by one", e)
    for p in paths:
        value = got.get(p, FileNotFoundError(p)) if isinstance(got, dict) else got
        out.append(value)
    return out


def read_failure_reason(e: Exception) -> str:
    """A short reason for an error row from the exception a read returned."""
    if isinstance(e, FileNotFoundError):
        return "file not found"
    if isinstance(e, PermissionError):
        return "permission denied"
    if isinstance(e, IsADirectoryError):
        return "is a directory"
    return f"unreadable: {type(e).__name__}: {e}"
