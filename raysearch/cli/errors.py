"""`raysearch errors`: the images a build, an add or an activation could not use, and why."""

from __future__ import annotations

import csv
import json
import sys
from typing import Annotated, Optional

import typer

from raysearch.cli.common import OutputFormat, app, setup_logging, user_errors


def error_table(folder: str):
    """The error rows (row, image_id, uri, reason) of an index directory (its build's and its
    additions') or of a run folder holding errors/ parts (an embeddings or activation folder)."""
    from raysearch import storage
    from raysearch.formats.embeddings import read_errors
    from raysearch.index.store import MANIFEST, IndexStore

    if storage.exists(storage.join(folder, MANIFEST)):
        return IndexStore(folder, verify=False).errors()
    if storage.isdir(storage.join(folder, "errors")):
        return read_errors(folder)
    if not storage.exists(folder):
        raise FileNotFoundError(f"no such folder: {folder}")
    raise ValueError(f"{folder} is neither an index directory nor a run folder with an error table")


@app.command()
@user_errors
def errors(
    folder: Annotated[str, typer.Argument(help="An index directory, or an embeddings or activation folder.")],
    format: Annotated[OutputFormat, typer.Option("--format", "-f", help="table, csv (row,image_id,uri,reason) or json.")] = OutputFormat.table,
    limit: Annotated[Optional[int], typer.Option(help="Print at most this many rows.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """List the images that could not be used (unreadable, corrupt, duplicate ids, ...) and why."""
    setup_logging(verbose)
    table = error_table(folder)
    rows = table.to_pylist()
    shown = rows if limit is None else rows[: max(0, limit)]
    columns = ("row", "image_id", "uri", "reason")
    if format == OutputFormat.csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([r.get(c) for c in columns] for r in shown)
        return
    if format == OutputFormat.json:
        typer.echo(json.dumps([{c: r.get(c) for c in columns} for r in shown], indent=2))
        return
    if not rows:
        typer.echo(f"{folder}: no image was skipped")
        return
    for r in shown:
        typer.echo(f"{r['uri']}: {r['reason']}")
    more = f" ({len(rows) - len(shown)} not shown)" if len(shown) < len(rows) else ""
    typer.echo(f"{len(rows)} images skipped{more}")
