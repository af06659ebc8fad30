"""`raysearch build`: SOURCE -> embeddings -> index directory, resumable end to end."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import dataclasses

from raysearch import storage
from raysearch.embed import EmbedConfig, EmbedSummary, embed_source
from raysearch.formats.embeddings import check_embeddings_model, load_embeddings_manifest, resolve_embeddings_folder
from raysearch.formats.runs import RUN_FILE
from raysearch.index.build import IndexConfig, build_index
from raysearch.index.dba import DBA_EMBEDDINGS_SUBDIR, augment_embeddings
from raysearch.index.expansion import DatabaseAugmentation, QueryExpansion
from raysearch.index.store import MANIFEST
from raysearch.models.registry import resolve_model
from raysearch.models.spec import ModelSpec
from raysearch.sources import open_source

log = logging.getLogger("raysearch")
EMBEDDINGS_SUBDIR = "embeddings"
WHITENING_EMBEDDINGS_SUBDIR = "whitening-embeddings"


@dataclass(frozen=True)
class BuildResult:
    """What `build` produced: the index directory, the embedding run's summary and the index's
    manifest."""

    index_dir: str
    embed: EmbedSummary
    manifest: dict[str, Any]


def prepare_output_dir(index_dir: str, overwrite: bool, keep: tuple[str, ...] = ()) -> None:
    """Refuse to build over an existing directory unless it is our own unfinished build (resumed)
    or --overwrite is given (then it is emptied, except for the entries named in `keep`)."""
    if storage.exists(index_dir) and not storage.isdir(index_dir):
        raise ValueError(f"--out {index_dir} exists and is not a folder")
    entries = [e for e in storage.listdir(index_dir) if not e.startswith(".raysearch-write-test") and e not in keep]
    if entries:
        if overwrite:
            log.info("--overwrite: removing the contents of %s", index_dir)
            for name in entries:
                storage.remove(storage.join(index_dir, name), recursive=True)
        else:
            unfinished = MANIFEST not in entries and storage.exists(
                storage.join(index_dir, EMBEDDINGS_SUBDIR, RUN_FILE)
            )
            if not unfinished:
                raise ValueError(f"--out {index_dir} is not empty; pass --overwrite to replace it")
    storage.ensure_writable_dir(index_dir)


def build(
    source: str,
    index_dir: str,
    embed_config: EmbedConfig = EmbedConfig(),
    index_config: IndexConfig = IndexConfig(),
    overwrite: bool = False,
    dba: DatabaseAugmentation | None = None,
    query_expansion: QueryExpansion | None = None,
) -> BuildResult:
    """Embed every image of `source` and build an index in `index_dir`.

    An interrupted build rerun with the same arguments resumes: parts already embedded are kept.
    `dba` augments the database vectors before indexing; `query_expansion` is recorded as the
    index's default re-ranking for search.
    """
    spec = resolve_model(embed_config.model)  # fail on a bad model before touching the output
    open_source(source)  # fail on a missing source before touching the output
    prepare_output_dir(index_dir, overwrite)
    embeddings_dir = storage.join(index_dir, EMBEDDINGS_SUBDIR)
    summary = embed_source(source, embeddings_dir, embed_config, spec=spec)
    manifest = index_embeddings(embeddings_dir, index_dir, index_config, dba, query_expansion)
    return BuildResult(index_dir=index_dir, embed=summary, manifest=manifest)


def embeddings_for(source: str, model: dict, work_dir: str, progress: bool = False) -> str:
    """An embeddings folder of `source` made with `model` (a spec dict): the folder itself (or an
    index directory's), or the images of `source` embedded into `work_dir` (resumable, kept for
    the next run)."""
    folder = resolve_embeddings_folder(source)
    if folder is not None:
        check_embeddings_model(folder, model, source)
        return folder
    embed_source(source, work_dir, EmbedConfig(progress=progress), spec=ModelSpec.from_dict(model))
    return work_dir


def index_embeddings(
    embeddings_dir: str,
    index_dir: str,
    index_config: IndexConfig = IndexConfig(),
    dba: DatabaseAugmentation | None = None,
    query_expansion: QueryExpansion | None = None,
    embed_progress: bool = False,
) -> dict[str, Any]:
    """`build_index` plus the build-time re-ranking options; returns the manifest.

    A whitening learned on an image SOURCE (`--whiten-on`) embeds it first, into
    INDEX_DIR/whitening-embeddings. With `dba`, the database vectors are augmented first (into
    INDEX_DIR/embeddings-dba, which the index is then built from and its manifest names);
    `query_expansion` is stored in the manifest as the default that `Searcher` applies.
    """
    extra: dict[str, Any] = {}
    whitening = index_config.whitening
    if whitening is not None and whitening.source is not None:
        # An image SOURCE to learn the whitening on is embedded with the index's model first.
        model = load_embeddings_manifest(embeddings_dir)["model"]
        work = storage.join(index_dir, WHITENING_EMBEDDINGS_SUBDIR)
        folder = embeddings_for(whitening.source, model, work, progress=embed_progress)
        index_config = dataclasses.replace(
            index_config, whitening=dataclasses.replace(whitening, source=folder, trained_on=whitening.source))
    if dba is not None:
        augmented = storage.join(index_dir, DBA_EMBEDDINGS_SUBDIR)
        extra["dba"] = augment_embeddings(embeddings_dir, augmented, dba, seed=index_config.seed)
        embeddings_dir = augmented
    if query_expansion is not None:
        extra["query_expansion"] = query_expansion.to_dict()
    return build_index(embeddings_dir, index_dir, index_config, extra_manifest=extra or None)
