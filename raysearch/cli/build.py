"""`raysearch build` and `raysearch index`."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from raysearch.cli.common import app, setup_logging, user_errors
from raysearch.embed import EmbedConfig
from raysearch.index.build import IndexConfig
from raysearch.models.registry import DEFAULT_MODEL, ModelConfig

# Options shared by the commands that embed images.
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Registered model name or torchscript:PATH (see `raysearch models`).")]
WeightsOpt = Annotated[Optional[str], typer.Option(help="Local weights file (torchvision state dict) for resnet50_gem / resnet101_gem.")]
PoolingOpt = Annotated[Optional[str], typer.Option(help="Pooling: gem, mac, spoc or rmac (default: the model's).")]
InputSizeOpt = Annotated[Optional[int], typer.Option(help="Square input size in pixels (default: the model's).")]
ResizeOpt = Annotated[Optional[str], typer.Option(help="Resize policy: squash, crop or pad (default: the model's).")]
BatchOpt = Annotated[int, typer.Option(help="Images per forward pass.")]
ConcurrencyOpt = Annotated[Optional[int], typer.Option(help="Embedder actors (default: one per GPU; on CPU one per 4 CPUs).")]
MaxErrOpt = Annotated[float, typer.Option(help="Fail the build if more than this share of images cannot be used.")]
AddressOpt = Annotated[Optional[str], typer.Option(help="Ray cluster address (default: $RAY_ADDRESS, else a local cluster).")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Log each stage.")]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="Ray Data progress bars.")]

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


def model_config(model: str, weights: Optional[str], pooling: Optional[str], input_size: Optional[int], resize: Optional[str]) -> ModelConfig:
    return ModelConfig(name=model, weights=weights, pooling=pooling, input_size=input_size, resize=resize)


def index_config(index: str, metric: str, max_index_memory: str, shards: int, merge: bool,
                 train_size: Optional[int], nprobe: Optional[int], target_recall: float, seed: int,
                 train_on: str = "auto") -> IndexConfig:
    return IndexConfig(
        factory=index, metric=metric, max_memory=max_index_memory, shards=shards, merge=merge,
        train_size=train_size, nprobe=nprobe, target_recall=target_recall, seed=seed, train_on=train_on,
    )


def print_index_summary(manifest: dict) -> None:
    shards = manifest["shards"]
    typer.echo(
        f"index: {manifest['factory']} ({manifest['factory_reason']}); {manifest['n_vectors']} vectors "
        f"in {len(shards)} shard{'s' if len(shards) != 1 else ''}; nprobe {manifest['search'].get('nprobe')}"
    )
    search = manifest["search"]
    if search.get("tuned"):
        reached = "" if search.get("reached") else f" (target {search['target_recall']} not reachable with these codes)"
        typer.echo(
            f"tuned: {search['param']} {search['nprobe']} gives recall@{search['k']} {search['recall_at_k']:.3f} "
            f"on {search['n_queries']} held-out queries{reached}"
        )
    train = manifest.get("build", {}).get("train")
    if train and train.get("backend") not in (None, "none"):
        typer.echo(f"trained on {train['n_train']} vectors with {train['backend']} ({train['device']}) in {train['seconds']:.1f} s")


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
    index: IndexOpt = "auto",
    metric: MetricOpt = "l2",
    max_index_memory: MaxMemOpt = "4G",
    shards: ShardsOpt = 1,
    merge: MergeOpt = False,
    train_size: TrainSizeOpt = None,
    nprobe: NprobeOpt = None,
    target_recall: RecallOpt = 0.95,
    seed: SeedOpt = 1234,
    train_on: TrainOnOpt = "auto",
    batch_size: BatchOpt = 32,
    concurrency: ConcurrencyOpt = None,
    max_error_rate: MaxErrOpt = 0.05,
    overwrite: Annotated[bool, typer.Option(help="Replace the contents of a non-empty --out.")] = False,
    address: AddressOpt = None,
    progress: ProgressOpt = True,
    verbose: VerboseOpt = False,
) -> None:
    """Embed every image of SOURCE and build a searchable index in --out.

    An interrupted build rerun with the same arguments resumes where it stopped.
    """
    from raysearch.build import build as run_build
    from raysearch.runtime import ensure_ray

    setup_logging(verbose)
    embed_cfg = EmbedConfig(
        model=model_config(model, weights, pooling, input_size, resize), batch_size=batch_size,
        concurrency=concurrency, max_error_rate=max_error_rate, progress=progress,
    )
    index_cfg = index_config(index, metric, max_index_memory, shards, merge, train_size, nprobe, target_recall, seed, train_on)
    if address:
        ensure_ray(address)
    result = run_build(source, out, embed_cfg, index_cfg, overwrite=overwrite)
    s = result.embed
    typer.echo(
        f"embedded {s.n_embedded} of {s.n_images} images ({s.n_errors} errors"
        f"{f', {s.n_skipped} already done' if s.n_skipped else ''}) in {s.seconds:.1f} s, "
        f"{s.images_per_second:.1f} images/s"
    )
    if s.n_errors:
        typer.echo(f"error table: {out.rstrip('/')}/errors.parquet")
    print_index_summary(result.manifest)
    typer.echo(f"wrote {out}")


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
    train_on: TrainOnOpt = "auto",
    overwrite: Annotated[bool, typer.Option(help="Replace the contents of a non-empty --out.")] = False,
    address: AddressOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Build an index from existing embeddings alone (no images are read).

    The index is trained once on a sample, filled by --shards Ray tasks in parallel, optionally
    merged, and its nprobe tuned to reach --target-recall; see docs/index.md.
    """
    from raysearch import storage
    from raysearch.build import prepare_output_dir
    from raysearch.index.build import build_index
    from raysearch.runtime import ensure_ray

    setup_logging(verbose)
    cfg = index_config(index, metric, max_index_memory, shards, merge, train_size, nprobe, target_recall, seed, train_on)
    if address:
        ensure_ray(address)
    # Rebuilding in place (EMBEDDINGS inside --out) must never delete the embeddings themselves.
    keep = tuple(p for p in storage.listdir(out) if storage.join(out, p).rstrip("/") == embeddings.rstrip("/"))
    prepare_output_dir(out, overwrite, keep=keep)
    manifest = build_index(embeddings, out, cfg)
    print_index_summary(manifest)
    typer.echo(f"wrote {out}")
