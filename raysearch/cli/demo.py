"""`raysearch demo`."""

from __future__ import annotations

import os
import time
from typing import Annotated

import typer

from raysearch.cli.common import app, setup_logging, user_errors


@app.command()
@user_errors
def demo(
    workdir: Annotated[str, typer.Option(help="Folder for the sample images, queries and index.")] = "raysearch-demo",
    images: Annotated[int, typer.Option(help="Reference images (photographs and crops of them).")] = 300,
    queries: Annotated[int, typer.Option(help="Edited copies to search with.")] = 64,
    seed: Annotated[int, typer.Option(help="Seed for crops and edits.")] = 0,
    show: Annotated[int, typer.Option(help="Queries whose top results are printed.")] = 8,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Build an index over sample photographs and search it with edited copies (offline, CPU)."""
    from raysearch.demo import run_demo

    setup_logging(verbose)
    start = time.perf_counter()
    typer.echo(f"demo: {images} reference images and {queries} edited queries in {workdir}/")
    report = run_demo(workdir, n_images=images, n_queries=queries, seed=seed, progress=progress)
    s = report.build.embed
    m = report.build.manifest
    typer.echo(f"built {workdir}/index: {s.n_embedded} images, {m['factory']}, {s.images_per_second:.1f} images/s embedding")
    typer.echo("")
    for q in range(min(show, len(report.queries))):
        mark = "ok " if report.top_ids[q] and report.top_ids[q][0] == report.expected[q] else "MISS"
        typer.echo(f"[{mark}] {os.path.basename(report.queries[q])}  (edit: {report.edits[q]}, expected {report.expected[q]})")
        for rank, (i, sc) in enumerate(zip(report.top_ids[q][:3], report.top_scores[q][:3]), 1):
            typer.echo(f"       {rank}. {i:28s} score {sc:.3f}")
    typer.echo("")
    typer.echo("recall@1 by edit: " + ", ".join(f"{e} {r:.2f}" for e, r in report.recall_by_edit.items()))
    typer.echo(f"recall@1: {report.recall_at_1:.3f} over {len(report.queries)} queries")
    typer.echo(f"done in {time.perf_counter() - start:.0f} s; try: raysearch search {workdir}/index {report.queries[0]}")
