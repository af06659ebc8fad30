"""`raysearch remove` and `raysearch compact`: managing the images of an index (raysearch.api)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from raysearch.cli.common import app, setup_logging, user_errors


def read_ids_file(path: str) -> list[str]:
    """image_ids from a file: .txt one per line (blank lines and lines starting with '#'
    skipped); .csv / .parquet an `id` (or `image_id`) column."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from raysearch import storage

    if not storage.exists(path):
        raise FileNotFoundError(f"--ids-file {path} does not exist")
    fs, local = storage.get_fs(path)
    if path.endswith((".csv", ".parquet")):
        with fs.open(local, "rb") as f:
            table = pq.read_table(f) if path.endswith(".parquet") else pacsv.read_csv(
                f, convert_options=pacsv.ConvertOptions(strings_can_be_null=False))
        column = next((c for c in ("id", "image_id") if c in table.column_names), None)
        if column is None:
            raise ValueError(f"--ids-file {path} has no 'id' or 'image_id' column (columns: {table.column_names})")
        return [str(x) for x in table.column(column).to_pylist()]
    with fs.open(local, "rt", encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]


@app.command()
@user_errors
def remove(
    index_dir: Annotated[str, typer.Argument(help="Index directory (local or s3://).")],
    ids: Annotated[Optional[list[str]], typer.Argument(help="image_ids to remove.")] = None,
    ids_file: Annotated[Optional[str], typer.Option("--ids-file", help="A file of image_ids: .txt (one per line), or .csv / .parquet with an 'id' column.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Remove images from INDEX_DIR by image_id: every search skips them from now on.

    Their vectors stay in the shards (as tombstones) until `raysearch compact` or the next
    `raysearch add`. An image_id the index does not hold is an error, and then nothing is removed.
    """
    from raysearch.api import open_index

    setup_logging(verbose)
    wanted = list(ids or []) + (read_ids_file(ids_file) if ids_file else [])
    if not wanted:
        raise ValueError("name the image_ids to remove (arguments or --ids-file)")
    collection = open_index(index_dir)
    result = collection.remove(wanted)
    typer.echo(f"removed {len(set(wanted))} images ({result.vector_ids.size} vectors) from {index_dir}; "
               f"{result.n_removed_total} removed vectors await `raysearch compact {index_dir}`")


@app.command()
@user_errors
def compact(
    index_dir: Annotated[str, typer.Argument(help="Index directory (local or s3://).")],
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Drop removed images' vectors from the shards of INDEX_DIR and clear its tombstone list.

    Each shard that holds one is rewritten (under a new name, with its id map); the manifest is
    rewritten last, so searches see the index either before or after.
    """
    from raysearch.api import open_index

    setup_logging(verbose)
    result = open_index(index_dir).compact()
    if not result.n_dropped:
        typer.echo(f"nothing to compact: {index_dir} holds no removed vectors")
        return
    typer.echo(f"compacted {index_dir}: dropped {result.n_dropped} vectors, rewrote {len(result.rewritten)} "
               f"shards in {result.seconds:.1f} s; {result.manifest['n_vectors']} vectors remain")
