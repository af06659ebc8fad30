"""`raysearch search --html OUT.html`: each query beside its top-k, as thumbnails with id and score.

A hit may carry `verified` (bool) and `inliers` (int) once a second stage has checked it
geometrically; the page shows them as a badge when they are there, and nothing when they are not.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

from raysearch.pages.render import THUMBNAIL_SIZE, Thumbnails, render, write_page
from raysearch.version import __version__


def group_rows(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Result rows (query, rank, id, uri, score[, error, verified, inliers]) -> one dict per query,
    in first-seen order: {"query", "error", "hits": [row, ...]} with the hits in rank order."""
    by_query: dict[str, dict[str, Any]] = {}
    for r in rows:
        q = by_query.setdefault(r["query"], {"query": r["query"], "error": None, "hits": []})
        if r.get("error"):
            q["error"] = r["error"]
        elif r.get("id") is not None:
            q["hits"].append(r)
    for q in by_query.values():
        q["hits"].sort(key=lambda h: h["rank"])
    return list(by_query.values())


def search_page(rows: Iterable[Mapping[str, Any]], k: int, title: str = "raysearch search",
                subtitle: str = "", thumbnail_size: int = THUMBNAIL_SIZE) -> str:
    """The HTML of a search results page: every query's thumbnail beside its hits' thumbnails,
    each with rank, image_id and score (and a verified badge where the hit says). Thumbnails are
    embedded as data: URIs, so the file opens on its own."""
    thumbs = Thumbnails(thumbnail_size)
    queries = []
    for q in group_rows(rows):
        queries.append({
            "query": q["query"], "name": os.path.basename(str(q["query"]).rstrip("/")) or str(q["query"]),
            "error": q["error"], "thumb": None if q["error"] else thumbs(q["query"]),
            "hits": [{"rank": h["rank"], "id": h["id"], "uri": h["uri"], "score": float(h["score"]),
                      "verified": h.get("verified"), "inliers": h.get("inliers"), "thumb": thumbs(h["uri"])}
                     for h in q["hits"]],
        })
    return render("search.html.j2", title=title, subtitle=subtitle, version=__version__, queries=queries, k=k)


def write_search_page(path: str, rows: Iterable[Mapping[str, Any]], k: int, subtitle: str = "") -> str:
    """Write `search_page(rows, k)` to `path` (local or fsspec URI); returns the path."""
    return write_page(path, search_page(rows, k, subtitle=subtitle))
