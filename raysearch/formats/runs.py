"""Resumable run folders: the one mechanism behind every long run that writes parts (embedding,
activation) and can be killed and rerun.

    run.json                  what was asked for, and the listing; a rerun must ask for the same
    listing/part-*.parquet    the SOURCE's rows (row, image_id, uri, duplicate_of), written once
    <kind>/part-*.parquet     results, named by the rows they hold (parts, report, errors, ...)
    <done file>               written last, atomically: present = the run is complete

A rerun with the same request reuses the listing and skips the rows that some part already holds;
a different request is refused (or, with overwrite, the folder is emptied first).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from raysearch import storage
from raysearch.errors import RaysearchError
from raysearch.formats.embeddings import list_parts, read_part, read_rows_column, write_table
from raysearch.sources import open_source
from raysearch.sources.listing import Listing, write_listing

log = logging.getLogger("raysearch")

RUN_FILE = "run.json"
LISTING = "listing"


@dataclass(frozen=True)
class RunFolder:
    """A resumable run's folder.

    uri: the folder; done_file: the file written last (e.g. embeddings.json); same_run(previous,
    record) -> whether a stored request asks for the same work as a new one; error: the exception
    class for a refused resume.
    """

    uri: str
    done_file: str
    same_run: Callable[[dict, dict], bool]
    error: type[Exception] = RaysearchError

    @property
    def run_uri(self) -> str:
        """The folder's run.json, the stored request and listing."""
        return storage.join(self.uri, RUN_FILE)

    @property
    def done_uri(self) -> str:
        """The done file's URI in the folder."""
        return storage.join(self.uri, self.done_file)

    def is_complete(self) -> bool:
        """Whether the done file is there (the run finished)."""
        return storage.exists(self.done_uri)

    def start(self, record: dict, source_spec: str, first_row: int = 0, overwrite: bool = False,
              what: str = "the results", progress: bool = False) -> tuple[Listing, bool]:
        """Open the folder for `record` (a JSON-able dict). Returns (listing, resumed).

        A folder holding an earlier run of the same request is resumed (its listing reused); one
        holding another request is refused with `self.error`, or emptied with `overwrite`; a
        non-empty folder that is no run folder is refused unless `overwrite`. Otherwise the
        SOURCE is listed (rows numbered from `first_row`) and run.json written.
        """
        if storage.exists(self.uri) and storage.listdir(self.uri):
            previous = storage.read_json(self.run_uri) if storage.exists(self.run_uri) else None
            if previous is None and _only_a_listing(self.uri):
                overwrite = True   # a run stopped while listing left only its own partial listing
            if overwrite:
                for name in storage.listdir(self.uri):
                    storage.remove(storage.join(self.uri, name), recursive=True)
            elif previous is None:
                raise ValueError(f"--out {self.uri} is not empty; pass --overwrite to replace it")
            elif not self.same_run(previous, record):
                raise self.error(
                    f"{self.uri} holds {what} of another run ({describe_request(previous)}); "
                    "use --overwrite to replace it"
                )
            elif "listing" in previous:
                return Listing.from_dict(previous["listing"]), True
        storage.ensure_writable_dir(self.uri)
        listing = write_listing(open_source(source_spec), storage.join(self.uri, LISTING), first_row=first_row,
                                progress=progress)
        if listing.n_rows == 0:
            raise ValueError(
                f"source {source_spec!r} holds no images (looked for .jpg .jpeg .png .webp .bmp .tif .tiff .gif)"
            )
        storage.atomic_write_json(self.run_uri, {**record, "listing": listing.to_dict()})
        return listing, False

    def done_mask(self, listing: Listing, kinds: tuple[str, ...]) -> np.ndarray:
        """done[i]: some part of the given kinds holds listing row listing.first_row + i."""
        done = np.zeros(listing.n_rows, dtype=bool)
        for kind in kinds:
            rows = read_rows_column(list_parts(self.uri, kind)) - listing.first_row
            done[rows[(rows >= 0) & (rows < listing.n_rows)]] = True
        return done

    def drop_repeated_rows(self, listing: Listing, kinds: tuple[str, ...]) -> int:
        """Make each row appear in exactly one part of the given kinds: a part holding rows that an
        earlier part already holds (possible only when a crashed task's output and its retry both
        landed) is rewritten without them. Returns the number of rows dropped."""
        seen = np.zeros(listing.n_rows, dtype=bool)
        dropped = 0
        for kind in kinds:
            for uri in list_parts(self.uri, kind):
                tbl = read_part(uri)
                rows = tbl.column("row").to_numpy() - listing.first_row
                repeat = seen[rows]
                if repeat.any():
                    dropped += int(repeat.sum())
                    keep = tbl.filter(pa.array(~repeat))
                    if keep.num_rows:
                        write_table(uri, keep)
                    else:
                        storage.remove(uri)
                    rows = rows[~repeat]
                seen[rows] = True
        if dropped:
            log.warning("removed %d rows that were written twice by retried tasks", dropped)
        return dropped

    def finish(self, manifest: dict) -> None:
        """Write the done file (last, atomically)."""
        storage.atomic_write_json(self.done_uri, manifest)


def _only_a_listing(folder: str) -> bool:
    entries = [e for e in storage.listdir(folder) if not e.startswith(".raysearch-")]
    return entries == [LISTING]


def check_error_rate(n_errors: int, n_rows: int, max_error_rate: float, folder: str, what: str,
                     error: type[Exception] = RaysearchError) -> None:
    """Raise `error` when more than `max_error_rate` of `n_rows` images failed, naming the table."""
    rate = n_errors / n_rows if n_rows else 0.0
    if rate > max_error_rate:
        raise error(
            f"{n_errors} of {n_rows} images could not be {what} ({rate:.1%} > --max-error-rate "
            f"{max_error_rate:.1%}); see the error table in {storage.join(folder, 'errors')}"
        )


def describe_request(record: dict) -> str:
    """A short description of a stored request, for error messages."""
    model = (record.get("model") or {}).get("name")
    bits = [f"source {record.get('source')!r}"]
    if model:
        bits.append(f"model {model!r}")
    return ", ".join(bits)
