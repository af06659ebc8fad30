"""Published data set layouts as SOURCE strings: 'disc21:ROOT[:split]' and 'gldv2:ROOT[:split]'.

ROOT is a local folder or any fsspec URI (s3://bucket/disc21). The split is the text after the
last ':' when it names a split of the layout (so 's3://...' roots need no escaping); without one,
the layout's default split is used (DISC21: references, GLDv2: index). See `raysearch.sources.disc21`
and `raysearch.sources.gldv2` for the folder and file names each layout recognises.
"""

from __future__ import annotations

import os

from raysearch.sources.base import ImageSource

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


def open_layout(spec: str) -> ImageSource:
    """The ImageSource for a 'disc21:...' or 'gldv2:...' SOURCE string.

    Raises FileNotFoundError when the split's folder (or a file it needs) is missing and
    ValueError for a malformed string.
    """
    spec = spec.strip()
    if spec.startswith("disc21:"):
        from raysearch.sources.disc21 import open_disc21

        return open_disc21(spec)
    if spec.startswith("gldv2:"):
        from raysearch.sources.gldv2 import open_gldv2

        return open_gldv2(spec)
    raise ValueError(f"SOURCE {spec!r} is not a data set layout (known: {', '.join(LAYOUT_PREFIXES)})")


__all__ = ["LAYOUT_PREFIXES", "open_layout", "split_layout_spec"]
