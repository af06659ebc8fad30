"""The listing: a source's (row, image_id, uri) table, written once as Parquet parts.

Rows are numbered in source order; the row number becomes the vector's id in the index, so ids do not
depend on which worker embedded what, and a resumed build gives the same ids as an uninterrupted one.
The listing is streamed from the source to disk in parts, so the driver never holds all of it.
Row groups are small (`GROUP_ROWS`), so the embedding pipeline can read any run of them as one task.

Duplicate image_ids (e.g. `a.jpg` and `a.png` in one folder) are found with 64-bit hashes (8 bytes
per image in the driver) and marked in the `duplicate_of` column; the build records them as errors.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from raysearch import storage
from raysearch.progress import Progress
from raysearch.sources.base import ImageSource

GROUP_ROWS = 64
PART_ROWS = 65_536  # a multiple of GROUP_ROWS

LISTING_PART_SCHEMA = pa.schema(
    [
        ("row", pa.int64()),
        ("image_id", pa.string()),
        ("uri", pa.string()),
        ("duplicate_of", pa.string()),
    ]
)


@dataclass(frozen=True)
class ListingPart:
    uri: str
    first_row: int
    n_rows: int


@dataclass(frozen=True)
class Listing:
    parts: tuple[ListingPart, ...]
    n_rows: int
    n_duplicates: int
    first_row: int = 0

    @property
    def end_row(self) -> int:
        return self.first_row + self.n_rows

    def to_dict(self) -> dict:
        return {
            "n_rows": self.n_rows,
            "n_duplicates": self.n_duplicates,
            "first_row": self.first_row,
            "parts": [{"uri": p.uri, "first_row": p.first_row, "n_rows": p.n_rows} for p in self.parts],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Listing":
        return cls(
            parts=tuple(ListingPart(p["uri"], int(p["first_row"]), int(p["n_rows"])) for p in d["parts"]),
            n_rows=int(d["n_rows"]),
            n_duplicates=int(d["n_duplicates"]),
            first_row=int(d.get("first_row", 0)),
        )


def _hash_ids(ids: pa.Array) -> np.ndarray:
    return pd.util.hash_array(np.asarray(ids.to_pylist(), dtype=object), categorize=False)


def _write_part(uri: str, tbl: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(tbl, buf, row_group_size=GROUP_ROWS, compression="zstd")
    storage.atomic_write(uri, buf.getvalue())


def _rebatch(batches: Iterator[pa.Table], rows: int) -> Iterator[pa.Table]:
    pending: list[pa.Table] = []
    n = 0
    for batch in batches:
        pending.append(batch)
        n += batch.num_rows
        while n >= rows:
            whole = pa.concat_tables(pending)
            yield whole.slice(0, rows)
            rest = whole.slice(rows)
            pending, n = [rest], rest.num_rows
    if n:
        yield pa.concat_tables(pending)


def write_listing(
    source: ImageSource, listing_dir: str, part_rows: int = PART_ROWS, first_row: int = 0,
    progress: bool = False,
) -> Listing:
    """Stream `source` into Parquet parts under `listing_dir`; return where every row went.

    Rows are numbered from `first_row` (an index that grows numbers new images after its last id).
    `progress` shows the rows listed so far (a bucket of millions of files takes a while).
    """
    if part_rows % GROUP_ROWS:
        raise ValueError(f"part_rows must be a multiple of {GROUP_ROWS}, got {part_rows}")
    storage.makedirs(listing_dir)
    parts: list[ListingPart] = []
    hashes: list[np.ndarray] = []
    row = first_row
    shown = Progress("listing", None, "images", enabled=progress)
    for i, tbl in enumerate(_rebatch(source.iter_batches(), part_rows)):
        n = tbl.num_rows
        out = pa.table(
            {
                "row": pa.array(np.arange(row, row + n, dtype=np.int64)),
                "image_id": tbl.column("image_id"),
                "uri": tbl.column("uri"),
                "duplicate_of": pa.nulls(n, pa.string()),
            },
            schema=LISTING_PART_SCHEMA,
        )
        uri = storage.join(listing_dir, f"part-{i:05d}.parquet")
        _write_part(uri, out)
        hashes.append(_hash_ids(tbl.column("image_id").combine_chunks()))
        parts.append(ListingPart(uri, row, n))
        row += n
        shown.update(n)
    shown.close()
    n_dup = _mark_duplicates(parts, np.concatenate(hashes) if hashes else np.empty(0, np.uint64))
    return Listing(parts=tuple(parts), n_rows=row - first_row, n_duplicates=n_dup, first_row=first_row)


def _mark_duplicates(parts: list[ListingPart], hashes: np.ndarray) -> int:
    """Mark every repeat of an image_id (all but its first row) with the uri of the first one."""
    if hashes.size == 0:
        return 0
    order = np.argsort(hashes, kind="stable")
    sorted_h = hashes[order]
    same = sorted_h[1:] == sorted_h[:-1]
    if not same.any():
        return 0
    suspect_rows = np.unique(np.concatenate([order[1:][same], order[:-1][same]]))
    # Confirm on the actual strings (a 64-bit hash may collide), keeping the first row of each id;
    # parts are visited in row order, so "first" is the lowest row.
    # `hashes` is indexed by position in the listing, parts by row: convert.
    base = parts[0].first_row
    suspect_rows = suspect_rows + base
    starts = np.array([p.first_row for p in parts])
    part_of = np.searchsorted(starts, suspect_rows, side="right") - 1
    first_uri: dict[str, str] = {}
    n_marked = 0
    for k in np.unique(part_of).tolist():
        part = parts[k]
        tbl = pq.read_table(io.BytesIO(storage.read_bytes(part.uri)))
        ids = tbl.column("image_id").to_pylist()
        uris = tbl.column("uri").to_pylist()
        marks: list[str | None] = [None] * tbl.num_rows
        for row in suspect_rows[part_of == k].tolist():
            j = row - part.first_row
            if ids[j] in first_uri:
                marks[j] = first_uri[ids[j]]
            else:
                first_uri[ids[j]] = uris[j]
        if any(m is not None for m in marks):
            n_marked += sum(m is not None for m in marks)
            _write_part(part.uri, tbl.set_column(3, "duplicate_of", pa.array(marks, pa.string())))
    return n_marked


def read_listing_groups(part_uri: str, first_group: int, n_groups: int) -> pa.Table:
    """Read `n_groups` row groups of one listing part, starting at `first_group`."""
    fs, path = storage.get_fs(part_uri)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        last = min(first_group + n_groups, pf.num_row_groups)
        return pf.read_row_groups(list(range(first_group, last)))
