"""List-file sources: .txt (one path per line), .csv or .parquet (a `path` column, optional `id`).

Relative paths are resolved against the list file's folder, which is also the root that image ids
are relative to. The file is read in batches, never whole.

Any other columns of a .csv / .parquet list are the images' metadata (`ListFileSource.fields`):
an index keeps them beside its id maps, returns them with hits and filters searches by them.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from raysearch import storage
from raysearch.sources.base import image_id_for, table

LIST_EXTENSIONS = (".txt", ".csv", ".parquet")
KEY_COLUMNS = ("path", "id")   # what the listing reads; every other column is metadata


def _resolve(path: str, base_uri: str) -> str:
    """An entry of a list file as a URI: absolute paths and URIs as they are, others under base."""
    if "://" in path or path.startswith("/"):
        return path
    return storage.join(base_uri, path)


@dataclass(frozen=True)
class ListFileSource:
    spec: str
    root: str          # folder of the list file
    list_uri: str
    kind: str = "listfile"

    def _raw_batches(self, batch_rows: int) -> Iterator[tuple[list[str], list[str] | None]]:
        ext = posixpath.splitext(self.list_uri)[1].lower()
        fs, path = storage.get_fs(self.list_uri)
        if ext == ".txt":
            paths: list[str] = []
            with fs.open(path, "rt", encoding="utf-8") as f:
                for line in f:
                    line = line.strip()
                    if not line or line.startswith("#"):
                        continue
                    paths.append(line)
                    if len(paths) >= batch_rows:
                        yield paths, None
                        paths = []
            if paths:
                yield paths, None
            return
        with fs.open(path, "rb") as f:
            if ext == ".csv":
                reader = pacsv.open_csv(
                    f,
                    read_options=pacsv.ReadOptions(block_size=1 << 22),
                    convert_options=pacsv.ConvertOptions(
                        column_types={"path": pa.string(), "id": pa.string()}, strings_can_be_null=False
                    ),
                )
                names = reader.schema.names
                batches: Iterator[pa.RecordBatch] = iter(reader)
            else:
                pf = pq.ParquetFile(f)
                names = pf.schema_arrow.names
                batches = pf.iter_batches(batch_size=batch_rows, columns=[c for c in ("path", "id") if c in names])
            if "path" not in names:
                raise ValueError(f"list file {self.list_uri} has no 'path' column (columns: {names})")
            has_id = "id" in names
            for batch in batches:
                cols = batch.to_pydict()
                ids = [str(x) for x in cols["id"]] if has_id else None
                yield [str(x) for x in cols["path"]], ids

    def field_names(self) -> list[str]:
        """The metadata columns of the list file (all but `path` and `id`); [] for a .txt list."""
        ext = posixpath.splitext(self.list_uri)[1].lower()
        if ext == ".txt":
            return []
        fs, path = storage.get_fs(self.list_uri)
        with fs.open(path, "rb") as f:
            if ext == ".csv":
                names = pacsv.open_csv(f, read_options=pacsv.ReadOptions(block_size=1 << 16)).schema.names
            else:
                names = pq.ParquetFile(f).schema_arrow.names
        return [n for n in names if n not in KEY_COLUMNS]

    def fields(self, batch_rows: int = 10_000) -> Iterator[pa.Table]:
        """The metadata columns with each row's image_id (the same ids `iter_batches` gives, in
        the same order): tables with `image_id` first, then the columns as the file types them
        (CSV: as pyarrow infers them). Nothing for a .txt list or a list without extra columns."""
        names = self.field_names()
        if not names:
            return
        ext = posixpath.splitext(self.list_uri)[1].lower()
        fs, path = storage.get_fs(self.list_uri)
        keys = self.iter_batches(batch_rows)
        with fs.open(path, "rb") as f:
            if ext == ".csv":
                batches: Iterator[pa.RecordBatch] = iter(pacsv.open_csv(
                    f, read_options=pacsv.ReadOptions(block_size=1 << 22),
                    convert_options=pacsv.ConvertOptions(column_types={"path": pa.string(), "id": pa.string()},
                                                         include_columns=names)))
            else:
                batches = pq.ParquetFile(f).iter_batches(batch_size=batch_rows, columns=names)
            # The key and metadata readers go through the file in step; their batch sizes differ,
            # so rows are re-cut to the listing's batches.
            pending: list[pa.Table] = []
            have = 0
            for key in keys:
                while have < key.num_rows:
                    batch = next(batches)
                    pending.append(pa.Table.from_batches([batch]))
                    have += batch.num_rows
                joined = pa.concat_tables(pending)
                head, rest = joined.slice(0, key.num_rows), joined.slice(key.num_rows)
                pending, have = [rest], rest.num_rows
                yield pa.table([key.column("image_id"), *head.columns], names=["image_id", *head.column_names])

    def iter_batches(self, batch_rows: int = 10_000) -> Iterator[pa.Table]:
        root_path = self.root.rstrip("/")
        for paths, given_ids in self._raw_batches(batch_rows):
            uris = [_resolve(p, self.root) for p in paths]
            if given_ids is not None:
                ids = [i if i else image_id_for(u, root_path) for i, u in zip(given_ids, uris)]
            else:
                ids = [image_id_for(u, root_path) for u in uris]
            yield table(ids, uris)
