"""The Python API: an index directory as a collection to search and manage.

    import raysearch

    col = raysearch.open_index("photos-index")
    hits = col.search(["query.jpg"], k=5)           # one list of Hit per query
    col.remove(["holiday/beach-003"])               # searches stop returning it at once
    col.add("new-photos/", replace=True)            # embed new images, re-embed known ones
    col.compact()                                   # drop removed vectors from the shards
    col.info                                        # n_vectors, n_removed, model, factory, shards

`raysearch.build(source, out, **options)` builds an index and returns it opened. The CLI's
`remove` and `compact` commands call this module; nothing here needs a Ray cluster except
`build` and `add`, which embed images.
"""

from __future__ import annotations

import dataclasses
import io
import os
import tempfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:
    from raysearch.add import AddResult
    from raysearch.index.tombstones import CompactResult, RemoveResult
    from raysearch.rerank import RerankConfig
    from raysearch.search import Searcher


@dataclass(frozen=True)
class Hit:
    """One search result: the image's id and uri, its score (higher is more similar: the cosine
    similarity for the default metric), its metadata `fields`, and with re-ranking whether it was
    verified and with how many inliers (None without)."""

    id: str
    uri: str
    score: float
    fields: dict[str, Any] = field(default_factory=dict)
    verified: bool | None = None
    inliers: int | None = None


ImageLike = "str | os.PathLike | bytes | np.ndarray"


def _is_vector_input(queries: Any) -> bool:
    arr = np.asarray(queries) if isinstance(queries, (list, tuple)) and queries and not isinstance(
        queries[0], (str, bytes, os.PathLike, np.ndarray)) else queries
    return isinstance(arr, np.ndarray) and arr.dtype.kind == "f" and arr.ndim in (1, 2)


def _rerank_config(rerank: Any) -> "RerankConfig | None":
    from raysearch.rerank import RerankConfig, check_method

    if rerank is None or rerank is False:
        return None
    if isinstance(rerank, RerankConfig):
        return rerank
    if isinstance(rerank, str):
        check_method(rerank)
        return RerankConfig()
    if isinstance(rerank, dict):
        return RerankConfig(**rerank)
    raise ValueError(f"rerank must be None, 'local', a dict or a RerankConfig, got {rerank!r}")


class Collection:
    """An opened index directory (local or s3://). Searches use one in-process Searcher, opened on
    first use and reopened after every change made through this object."""

    def __init__(self, path: str, verify: bool = True):
        from raysearch.index.store import IndexStore

        self.store = IndexStore(str(path), verify=verify)   # refuses a missing or foreign folder now
        self.path = self.store.index_dir
        self.verify = verify
        self._searcher: "Searcher | None" = None

    def __repr__(self) -> str:
        info = self.info
        return f"Collection({self.path!r}, n_vectors={info['n_vectors']}, n_removed={info['n_removed']})"

    # -- reading ----------------------------------------------------------------------------

    def searcher(self) -> "Searcher":
        """The in-process Searcher over the index as it is now."""
        if self._searcher is None:
            from raysearch.search import Searcher

            self._searcher = Searcher(self.store, verify=self.verify)
        return self._searcher

    @property
    def info(self) -> dict[str, Any]:
        """n_vectors (searchable), n_removed (tombstoned, awaiting compaction), n_images, model
        (name), dim, metric, factory, nprobe and shards ([{"name", "count"}])."""
        m = self.store.manifest
        n_removed = int(m.get("n_removed") or 0)
        return {
            "path": self.path,
            "n_vectors": self.store.ntotal - n_removed,
            "n_removed": n_removed,
            "n_images": int(m.get("n_images", self.store.ntotal)),
            "model": m["model"]["name"],
            "dim": self.store.dim,
            "metric": self.store.metric,
            "factory": m.get("factory"),
            "nprobe": self.store.nprobe,
            "shards": [{"name": s.name, "count": s.ntotal} for s in self.store.shards],
        }

    def search(self, queries: Any, k: int = 10, where: str | None = None, rerank: Any = None,
               nprobe: int | None = None, fields: list[str] | None = None) -> list[list[Hit]]:
        """Top-k per query, best first.

        queries: images (a path or URI, file bytes, an (H, W, 3) uint8 array, or a list of them;
        arrays are encoded losslessly and read like files) or vectors ((dim,) or (n, dim) float).
        where: only images whose metadata satisfy this expression, e.g. 'label == "boots"'
        (raysearch.index.fields); a search still returns k hits where k images qualify.
        fields: the metadata columns each Hit carries (None: all of them).
        rerank: None, "local" (verify the top 20 with local features), a dict of RerankConfig
        fields or a RerankConfig; image queries only.
        Raises ValueError for a query image that cannot be read, naming it.
        """
        from raysearch.search import check_k

        check_k(k)
        searcher = self.searcher()
        second = _rerank_config(rerank)
        if _is_vector_input(queries):
            if second is not None:
                raise ValueError("rerank needs query images; vectors carry none")
            result = searcher.search(np.asarray(queries, np.float32), k, nprobe=nprobe, where=where)
            return self._hits(searcher, result, fields)
        images = list(queries) if isinstance(queries, (list, tuple)) else [queries]
        if not images:
            return []
        with tempfile.TemporaryDirectory(prefix="raysearch-queries-") as tmp:
            uris = [self._as_uri(q, i, tmp) for i, q in enumerate(images)]
            result, problems = searcher.search_images(uris, k=k, nprobe=nprobe, rerank=second, where=where)
        for i, problem in enumerate(problems):
            if problem is not None:
                shown = images[i] if isinstance(images[i], (str, os.PathLike)) else f"query {i}"
                raise ValueError(f"{shown}: {problem}")
        return self._hits(searcher, result, fields)

    @staticmethod
    def _as_uri(query: Any, i: int, tmp: str) -> str:
        """A query image as a path the Searcher reads: paths as they are, bytes and arrays as files."""
        if isinstance(query, (str, os.PathLike)):
            return os.fspath(query)
        if isinstance(query, (bytes, bytearray, memoryview)):
            data = bytes(query)
        elif isinstance(query, np.ndarray):
            if query.dtype != np.uint8 or query.ndim not in (2, 3):
                raise ValueError(f"query {i}: an image array must be (H, W) or (H, W, 3) uint8, "
                                 f"got {query.dtype} {query.shape}")
            from PIL import Image

            buf = io.BytesIO()
            Image.fromarray(query).save(buf, format="PNG")   # lossless: the pixels as given
            data = buf.getvalue()
        else:
            raise ValueError(f"query {i}: expected a path, bytes, an image array or vectors, got {type(query).__name__}")
        path = os.path.join(tmp, f"query-{i:05d}.img")
        with open(path, "wb") as f:
            f.write(data)
        return path

    @staticmethod
    def _hits(searcher: "Searcher", result, columns: list[str] | None) -> list[list[Hit]]:
        image_ids, uris = searcher.lookup(result)
        values = searcher.fields_of(result, columns)
        out = []
        for q in range(result.ids.shape[0]):
            row = []
            for r in range(result.ids.shape[1]):
                if result.ids[q, r] < 0:
                    break
                extra = {}
                if result.verified is not None:
                    extra = {"verified": bool(result.verified[q, r]), "inliers": int(result.inliers[q, r])}
                row.append(Hit(str(image_ids[q, r]), str(uris[q, r]), float(result.scores[q, r]), values[q][r], **extra))
            out.append(row)
        return out

    # -- changing ---------------------------------------------------------------------------

    def _reopen(self) -> None:
        from raysearch.index.store import IndexStore

        self.store = IndexStore(self.path, verify=self.verify)
        self._searcher = None

    def remove(self, ids: Sequence[str] | str) -> "RemoveResult":
        """Remove images by image_id: searches stop returning them; `compact` (or the next `add`)
        drops their vectors from the shards. Raises ValueError naming ids the index does not hold
        (nothing is removed then)."""
        from raysearch.index.tombstones import remove_images

        result = remove_images(self.path, [ids] if isinstance(ids, str) else list(ids), verify=self.verify)
        self._reopen()
        return result

    def compact(self) -> "CompactResult":
        """Drop the removed vectors from the shards (rewritten under new names) and clear the list."""
        from raysearch.index.tombstones import compact_index

        result = compact_index(self.path)
        self._reopen()
        return result

    def add(self, source: str, replace: bool = False, **options: Any) -> "AddResult":
        """Embed `source`'s images with the index's own model and add them (compacting removed
        vectors first). replace: re-embed images already indexed (their old vectors are removed)
        instead of skipping them. options: fields of raysearch.add.AddConfig (shards, merge) and of
        raysearch.embed.EmbedConfig (batch_size, concurrency, max_error_rate, progress)."""
        from raysearch.add import AddConfig, add_images
        from raysearch.embed import EmbedConfig

        embed, rest = _split_options(options, EmbedConfig, {"progress": False})
        add_fields = {f.name for f in dataclasses.fields(AddConfig)} - {"embed", "replace"}
        unknown = set(rest) - add_fields
        if unknown:
            raise ValueError(f"unknown add option(s) {sorted(unknown)}; choose from "
                             f"{sorted(add_fields | {f.name for f in dataclasses.fields(EmbedConfig)})}")
        result = add_images(self.path, str(source), AddConfig(embed=EmbedConfig(**embed), replace=replace, **rest))
        self._reopen()
        return result


def _split_options(options: dict[str, Any], config_type: type, defaults: dict[str, Any]) -> tuple[dict, dict]:
    """(the options that are fields of `config_type`, with `defaults` under them; the others)."""
    names = {f.name for f in dataclasses.fields(config_type)}
    mine = {**{k: v for k, v in defaults.items() if k in names}, **{k: v for k, v in options.items() if k in names}}
    return mine, {k: v for k, v in options.items() if k not in names}


def open_index(path: str | os.PathLike, verify: bool = True) -> Collection:
    """Open an index directory (local or s3://) as a Collection. verify: check every file it loads
    against its checksum in the manifest (sizes are always checked)."""
    return Collection(os.fspath(path), verify=verify)


def build(source: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False, **options: Any) -> Collection:
    """Embed every image of `source`, build an index in `out` and return it opened. The extra
    columns of a .csv / .parquet list SOURCE become the images' metadata (Hit.fields, where=).

    options: `model` (a registered name, or a raysearch.models.spec.ModelConfig), the fields of
    raysearch.embed.EmbedConfig (batch_size, concurrency, max_error_rate, progress, local, ...)
    and of raysearch.index.build.IndexConfig (factory, metric, shards, merge, nprobe, seed, ...);
    `index` is accepted for `factory`, as on the command line. Raises ValueError naming an
    unknown option."""
    from raysearch.builder import build as build_index_dir
    from raysearch.embed import EmbedConfig
    from raysearch.index.build import IndexConfig
    from raysearch.models.spec import ModelConfig

    options = dict(options)
    if "index" in options:
        options["factory"] = options.pop("index")
    if isinstance(options.get("model"), str):
        options["model"] = ModelConfig(name=options["model"])
    embed, rest = _split_options(options, EmbedConfig, {"progress": False})
    index, rest = _split_options(rest, IndexConfig, {})
    if rest:
        choices = sorted({f.name for f in dataclasses.fields(EmbedConfig)} | {f.name for f in dataclasses.fields(IndexConfig)})
        raise ValueError(f"unknown build option(s) {sorted(rest)}; choose from {choices}")
    # The builder also records the extra columns of a .csv / .parquet list SOURCE.
    build_index_dir(os.fspath(source), os.fspath(out), EmbedConfig(**embed), IndexConfig(**index), overwrite=overwrite)
    return open_index(out)


__all__ = ["Collection", "Hit", "build", "open_index"]
