"""`raysearch demo`: build an index over sample photographs and search it with edited copies.

References are scikit-image's photographs plus random crops of them; queries are edited copies
(crop, rotation, colour change, JPEG, ...) of randomly chosen references. Recall@1 counts queries
whose own reference comes first.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from raysearch.builder import BuildResult, build
from raysearch.embed import EmbedConfig
from raysearch.edits import apply_edit
from raysearch.index.build import IndexConfig
from raysearch.samples import write_reference_set
from raysearch.search import Searcher

DEMO_EDITS = ("crop", "rotate", "color_jitter", "jpeg", "grayscale", "blur", "text", "combo")


@dataclass
class DemoReport:
    build: BuildResult
    queries: list[str]
    expected: list[str]
    edits: list[str]
    top_ids: list[list[str]]
    top_scores: list[list[float]]
    recall_at_1: float
    recall_by_edit: dict[str, float] = field(default_factory=dict)


def make_queries(references: list, n_queries: int, folder: str, seed: int) -> tuple[list[str], list[str], list[str]]:
    """Edited copies of randomly chosen references: (paths, expected image_ids, edit names)."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(references), size=min(n_queries, len(references)), replace=False)
    paths, expected, edits = [], [], []
    for j, i in enumerate(sorted(chosen.tolist())):
        ref = references[i]
        edit = DEMO_EDITS[j % len(DEMO_EDITS)]
        with Image.open(ref.path) as img:
            edited = apply_edit(edit, img.convert("RGB"), seed=seed * 100_003 + j)
        path = os.path.join(folder, f"{ref.image_id}__{edit}.jpg")
        edited.save(path, quality=90)
        paths.append(path)
        expected.append(ref.image_id)
        edits.append(edit)
    return paths, expected, edits


def run_demo(workdir: str, n_images: int = 300, n_queries: int = 64, seed: int = 0, k: int = 5, progress: bool = True) -> DemoReport:
    refs_dir = os.path.join(workdir, "references")
    queries_dir = os.path.join(workdir, "queries")
    index_dir = os.path.join(workdir, "index")
    for d in (refs_dir, queries_dir):
        shutil.rmtree(d, ignore_errors=True)
    references = write_reference_set(refs_dir, n_images, seed=seed)
    paths, expected, edits = make_queries(references, n_queries, queries_dir, seed)
    result = build(refs_dir, index_dir, EmbedConfig(progress=progress), IndexConfig(), overwrite=True)
    searcher = Searcher(index_dir)
    res, _ = searcher.search_images(paths, k=k)
    image_ids, _ = searcher.lookup(res)
    top_ids = [[str(x) for x in row if x is not None] for row in image_ids]
    top_scores = [[float(s) for s in row if np.isfinite(s)] for row in res.scores]
    hits = np.array([bool(t) and t[0] == e for t, e in zip(top_ids, expected)])
    by_edit = {e: float(hits[[x == e for x in edits]].mean()) for e in dict.fromkeys(edits)}
    return DemoReport(result, paths, expected, edits, top_ids, top_scores, float(hits.mean()), by_edit)
