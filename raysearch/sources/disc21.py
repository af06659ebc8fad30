"""DISC21 (the Image Similarity Challenge 2021 data set) as published, as an image source.

    disc21:ROOT[:split]

ROOT holds the split folders and the ground-truth CSVs, under the names of either distribution
(Meta's DISC21 download, or the DrivenData ISC2021 competition files), directly or under
ROOT/images/ (as facebookresearch/isc2021's tutorial arranges them):

    split            folder (first found)                          images
    references       references/ | reference_images/               R000000.jpg ... R999999.jpg
    dev_queries      dev_queries/ | queries/ | query_images/       Q00000.jpg ... Q49999.jpg
    test_queries     test_queries/ | final_queries/                Q50000.jpg ... Q99999.jpg
    train            train/ | training/ | training_images/         T000000.jpg ... T999999.jpg

    dev ground truth   dev_queries_groundtruth.csv | dev_ground_truth.csv | public_ground_truth.csv
    test ground truth  test_queries_groundtruth.csv | final_ground_truth.csv

Ground-truth CSVs are `query_id,reference_id` rows (header optional), an empty reference for a
query that copies no reference (40,000 of the 50,000 dev queries).

The splits of the Active Image Indexing protocol (Fernandez et al., ICLR 2023) come from the dev
ground truth, as its `prepare_disc.py` derives them:

    references_10k   the references that some dev query copies
    references_990k  every other reference
    dev_queries_10k  the dev queries that copy a reference
    dev_queries_40k  the dev queries that copy none

Image ids are the file names without extension (R000123, Q00042, T999999): exactly the ids of the
ground truth, so `raysearch eval copy` matches them as they are. Only files named as the split's
images are listed (a stray file is counted and reported, not indexed); images may also sit in
sub-folders of a split folder (e.g. one per unpacked zip), up to three levels down.

Listing streams: each split folder is scanned entry by entry (`scan_folder`), and what is kept is
one flag per possible name (1M names: a few MB), so the rows come out in numeric order without
the driver ever holding a list of paths.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from raysearch import storage
from raysearch.images import IMAGE_EXTENSIONS
from raysearch.sources.base import table
from raysearch.sources.base import split_layout_spec
from raysearch.sources.scan import scan_folder

log = logging.getLogger("raysearch")

# split -> (id letter, digits, folder candidates)
IMAGE_SPLITS: dict[str, tuple[str, int, tuple[str, ...]]] = {
    "references": ("R", 6, ("references", "reference_images")),
    "dev_queries": ("Q", 5, ("dev_queries", "queries", "query_images")),
    "test_queries": ("Q", 5, ("test_queries", "final_queries")),
    "train": ("T", 6, ("train", "training", "training_images")),
}
# Active Image Indexing protocol splits: (images of, selected by the dev ground truth)
PROTOCOL_SPLITS: dict[str, tuple[str, str]] = {
    "references_10k": ("references", "matched"),
    "references_990k": ("references", "unmatched"),
    "dev_queries_10k": ("dev_queries", "matching"),
    "dev_queries_40k": ("dev_queries", "non_matching"),
}
SPLITS = tuple(IMAGE_SPLITS) + tuple(PROTOCOL_SPLITS)
ALIASES = {"final_queries": "test_queries", "training": "train", "queries_40k": "dev_queries_40k"}
DEFAULT_SPLIT = "references"
GROUND_TRUTH_FILES = {
    "dev": ("dev_queries_groundtruth.csv", "dev_ground_truth.csv", "public_ground_truth.csv"),
    "test": ("test_queries_groundtruth.csv", "final_ground_truth.csv"),
}
MAX_SUBFOLDER_DEPTH = 3


def _candidates(root: str, names: tuple[str, ...]) -> list[str]:
    return [storage.join(base, n) for base in (root, storage.join(root, "images")) for n in names]


def find_split_folder(root: str, split: str) -> str:
    """The folder holding a DISC21 image split (see the module docstring). Raises FileNotFoundError
    naming every place looked at."""
    _, _, names = IMAGE_SPLITS[split]
    tried = _candidates(root, names)
    for uri in tried:
        if storage.isdir(uri):
            return uri
    raise FileNotFoundError(f"DISC21 {split} not found: none of {', '.join(tried)} is a folder")


def find_ground_truth(root: str, which: str = "dev") -> str:
    """The DISC21 ground-truth CSV ('dev' or 'test') under ROOT. Raises FileNotFoundError."""
    if which not in GROUND_TRUTH_FILES:
        raise ValueError(f"DISC21 ground truth must be 'dev' or 'test', got {which!r}")
    tried = [storage.join(root, n) for n in GROUND_TRUTH_FILES[which]]
    for uri in tried:
        if storage.exists(uri):
            return uri
    raise FileNotFoundError(f"DISC21 {which} ground truth not found: none of {', '.join(tried)} exists")


@dataclass
class NumberedFiles:
    """Which of the names LETTER + `digits` digits exist, and where.

    present[n]: a file for number n exists; folder[n], ext[n]: indices into `folders` / `exts`.
    """

    letter: str
    digits: int
    present: np.ndarray
    folder: np.ndarray
    ext: np.ndarray
    folders: list[str] = field(default_factory=list)
    exts: list[str] = field(default_factory=list)
    n_ignored: int = 0
    n_duplicates: int = 0

    def image_id(self, n: int) -> str:
        return f"{self.letter}{n:0{self.digits}d}"

    def uri(self, n: int) -> str:
        return f"{self.folders[self.folder[n]]}/{self.image_id(n)}{self.exts[self.ext[n]]}"


def scan_numbered(folder_uri: str, letter: str, digits: int, max_depth: int = MAX_SUBFOLDER_DEPTH) -> NumberedFiles:
    """Scan `folder_uri` (and sub-folders down to `max_depth`) for files named LETTER + `digits`
    digits + an image extension. Memory: 4 bytes per possible name, never a list of paths."""
    size = 10 ** digits
    files = NumberedFiles(letter, digits, np.zeros(size, bool), np.zeros(size, np.int16), np.zeros(size, np.int8))
    pattern = re.compile(rf"{re.escape(letter)}(\d{{{digits}}})(\.[A-Za-z]+)")
    fs, _ = storage.get_fs(folder_uri)
    ext_code: dict[str, int] = {}
    pending = [(folder_uri.rstrip("/"), 1)]
    while pending:
        uri, depth = pending.pop()
        code = len(files.folders)
        if code > np.iinfo(np.int16).max:
            raise ValueError(f"{folder_uri}: more than {np.iinfo(np.int16).max} sub-folders")
        files.folders.append(uri)
        for entry in scan_folder(uri):
            if entry.is_dir:
                if depth < max_depth:
                    pending.append((storage.unstrip(fs, entry.path), depth + 1))
                continue
            m = pattern.fullmatch(entry.name)
            if m is None or m.group(2).lower() not in IMAGE_EXTENSIONS:
                files.n_ignored += 1
                continue
            n, ext = int(m.group(1)), m.group(2)
            if ext not in ext_code:
                if len(files.exts) >= 127:
                    raise ValueError(f"{folder_uri}: too many different file extensions")
                ext_code[ext] = len(files.exts)
                files.exts.append(ext)
            if files.present[n]:
                files.n_duplicates += 1
                # Keep the smaller URI, so that the choice does not depend on listing order.
                if f"{uri}/{entry.name}" >= files.uri(n):
                    continue
            files.present[n] = True
            files.folder[n] = code
            files.ext[n] = ext_code[ext]
    return files


def numbers_of(ids: list[str], letter: str, digits: int, what: str) -> np.ndarray:
    """DISC21 ids ('R000123') -> their numbers; ValueError for an id of another form."""
    pattern = re.compile(rf"{re.escape(letter)}(\d{{{digits}}})")
    out = np.empty(len(ids), np.int64)
    for i, image_id in enumerate(ids):
        m = pattern.fullmatch(image_id.strip())
        if m is None:
            raise ValueError(f"{what}: {image_id!r} is not a DISC21 id of the form {letter}{'0' * digits}")
        out[i] = int(m.group(1))
    return out


def protocol_mask(ground_truth: str, selection: str, size: int) -> np.ndarray:
    """Which numbers a protocol split keeps, from the dev ground truth."""
    from raysearch.metrics.groundtruth import read_copy_ground_truth

    gt = read_copy_ground_truth(ground_truth)
    mask = np.zeros(size, bool)
    if selection in ("matched", "unmatched"):
        refs = sorted({r for _, r in gt.pairs})
        mask[numbers_of(refs, "R", 6, f"ground truth {ground_truth}")] = True
        return mask if selection == "matched" else ~mask
    matching = {q for q, _ in gt.pairs}
    chosen = [q for q in gt.query_ids if (q in matching) == (selection == "matching")]
    mask[numbers_of(chosen, "Q", 5, f"ground truth {ground_truth}")] = True
    return mask


@dataclass(frozen=True)
class Disc21Source:
    """One DISC21 split (see the module docstring), listed in numeric order."""

    spec: str
    root: str                      # the split's image folder
    split: str
    letter: str
    digits: int
    ground_truth: str | None = None
    selection: str | None = None   # protocol splits: which images the ground truth selects
    kind: str = "disc21"

    def scan(self) -> tuple[NumberedFiles, np.ndarray]:
        """The files found and the mask of those this split lists."""
        files = scan_numbered(self.root, self.letter, self.digits)
        keep = files.present
        if self.selection is not None:
            assert self.ground_truth is not None
            keep = keep & protocol_mask(self.ground_truth, self.selection, keep.size)
        if files.n_ignored:
            log.warning("%s: %d files are not named like DISC21 %s images (%s%s.jpg) and are left out",
                        self.root, files.n_ignored, self.split, self.letter, "0" * self.digits)
        if files.n_duplicates:
            log.warning("%s: %d DISC21 ids appear more than once; the first path in sorted order is used",
                        self.root, files.n_duplicates)
        return files, keep

    def iter_batches(self, batch_rows: int = 10_000) -> Iterator[pa.Table]:
        files, keep = self.scan()
        numbers = np.flatnonzero(keep)
        for start in range(0, numbers.size, batch_rows):
            chunk = numbers[start:start + batch_rows].tolist()
            yield table([files.image_id(n) for n in chunk], [files.uri(n) for n in chunk])


def open_disc21(spec: str) -> Disc21Source:
    """Parse 'disc21:ROOT[:split]' and find its folder (and ground truth for protocol splits)."""
    root, split = split_layout_spec(spec, "disc21:", SPLITS, ALIASES, DEFAULT_SPLIT)
    if split in PROTOCOL_SPLITS:
        image_split, selection = PROTOCOL_SPLITS[split]
        ground_truth = find_ground_truth(root, "dev")
    else:
        image_split, selection, ground_truth = split, None, None
    letter, digits, _ = IMAGE_SPLITS[image_split]
    folder = find_split_folder(root, image_split)
    return Disc21Source(spec=spec, root=folder, split=split, letter=letter, digits=digits,
                        ground_truth=ground_truth, selection=selection)


__all__ = [
    "DEFAULT_SPLIT", "Disc21Source", "GROUND_TRUTH_FILES", "IMAGE_SPLITS", "PROTOCOL_SPLITS", "SPLITS",
    "find_ground_truth", "find_split_folder", "open_disc21", "scan_numbered",
]
