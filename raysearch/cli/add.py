"""`raysearch add`: grow an index with new images, without retraining."""

from __future__ import annotations

from typing import Annotated

import typer

from raysearch.cli.build import AddressOpt, BatchOpt, ConcurrencyOpt, MaxErrOpt, ProgressOpt, VerboseOpt
from raysearch.cli.common import app, setup_logging, user_errors


@app.command()
@user_errors
def add(
    index_dir: Annotated[str, typer.Argument(help="Index directory to grow (local or s3://).")],
    source: Annotated[str, typer.Argument(help="Folder, glob, list file or s3:// URI with the new images.")],
    shards: Annotated[int, typer.Option(help="New shards the added vectors are split over (built in parallel).")] = 1,
    merge: Annotated[bool, typer.Option("--merge/--no-merge", help="Append to the last shard instead of adding new shards.")] = False,
    replace: Annotated[bool, typer.Option("--replace/--no-replace", help="Embed images already in the index again (their old vectors are removed) instead of skipping them.")] = False,
    batch_size: BatchOpt = None,
    concurrency: ConcurrencyOpt = None,
    max_error_rate: MaxErrOpt = 0.05,
    address: AddressOpt = None,
    progress: ProgressOpt = True,
    verbose: VerboseOpt = False,
) -> None:
    """Embed SOURCE's images with the index's own model and append them to INDEX_DIR.

    Images whose image_id the index already holds are skipped and reported (with --replace:
    embedded again, replacing their old vectors). Removed images are compacted out first. The
    quantiser is not retrained; the manifest is rewritten last, so an interrupted add leaves the
    index as it was (rerun the same command to finish it).
    """
    from raysearch.embed import EmbedConfig
    from raysearch.add import AddConfig, add_images
    from raysearch.runtime import ensure_ray

    setup_logging(verbose)
    config = AddConfig(
        embed=EmbedConfig(batch_size=batch_size, concurrency=concurrency, max_error_rate=max_error_rate, progress=progress),
        shards=shards,
        merge=merge,
        replace=replace,
    )
    if address:
        ensure_ray(address)
    result = add_images(index_dir, source, config)
    if result.n_compacted:
        typer.echo(f"compacted {result.n_compacted} removed vectors out of the shards")
    if result.n_replaced:
        typer.echo(f"replaced {result.n_replaced} of {result.n_source} images already in the index (embedded again)")
    if result.n_skipped:
        examples = ", ".join(result.skipped_examples) + (", ..." if result.n_skipped > len(result.skipped_examples) else "")
        typer.echo(f"skipped {result.n_skipped} of {result.n_source} images already in the index ({examples})")
    if result.addition is None:
        typer.echo(f"nothing to add: every image of {source} is already in {index_dir}")
        return
    s = result.embed
    assert s is not None
    typer.echo(
        f"added {result.n_added} images ({s.n_errors} errors) as {result.addition}; "
        f"the index now holds {result.manifest['n_vectors']} vectors in {len(result.manifest['shards'])} shards"
    )
    if result.n_skipped:
        typer.echo(f"skipped list: {index_dir.rstrip('/')}/{result.addition}/skipped.parquet")
    if s.n_errors:
        typer.echo(f"error table: {index_dir.rstrip('/')}/{result.addition}/errors.parquet")

