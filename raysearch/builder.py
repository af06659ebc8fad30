"""`raysearch build`: SOURCE -> embeddings -> index directory, resumable end to end."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from typing import Any


from raysearch import storage
from raysearch.embed import EmbedConfig, EmbedSummary, embed_source, local_record
from raysearch.formats.embeddings import check_embeddings_model, load_embeddings_manifest, resolve_embeddings_folder
from raysearch.index.build import IndexConfig, build_index, check_index_request
from raysearch.index.dba import DBA_EMBEDDINGS_SUBDIR, augment_embeddings
from raysearch.index.expansion import DatabaseAugmentation, QueryExpansion
from raysearch.index.store import MANIFEST
from raysearch.models.registry import resolve_model
from raysearch.models.spec import ModelSpec
from raysearch.sources import open_source

log = logging.getLogger("raysearch")
EMBEDDINGS_SUBDIR = "embeddings"
WHITENING_EMBEDDINGS_SUBDIR = "whitening-embeddings"


# What a build writes into its folder: a folder holding only these (and no manifest) is a build
# that stopped before the end, resumed by the same command.
BUILD_ENTRIES = frozenset({EMBEDDINGS_SUBDIR, WHITENING_EMBEDDINGS_SUBDIR, DBA_EMBEDDINGS_SUBDIR, "shards",
                           "trained.index", "errors.parquet"})


@dataclass(frozen=True)
class BuildResult:
    """What `build` produced: the index directory, the embedding run's summary (None when the
    folder already held this build, complete: then nothing was done) and the index's manifest."""

    index_dir: str
    embed: EmbedSummary | None
    manifest: dict[str, Any]
    complete_before: bool = False


def build_request(source: str, spec: dict, index_config: IndexConfig, dba: DatabaseAugmentation | None,
                  query_expansion: QueryExpansion | None, local: dict | None = None) -> dict[str, Any]:
    """What a build was asked for, as stored in its manifest: a rerun asking for the same finds the
    index complete instead of refusing the folder."""
    index = {k: v for k, v in dataclasses.asdict(index_config).items() if k != "progress"}
    return json.loads(json.dumps({
        "source": source, "model": spec, "index": index,
        "dba": dba.to_dict() if dba else None, "query_expansion": query_expansion.to_dict() if query_expansion else None,
        "local": local["extractor"] if local else None,
    }, default=str))


def prepare_output_dir(index_dir: str, overwrite: bool, keep: tuple[str, ...] = (),
                       request: dict[str, Any] | None = None) -> str:
    """Get `index_dir` ready for a build. Returns "new" (empty or emptied), "resume" (our own
    build that stopped before the end) or "complete" (a finished build of exactly `request`).

    Anything else in the folder is refused unless --overwrite is given (then it is emptied,
    except for the entries named in `keep`).
    """
    if storage.exists(index_dir) and not storage.isdir(index_dir):
        raise ValueError(f"--out {index_dir} exists and is not a folder")
    entries = [e for e in storage.listdir(index_dir) if not e.startswith(".raysearch-write-test") and e not in keep]
    state = "new"
    if entries:
        if overwrite:
            log.info("--overwrite: removing the contents of %s", index_dir)
            for name in entries:
                storage.remove(storage.join(index_dir, name), recursive=True)
        elif MANIFEST in entries:
            previous = storage.read_json(storage.join(index_dir, MANIFEST)).get("build", {}).get("request")
            if request is None or previous != request:
                raise ValueError(
                    f"--out {index_dir} holds another index; pass --overwrite to replace it"
                    if previous else f"--out {index_dir} is not empty; pass --overwrite to replace it"
                )
            state = "complete"
        elif set(entries) <= BUILD_ENTRIES:
            state = "resume"
        else:
            raise ValueError(f"--out {index_dir} is not empty; pass --overwrite to replace it")
    storage.ensure_writable_dir(index_dir)
    return state


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
    index_dir = storage.absolute(index_dir)
    spec = resolve_model(embed_config.model)  # fail on a bad model before touching the output
    open_source(source)  # fail on a missing source before touching the output
    local = local_record(embed_config.local)  # and on local features this machine cannot extract
    request = build_request(source, spec.to_dict(), index_config, dba, query_expansion, local)
    if prepare_output_dir(index_dir, overwrite, request=request) == "complete":
        return BuildResult(index_dir, None, storage.read_json(storage.join(index_dir, MANIFEST)), complete_before=True)
    embeddings_dir = storage.join(index_dir, EMBEDDINGS_SUBDIR)

    def check(listing) -> None:
        # The index options are checked against the model's dimension and the listing's count
        # before any image is read: a bad --index fails in seconds, not after embedding.
        check_index_request(index_config, spec.dim, max(1, listing.n_rows - listing.n_duplicates))

    summary = embed_source(source, embeddings_dir, embed_config, spec=spec, before_embedding=check)
    manifest = index_embeddings(embeddings_dir, index_dir, index_config, dba, query_expansion,
                                embed_progress=embed_config.progress, request=request)
    # The extra columns of a .csv / .parquet list SOURCE, for --fields and --where.
    manifest = _with_fields(index_dir, source, manifest)
    return BuildResult(index_dir=index_dir, embed=summary, manifest=manifest)


def _with_fields(index_dir: str, source: str, manifest: dict[str, Any]) -> dict[str, Any]:
    from raysearch.index.fields import attach_fields

    if attach_fields(index_dir, source) is None:
        return manifest
    return storage.read_json(storage.join(index_dir, MANIFEST))


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
    request: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`build_index` plus the build-time re-ranking options; returns the manifest.

    A whitening learned on an image SOURCE (`--whiten-on`) embeds it first, into
    INDEX_DIR/whitening-embeddings. With `dba`, the database vectors are augmented first (into
    INDEX_DIR/embeddings-dba, which the index is then built from and its manifest names);
    `query_expansion` is stored in the manifest as the default that `Searcher` applies.
    """
    extra: dict[str, Any] = {}
    # The shard builders are Ray actors: they need paths that do not depend on this process's cwd.
    embeddings_dir, index_dir = storage.absolute(embeddings_dir), storage.absolute(index_dir)
    emb = load_embeddings_manifest(embeddings_dir)
    check_index_request(index_config, int(emb["dim"]), max(1, int(emb.get("n_embedded", 1))))
    if request is None:
        request = build_request(embeddings_dir, emb["model"], index_config, dba, query_expansion)
    # Local features extracted in the embedding pass (`--local`) are gathered beside the shards.
    local_features = {**emb["local"], "parts": embeddings_dir} if emb.get("local") else None
    whitening = index_config.whitening
    if whitening is not None and whitening.source is not None:
        # An image SOURCE to learn the whitening on is embedded with the index's model first.
        work = storage.join(index_dir, WHITENING_EMBEDDINGS_SUBDIR)
        folder = embeddings_for(whitening.source, emb["model"], work, progress=embed_progress)
        index_config = dataclasses.replace(
            index_config, whitening=dataclasses.replace(whitening, source=folder, trained_on=whitening.source))
    if dba is not None:
        augmented = storage.join(index_dir, DBA_EMBEDDINGS_SUBDIR)
        extra["dba"] = augment_embeddings(embeddings_dir, augmented, dba, seed=index_config.seed)
        embeddings_dir = augmented
    if query_expansion is not None:
        extra["query_expansion"] = query_expansion.to_dict()
    return build_index(embeddings_dir, index_dir, index_config, extra_manifest=extra, build_record={"request": request},
                       local_features=local_features)


def build_progress(index_dir: str) -> tuple[int, int] | None:
    """(images done, images listed) of the build in `index_dir` as its parts on disk show it;
    None before the SOURCE was listed. For telling a user where an interrupted build stands."""
    from raysearch.embed import embeddings_run
    from raysearch.formats.runs import RUN_FILE
    from raysearch.sources.listing import Listing

    run = embeddings_run(storage.join(index_dir, EMBEDDINGS_SUBDIR))
    if not storage.exists(storage.join(run.uri, RUN_FILE)):
        return None
    listing = Listing.from_dict(storage.read_json(storage.join(run.uri, RUN_FILE))["listing"])
    return int(run.done_mask(listing, ("parts", "errors")).sum()), listing.n_rows
