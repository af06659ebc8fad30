"""A copy-detection set in DISC21's format, cut from real photographs (scikit-image's by default).

Few photographs give few distinct pictures, and random crops of one photograph overlap: a copy of
crop A would then legitimately match crop B as well, and a one-reference-per-query ground truth
would call that match wrong. So the photographs are split three ways and matches are kept well
defined:

- reference photographs: cut into crops that (almost) do not overlap: any two crops of one
  photograph share at most `max_overlap` (default 5%) of the smaller crop's area. A query made
  from a crop therefore shows content that only its own reference holds (edits such as `crop`
  only keep part of it), and the ground truth names exactly that reference;
- negative photographs: their crops, edited, are the queries without a match (empty reference);
  no reference comes from these photographs;
- background photographs: their crops are the score-normalisation background (as DISC21's
  training images): neither references nor queries come from them.

Layout written to `folder`: references/R000000.jpg..., queries/Q00000.jpg..., background/B000000.jpg...,
ground_truth.csv (query_id,reference_id; empty reference for non-matching queries) and copyset.json
(photo split, crop boxes, the edit applied to each query).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from raysearch.edits import EDITS, apply_edit

QUERY_EDITS = tuple(EDITS)   # every edit of the suite, combinations included


@dataclass(frozen=True)
class CopySetConfig:
    """What `write_copy_detection_set` writes: how many references (fewer if the photographs
    fill up), queries and background images; how many photographs are held out for negative
    queries and for the background; max_overlap (a share of the smaller crop's area); min_side
    (pixels); crop_fraction (the range of a crop's side as a fraction of the photograph's); the
    seed; and the JPEG quality."""

    n_references: int = 200
    n_queries: int = 200
    n_background: int = 100
    positive_share: float = 0.5          # share of queries that copy a reference
    negative_photos: int = 3
    background_photos: int = 3
    max_overlap: float = 0.05
    min_side: int = 48
    min_contrast: float = 8.0            # crops flatter than this (grey-level std) are not used
    crop_fraction: tuple[float, float] = (0.12, 0.45)
    seed: int = 0
    quality: int = 90

    def __post_init__(self) -> None:
        if min(self.n_references, self.n_queries) < 1 or self.n_background < 0:
            raise ValueError("a copy-detection set needs at least one reference and one query")
        if not 0.0 <= self.positive_share <= 1.0:
            raise ValueError(f"positive_share must be in [0, 1], got {self.positive_share}")
        if not 0.0 <= self.max_overlap < 1.0:
            raise ValueError(f"max_overlap must be in [0, 1), got {self.max_overlap}")


@dataclass
class CopySet:
    """A written copy-detection set: its folder, the paths of its references, queries and
    background folders and of ground_truth.csv, the reference ids, and each query's edit and
    reference."""

    folder: str
    references: str
    queries: str
    background: str
    ground_truth: str
    reference_ids: list[str]
    query_edits: dict[str, str]                 # query_id -> edit name
    query_reference: dict[str, str]             # query_id -> reference_id ('' = no match)
    photos: dict[str, list[str]] = field(default_factory=dict)   # role -> photograph names


def overlap_fraction(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection area of boxes (left, top, right, bottom) over the smaller box's area."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return (w * h) / smaller


def separate_crops(photo: np.ndarray, n: int, rng: np.random.Generator, max_overlap: float, min_side: int,
                   fraction: tuple[float, float], min_contrast: float = 0.0, tries: int = 6000) -> list[tuple[int, int, int, int]]:
    """Up to `n` random boxes (left, top, right, bottom) in an (h, w, 3) picture, each pair
    overlapping by at most `max_overlap` of the smaller box, none flatter than `min_contrast`
    (grey-level standard deviation: a featureless patch matches every other one). Rejection
    sampling; fewer boxes if the picture is full."""
    h, w = photo.shape[:2]
    boxes: list[tuple[int, int, int, int]] = []
    for attempt in range(tries):
        if len(boxes) >= n:
            break
        # When the picture fills up, smaller crops still fit between the others.
        shrink = 0.75 ** (4 * attempt // tries)
        fh, fw = rng.uniform(fraction[0] * shrink, fraction[1] * shrink, size=2)
        ch, cw = max(min_side, int(h * fh)), max(min_side, int(w * fw))
        if ch > h or cw > w:
            continue
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        box = (left, top, left + cw, top + ch)
        if not all(overlap_fraction(box, other) <= max_overlap for other in boxes):
            continue
        if min_contrast > 0 and float(photo[top:top + ch, left:left + cw].mean(axis=2).std()) < min_contrast:
            continue
        boxes.append(box)
    return boxes


def _save(arr: np.ndarray, path: str, quality: int) -> None:
    Image.fromarray(arr).save(path, quality=quality)


def write_copy_detection_set(folder: str, config: CopySetConfig = CopySetConfig(),
                             photos: dict[str, np.ndarray] | None = None) -> CopySet:
    """Write the set described in the module docstring; returns its paths and ground truth.

    `photos`: name -> RGB uint8 (h, w, 3) photographs to cut it from (default: scikit-image's,
    `raysearch.samples.sample_photographs`).
    """
    if photos is None:
        from raysearch.samples import sample_photographs

        photos = sample_photographs()
    rng = np.random.default_rng(config.seed)
    names = [str(x) for x in rng.permutation(sorted(photos))]
    n_side = config.negative_photos + config.background_photos
    if len(names) - n_side < 1:
        raise ValueError(f"only {len(names)} photographs: too many held out for negatives/background")
    background_names = names[: config.background_photos]
    negative_names = names[config.background_photos: n_side]
    reference_names = names[n_side:]

    dirs = {role: os.path.join(folder, role) for role in ("references", "queries", "background")}
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)

    # References: separated crops, drawn round-robin over the reference photographs.
    per_photo = math.ceil(config.n_references / len(reference_names))
    boxes = {
        name: separate_crops(photos[name], per_photo, rng, config.max_overlap, config.min_side,
                             config.crop_fraction, config.min_contrast)
        for name in reference_names
    }
    ref_sources: list[tuple[str, tuple[int, int, int, int]]] = []
    for i in range(per_photo):
        for name in reference_names:
            if i < len(boxes[name]) and len(ref_sources) < config.n_references:
                ref_sources.append((name, boxes[name][i]))
    reference_ids, reference_arrays, reference_meta = [], {}, {}
    for j, (name, (left, top, right, bottom)) in enumerate(ref_sources):
        ref_id = f"R{j:06d}"
        arr = photos[name][top:bottom, left:right]
        _save(arr, os.path.join(dirs["references"], ref_id + ".jpg"), config.quality)
        reference_ids.append(ref_id)
        reference_arrays[ref_id] = arr
        reference_meta[ref_id] = {"photo": name, "box": [left, top, right, bottom]}

    def side_crops(pool: list[str], n: int) -> list[tuple[str, np.ndarray]]:
        out = []
        for i in range(n):
            name = pool[i % len(pool)]
            arr = photos[name]
            h, w = arr.shape[:2]
            (left, top, right, bottom), = separate_crops(arr, 1, rng, 1.0, config.min_side, config.crop_fraction,
                                                         config.min_contrast) or [(0, 0, w, h)]
            out.append((name, arr[top:bottom, left:right]))
        return out

    # Queries: edited copies of references (positives) and edited crops of negative photographs.
    n_pos = int(round(config.n_queries * config.positive_share)) if negative_names else config.n_queries
    n_neg = config.n_queries - n_pos
    positives = rng.choice(len(reference_ids), size=n_pos, replace=n_pos > len(reference_ids)) if n_pos else []
    edit_cycle = [QUERY_EDITS[i % len(QUERY_EDITS)] for i in range(config.n_queries)]
    rng.shuffle(edit_cycle)
    sources: list[tuple[str, np.ndarray]] = [(reference_ids[int(j)], reference_arrays[reference_ids[int(j)]]) for j in positives]
    sources += [("", arr) for _, arr in (side_crops(negative_names, n_neg) if n_neg else [])]
    order = rng.permutation(len(sources))
    query_edits, query_reference = {}, {}
    for qi, si in enumerate(order):
        ref_id, arr = sources[int(si)]
        query_id = f"Q{qi:05d}"
        edit = edit_cycle[qi]
        edited = apply_edit(edit, Image.fromarray(arr), seed=config.seed * 1_000_003 + qi)
        edited.save(os.path.join(dirs["queries"], query_id + ".jpg"), quality=config.quality)
        query_edits[query_id] = edit
        query_reference[query_id] = ref_id

    for bi, (_, arr) in enumerate(side_crops(background_names, config.n_background) if background_names else []):
        _save(arr, os.path.join(dirs["background"], f"B{bi:06d}.jpg"), config.quality)

    gt_path = os.path.join(folder, "ground_truth.csv")
    with open(gt_path, "w") as f:
        f.write("query_id,reference_id\n")
        for q in sorted(query_reference):
            f.write(f"{q},{query_reference[q]}\n")
    roles = {"references": reference_names, "negatives": negative_names, "background": background_names}
    with open(os.path.join(folder, "copyset.json"), "w") as f:
        json.dump({"config": {k: v for k, v in config.__dict__.items()}, "photos": roles,
                   "references": reference_meta, "queries": {q: {"edit": query_edits[q], "reference": query_reference[q]}
                                                              for q in sorted(query_edits)}}, f, indent=1)
    return CopySet(folder, dirs["references"], dirs["queries"], dirs["background"], gt_path, reference_ids,
                   query_edits, query_reference, roles)
