"""Google Landmarks Dataset v2 (GLDv2, cvdfoundation/google-landmark) as published, as an image source.

    gldv2:ROOT[:split]

ROOT holds one folder per split, each the extracted `images_NNN.tar` files of that split, and the
metadata CSVs, directly or under ROOT/metadata/ (and the ground truth under ROOT/ground_truth/),
as the data set's own bucket arranges them:

    split            folder    list of images                 images
    index (default)  index/    index.csv (id)                 761,757
    test             test/     test.csv (id)                  117,577
    train            train/    train.csv (id,url,landmark_id) 4,132,914
    test_retrieval   test/     the test images that retrieval_solution_v2.1.csv scores
                               (Usage Public or Private; the ignored rows left out)

An image with id `0123456789abcdef` (16 hex characters) is stored at
`<split>/0/1/2/0123456789abcdef.jpg`. Image ids are these hex ids, as the CSVs and the ground truth
write them.

With the split's CSV present, rows come in the CSV's order, read in batches (train.csv's 4.1M rows
are never held) and mapped to their paths without listing a single folder; an image the CSV lists
but the folder lacks becomes an error row of the build ("file not found"). Without the CSV, the
split folder is walked one directory at a time (4,096 a/b/c leaves) in sorted order.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.csv as pacsv

from raysearch import storage
from raysearch.images import is_image_path
from raysearch.sources.base import strip_extension, table
from raysearch.sources.base import split_layout_spec

SPLITS = ("index", "test", "train", "test_retrieval")
DEFAULT_SPLIT = "index"
SOLUTION_FILE = "retrieval_solution_v2.1.csv"
METADATA_DIRS = ("", "metadata")
SOLUTION_DIRS = ("", "ground_truth", "metadata")
ID_PATTERN = re.compile(r"[0-9a-f]{3,64}")


def image_path(split_folder: str, image_id: str) -> str:
    """`split_folder/a/b/c/abc....jpg` for a GLDv2 image id."""
    return f"{split_folder.rstrip('/')}/{image_id[0]}/{image_id[1]}/{image_id[2]}/{image_id}.jpg"


def _first_existing(root: str, dirs: tuple[str, ...], name: str) -> str | None:
    for d in dirs:
        uri = storage.join(root, d, name) if d else storage.join(root, name)
        if storage.exists(uri):
            return uri
    return None


def find_solution(root: str) -> str:
    """ROOT's retrieval_solution_v2.1.csv (in ROOT, ROOT/ground_truth or ROOT/metadata)."""
    found = _first_existing(root, SOLUTION_DIRS, SOLUTION_FILE)
    if found is None:
        tried = [storage.join(root, d, SOLUTION_FILE) if d else storage.join(root, SOLUTION_FILE) for d in SOLUTION_DIRS]
        raise FileNotFoundError(f"GLDv2 retrieval ground truth not found: none of {', '.join(tried)} exists")
    return found


def iter_csv_ids(csv_uri: str, batch_rows: int = 65_536) -> Iterator[list[str]]:
    """The `id` column of a GLDv2 CSV, in batches (the file is streamed, other columns skipped).
    Raises ValueError for a file without an `id` column or with an id that is not hex."""
    fs, path = storage.get_fs(csv_uri)
    try:
        f = fs.open(path, "rb")
    except FileNotFoundError as e:
        raise FileNotFoundError(f"GLDv2 list not found: {csv_uri}") from e
    with f:
        try:
            reader = pacsv.open_csv(
                f,
                read_options=pacsv.ReadOptions(block_size=1 << 22),
                convert_options=pacsv.ConvertOptions(include_columns=["id"], column_types={"id": pa.string()}),
            )
        except (pa.ArrowInvalid, KeyError) as e:
            raise ValueError(f"{csv_uri} is not a GLDv2 CSV with an 'id' column: {e}") from e
        pending: list[str] = []
        for batch in reader:
            for image_id in batch.column(0).to_pylist():
                image_id = (image_id or "").strip()
                if not ID_PATTERN.fullmatch(image_id):
                    raise ValueError(f"{csv_uri}: {image_id!r} is not a GLDv2 image id (hex characters)")
                pending.append(image_id)
            while len(pending) >= batch_rows:
                yield pending[:batch_rows]
                pending = pending[batch_rows:]
        if pending:
            yield pending


@dataclass(frozen=True)
class Gldv2Source:
    """One GLDv2 split (see the module docstring)."""

    spec: str
    root: str                       # the split's image folder
    split: str
    list_csv: str | None            # the split's CSV (None: walk the folder)
    solution: str | None = None     # test_retrieval: the ground truth that selects the images
    kind: str = "gldv2"

    def iter_batches(self, batch_rows: int = 10_000) -> Iterator[pa.Table]:
        scored = None
        if self.solution is not None:
            from raysearch.metrics.gldv2 import read_retrieval_solution

            scored = read_retrieval_solution(self.solution).scored_ids()
        for ids, uris in self._rows(batch_rows):
            if scored is not None:
                keep = [i for i, image_id in enumerate(ids) if image_id in scored]
                ids, uris = [ids[i] for i in keep], [uris[i] for i in keep]
            if ids:
                yield table(ids, uris)

    def _rows(self, batch_rows: int) -> Iterator[tuple[list[str], list[str]]]:
        if self.list_csv is not None:
            for ids in iter_csv_ids(self.list_csv, batch_rows):
                yield ids, [image_path(self.root, i) for i in ids]
            return
        from raysearch.sources.folder import walk_files

        fs, _ = storage.get_fs(self.root)
        ids: list[str] = []
        uris: list[str] = []
        for dirpath, files in walk_files(self.root):
            for name in files:
                if not is_image_path(name):
                    continue
                ids.append(strip_extension(name))
                uris.append(storage.unstrip(fs, posixpath.join(dirpath, name)))
                if len(ids) >= batch_rows:
                    yield ids, uris
                    ids, uris = [], []
        if ids:
            yield ids, uris


def open_gldv2(spec: str) -> Gldv2Source:
    """Parse 'gldv2:ROOT[:split]' and find the split's folder and CSV."""
    root, split = split_layout_spec(spec, "gldv2:", SPLITS, {}, DEFAULT_SPLIT)
    image_split = "test" if split == "test_retrieval" else split
    folder = storage.join(root, image_split)
    if not storage.isdir(folder):
        raise FileNotFoundError(f"GLDv2 {image_split} images not found: {folder} is not a folder")
    list_csv = _first_existing(root, METADATA_DIRS, f"{image_split}.csv")
    solution = None
    if split == "test_retrieval":
        solution = find_solution(root)
    return Gldv2Source(spec=spec, root=folder.rstrip("/"), split=split, list_csv=list_csv, solution=solution)


__all__ = ["DEFAULT_SPLIT", "Gldv2Source", "SOLUTION_FILE", "SPLITS", "find_solution", "image_path",
           "iter_csv_ids", "open_gldv2"]
