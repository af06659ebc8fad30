"""`raysearch build` and `raysearch index`."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from raysearch.cli.common import app, interrupted, setup_logging, user_errors
from raysearch.models.names import DEFAULT_MODEL

# Options shared by the commands that embed images.
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Registered model name or torchscript:PATH (see `raysearch models`).")]
WeightsOpt = Annotated[Optional[str], typer.Option(help="Local weights file (torchvision state dict) for resnet50_gem / resnet101_gem.")]
PoolingOpt = Annotated[Optional[str], typer.Option(help="Pooling: gem, mac, spoc or rmac (default: the model's).")]
InputSizeOpt = Annotated[Optional[int], typer.Option(help="Square input size in pixels (default: the model's).")]
ResizeOpt = Annotated[Optional[str], typer.Option(help="Resize policy: squash, crop or pad (default: the model's).")]
BatchOpt = Annotated[Optional[int], typer.Option(help="Images per forward pass (default: 4 on CPU, sized to the GPU's input size on a GPU).")]
ConcurrencyOpt = Annotated[Optional[int], typer.Option(help="Embedder actors (default: one per GPU; on CPU one per 4 CPUs).")]
MaxErrOpt = Annotated[float, typer.Option(help="Fail the build if more than this share of images cannot be used.")]
AddressOpt = Annotated[Optional[str], typer.Option(help="Ray cluster address (default: $RAY_ADDRESS, else a local cluster).")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Log each stage.")]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="Ray Data progress bars.")]
LocalOpt = Annotated[Optional[str], typer.Option("--local", help="Also extract local features in the same pass and store them beside each shard, for `--rerank local`: sift (OpenCV, ~25 KB an image) or aliked (needs raysearch[local]; slow on CPU).")]

# Options shared by the commands that build an index.
IndexOpt = Annotated[str, typer.Option("--index", help="'auto' or a FAISS factory string, e.g. 'IVF4096,PQ32'.")]
MetricOpt = Annotated[str, typer.Option(help="l2 or ip; on unit vectors both rank alike, l2 suits PQ better.")]
MaxMemOpt = Annotated[str, typer.Option("--max-index-memory", help="Memory budget that --index auto must respect, e.g. 4G.")]
ShardsOpt = Annotated[int, typer.Option(help="Shard builders (Ray tasks) adding vectors in parallel.")]
MergeOpt = Annotated[bool, typer.Option("--merge/--no-merge", help="Merge the shards into one index file.")]
TrainSizeOpt = Annotated[Optional[int], typer.Option(help="Training sample size (default: from nlist and PQ).")]
NprobeOpt = Annotated[Optional[int], typer.Option(help="Fixed nprobe / efSearch instead of tuning.")]
RecallOpt = Annotated[float, typer.Option(help="Recall@10 the tuned nprobe must reach.")]
SeedOpt = Annotated[int, typer.Option(help="Seed for sampling and k-means.")]
TrainOnOpt = Annotated[str, typer.Option(help="Where k-means runs: auto (FAISS GPU, else torch on CUDA, else CPU), cpu, faiss-gpu, torch or torch:DEVICE.")]
KmeansOpt = Annotated[str, typer.Option(help="Coarse k-means: auto (two-level on the CPU from nlist 8192, else flat), flat (FAISS's own Lloyd k-means) or two-level (several times faster on large nlist).")]

# Retrieval-quality options (see docs/evaluate.md for what each does and costs).
ScalesOpt = Annotated[Optional[str], typer.Option(help="Multi-scale extraction: comma-separated scales combined by GeM, e.g. '1,0.7071,0.5' (cost: ~1.75x embedding time).")]
WhitenOpt = Annotated[bool, typer.Option("--whiten/--no-whiten", help="Learn PCA-whitening on the indexed embeddings and apply it inside the index (queries are whitened automatically).")]
WhitenOnOpt = Annotated[Optional[str], typer.Option(help="Learn the whitening on another set instead: an embeddings folder, an index directory or an image SOURCE (implies --whiten).")]
WhitenDimOpt = Annotated[Optional[int], typer.Option(help="Dimensions kept by the whitening (default: all, at most the training vectors - 1).")]
WhitenShrinkOpt = Annotated[float, typer.Option(help="Whitening regularisation: added to every variance, as a multiple of the mean variance.")]
DbaOpt = Annotated[int, typer.Option(help="Database-side augmentation: average every database vector with its K nearest neighbours (0 = off).")]
DbaAlphaOpt = Annotated[float, typer.Option(help="DBA neighbour weight = similarity ** alpha.")]
QeOpt = Annotated[int, typer.Option(help="Default alpha query expansion for searches of this index: expand with the top K results (0 = off).")]
QeAlphaOpt = Annotated[float, typer.Option(help="Query expansion weight = similarity ** alpha.")]


def parse_scales(text: Optional[str]) -> tuple[float, ...]:
    """'1,0.7071,0.5' -> (1.0, 0.7071, 0.5); None -> (1.0,)."""
    if not text:
        return (1.0,)
    try:
        scales = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--scales must be comma-separated numbers such as 1,0.7071,0.5, got {text!r}") from None
    if not scales:
        raise ValueError(f"--scales names no scale: {text!r}")
    return scales


def quality_options(whiten: bool, whiten_on: Optional[str], whiten_dim: Optional[int], whiten_shrinkage: float,
                    dba: int, dba_alpha: float, qe: int, qe_alpha: float):
    """(WhiteningConfig | None, DatabaseAugmentation | None, QueryExpansion | None) from the options."""
    from raysearch.index.transforms import WhiteningConfig
    from raysearch.index.expansion import DatabaseAugmentation, QueryExpansion

    if dba < 0 or qe < 0:
        raise ValueError(f"--dba and --qe must be >= 0, got {dba} and {qe}")
    whitening = (
        WhiteningConfig(source=whiten_on, dim=whiten_dim, shrinkage=whiten_shrinkage)
        if (whiten or whiten_on) else None
    )
    if whitening is None and whiten_dim is not None:
        raise ValueError("--whiten-dim needs --whiten or --whiten-on")
    return (
        whitening,
        DatabaseAugmentation(dba, dba_alpha) if dba else None,
        QueryExpansion(qe, qe_alpha) if qe else None,
    )


def model_config(model: str, weights: Optional[str], pooling: Optional[str], input_size: Optional[int], resize: Optional[str],
                 scales: Optional[str] = None):
    from raysearch.models.spec import ModelConfig

    return ModelConfig(name=model, weights=weights, pooling=pooling, input_size=input_size, resize=resize,
                       scales=parse_scales(scales))


def index_config(index: str, metric: str, max_index_memory: str, shards: int, merge: bool,
                 train_size: Optional[int], nprobe: Optional[int], target_recall: float, seed: int,
                 whitening=None, train_on: str = "auto", kmeans: str = "auto"):
    from raysearch.index.build import IndexConfig

    return IndexConfig(
        factory=index, metric=metric, max_memory=max_index_memory, shards=shards, merge=merge,
        train_size=train_size, nprobe=nprobe, target_recall=target_recall, seed=seed, whitening=whitening,
        train_on=train_on, kmeans=kmeans,
    )


def search_setting(search: dict) -> str:
    """How the index is searched, in words: "exact search", "nprobe 12" or "efSearch 64"."""
    if search.get("exact") or search.get("nprobe") is None:
        return "exact search" if search.get("exact") else "no search parameter"
    return f"{search.get('param') or 'nprobe'} {search['nprobe']}"


def print_index_summary(manifest: dict) -> None:
    shards = manifest["shards"]
    typer.echo(
        f"index: {manifest['factory']} ({manifest['factory_reason']}); {manifest['n_vectors']} vectors "
        f"in {len(shards)} shard{'s' if len(shards) != 1 else ''}; {search_setting(manifest['search'])}"
    )
    extras = []
    if manifest.get("whitening"):
        w = manifest["whitening"]
        extras.append(f"PCA-whitening {w['dim_in']}->{w['dim_out']} learned on {w['trained_on']} ({w['n_train']} vectors)")
    if manifest.get("dba"):
        extras.append(f"DBA k={manifest['dba']['k']} alpha={manifest['dba']['alpha']:g}")
    if manifest.get("query_expansion"):
        extras.append(f"default alpha-QE k={manifest['query_expansion']['k']} alpha={manifest['query_expansion']['alpha']:g}")
    if extras:
        typer.echo("quality: " + "; ".join(extras))
    local = manifest.get("local")
    if local:
        stored = sum(manifest["files"][name]["size"] for name in local["files"].values())
        typer.echo(f"local features: {local['extractor']['name']} for {local['n_images']} images, "
                   f"{stored / max(1, local['n_images']) / 1024:.1f} KB an image (raysearch search --rerank local)")
    search = manifest["search"]
    if search.get("tuned"):
        reached = "" if search.get("reached") else f" (target {search['target_recall']} not reachable with these codes)"
        typer.echo(
            f"tuned: {search['param']} {search['nprobe']} gives recall@{search['k']} {search['recall_at_k']:.3f} "
            f"on {search['n_queries']} copies of held-out vectors{reached}"
        )
    train = manifest.get("build", {}).get("train")
    if train and train.get("backend") not in (None, "none"):
        kmeans = f", {train['kmeans']} k-means" if train.get("kmeans") else ""
        typer.echo(f"trained on {train['n_train']} vectors with {train['backend']} ({train['device']}{kmeans}) in {train['seconds']:.1f} s")


@app.command()
@user_errors
def build(
    source: Annotated[str, typer.Argument(help="Folder, glob, list file (.txt/.csv/.parquet), s3:// URI, disc21:ROOT[:split] or gldv2:ROOT[:split].")],
    out: Annotated[str, typer.Option("--out", "-o", help="Index directory to create (local path or s3://).")],
    model: ModelOpt = DEFAULT_MODEL,
    weights: WeightsOpt = None,
    pooling: PoolingOpt = None,
    input_size: InputSizeOpt = None,
    resize: ResizeOpt = None,
    scales: ScalesOpt = None,
    index: IndexOpt = "auto",
    metric: MetricOpt = "l2",
    max_index_memory: MaxMemOpt = "4G",
    shards: ShardsOpt = 1,
    merge: MergeOpt = False,
    train_size: TrainSizeOpt = None,
    nprobe: NprobeOpt = None,
    target_recall: RecallOpt = 0.95,
    seed: SeedOpt = 1234,
    whiten: WhitenOpt = False,
    whiten_on: WhitenOnOpt = None,
    whiten_dim: WhitenDimOpt = None,
    whiten_shrinkage: WhitenShrinkOpt = 0.1,
    dba: DbaOpt = 0,
    dba_alpha: DbaAlphaOpt = 3.0,
    qe: QeOpt = 0,
    qe_alpha: QeAlphaOpt = 3.0,
    train_on: TrainOnOpt = "auto",
    kmeans: KmeansOpt = "auto",
    batch_size: BatchOpt = None,
    concurrency: ConcurrencyOpt = None,
    max_error_rate: MaxErrOpt = 0.05,
    local: LocalOpt = None,
    overwrite: Annotated[bool, typer.Option(help="Replace the contents of a non-empty --out.")] = False,
    address: AddressOpt = None,
    progress: ProgressOpt = True,
    verbose: VerboseOpt = False,
) -> None:
    """Embed every image of SOURCE and build a searchable index in --out.

    An interrupted build rerun with the same arguments resumes where it stopped.
    """
    from raysearch.builder import build as run_build
    from raysearch.embed import EmbedConfig
    from raysearch.runtime import ensure_ray

    setup_logging(verbose)
    embed_cfg = EmbedConfig(
        model=model_config(model, weights, pooling, input_size, resize, scales), batch_size=batch_size,
        concurrency=concurrency, max_error_rate=max_error_rate, progress=progress, local=local,
    )
    whitening, dba_cfg, qe_cfg = quality_options(whiten, whiten_on, whiten_dim, whiten_shrinkage, dba, dba_alpha, qe, qe_alpha)
    index_cfg = index_config(index, metric, max_index_memory, shards, merge, train_size, nprobe, target_recall, seed, whitening, train_on, kmeans)
    if address:
        ensure_ray(address)
    try:
        result = run_build(source, out, embed_cfg, index_cfg, overwrite=overwrite, dba=dba_cfg, query_expansion=qe_cfg)
    except KeyboardInterrupt:
        from raysearch.builder import build_progress

        raise interrupted(build_progress(out), "images") from None
    if result.complete_before:
        typer.echo(f"{out} already holds this build, complete: nothing to do (--overwrite rebuilds it)")
        print_index_summary(result.manifest)
        return
    s = result.embed
    if s.n_skipped == s.n_images:
        typer.echo(f"embedded {s.n_embedded} of {s.n_images} images ({s.n_errors} errors), all by an earlier run")
    else:
        typer.echo(
            f"embedded {s.n_embedded} of {s.n_images} images ({s.n_errors} errors"
            f"{f', {s.n_skipped} already done' if s.n_skipped else ''}) in {s.seconds:.1f} s, "
            f"{s.images_per_second:.1f} images/s"
        )
    if s.n_errors:
        print_skipped(out)
    print_index_summary(result.manifest)
    typer.echo(f"wrote {out}")


def print_skipped(index_dir: str, show: int = 5) -> None:
    """The first skipped images with their reasons, and where the whole error table is."""
    from raysearch.index.store import IndexStore

    errors = IndexStore(index_dir, verify=False).errors()
    for row in errors.slice(0, show).to_pylist():
        typer.echo(f"  skipped {row['uri']}: {row['reason']}")
    if errors.num_rows > show:
        typer.echo(f"  ... and {errors.num_rows - show} more")
    typer.echo(f"error table: {index_dir.rstrip('/')}/errors.parquet (raysearch errors {index_dir})")


@app.command("index")
@user_errors
def index_cmd(
    embeddings: Annotated[str, typer.Argument(help="An embeddings folder (e.g. INDEX_DIR/embeddings of an earlier build).")],
    out: Annotated[str, typer.Option("--out", "-o", help="Index directory to create.")],
    index: IndexOpt = "auto",
    metric: MetricOpt = "l2",
    max_index_memory: MaxMemOpt = "4G",
    shards: ShardsOpt = 1,
    merge: MergeOpt = False,
    train_size: TrainSizeOpt = None,
    nprobe: NprobeOpt = None,
    target_recall: RecallOpt = 0.95,
    seed: SeedOpt = 1234,
    whiten: WhitenOpt = False,
    whiten_on: WhitenOnOpt = None,
    whiten_dim: WhitenDimOpt = None,
    whiten_shrinkage: WhitenShrinkOpt = 0.1,
    dba: DbaOpt = 0,
    dba_alpha: DbaAlphaOpt = 3.0,
    qe: QeOpt = 0,
    qe_alpha: QeAlphaOpt = 3.0,
    train_on: TrainOnOpt = "auto",
    kmeans: KmeansOpt = "auto",
    overwrite: Annotated[bool, typer.Option(help="Replace the contents of a non-empty --out.")] = False,
    address: AddressOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Build an index from existing embeddings alone (no images are read).

    The index is trained once on a sample, filled by --shards Ray tasks in parallel, optionally
    merged, and its nprobe tuned to reach --target-recall; see docs/index.md.
    """
    from raysearch import storage
    from raysearch.builder import build_request, index_embeddings, prepare_output_dir
    from raysearch.formats.embeddings import load_embeddings_manifest
    from raysearch.runtime import ensure_ray

    setup_logging(verbose)
    whitening, dba_cfg, qe_cfg = quality_options(whiten, whiten_on, whiten_dim, whiten_shrinkage, dba, dba_alpha, qe, qe_alpha)
    cfg = index_config(index, metric, max_index_memory, shards, merge, train_size, nprobe, target_recall, seed, whitening, train_on, kmeans)
    if address:
        ensure_ray(address)
    # Rebuilding in place (EMBEDDINGS inside --out) must never delete the embeddings themselves.
    keep = tuple(p for p in storage.listdir(out) if storage.join(out, p).rstrip("/") == embeddings.rstrip("/"))
    emb = load_embeddings_manifest(embeddings)
    request = build_request(embeddings, emb["model"], cfg, dba_cfg, qe_cfg)
    if prepare_output_dir(out, overwrite, keep=keep, request=request) == "complete":
        typer.echo(f"{out} already holds this index, complete: nothing to do (--overwrite rebuilds it)")
        print_index_summary(storage.read_json(storage.join(out, "manifest.json")))
        return
    manifest = index_embeddings(embeddings, out, cfg, dba_cfg, qe_cfg, request=request)
    print_index_summary(manifest)
    typer.echo(f"wrote {out}")
