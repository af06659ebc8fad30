"""raysearch build + search end to end on real photographs, a local Ray and real FAISS."""

from __future__ import annotations

import csv
import io
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from raysearch.builder import build
from raysearch.cli import app
from raysearch.embed import EmbedConfig
from raysearch.index.build import IndexConfig
from raysearch.index.store import IndexStore
from raysearch.search import Searcher

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def built_index(tmp_path_factory, photo_folder, ray_local):
    out = str(tmp_path_factory.mktemp("idx") / "index")
    result = build(photo_folder, out, EmbedConfig(progress=False), IndexConfig())
    return out, result


def _all_images(folder: str) -> list[str]:
    return sorted(
        os.path.join(d, f) for d, _, files in os.walk(folder) for f in files if f.endswith(".jpg")
    )


def test_every_image_is_indexed_with_its_relative_id(built_index, photo_folder):
    out, result = built_index
    assert result.embed.n_images == 40
    assert result.embed.n_embedded == 40
    assert result.embed.n_errors == 0
    store = IndexStore(out)
    ids = pq.read_table(os.path.join(out, store.shards[0].ids_name))
    expected = {os.path.relpath(p, photo_folder)[:-4] for p in _all_images(photo_folder)}
    assert set(ids.column("image_id").to_pylist()) == expected
    assert store.manifest["model"]["name"] == "efficientnet_lite0_gem"
    assert store.manifest["model"]["input_size"] == 224


def test_unedited_copies_come_back_at_rank_one(built_index, photo_folder, tmp_path):
    out, _ = built_index
    images = _all_images(photo_folder)
    # Copies under another name and folder: the match must come from the pixels, not the path.
    queries = []
    for i, p in enumerate(images):
        q = tmp_path / f"query{i}.jpg"
        shutil.copy(p, q)
        queries.append(str(q))
    searcher = Searcher(out)
    result, problems = searcher.search_images(queries, k=3)
    image_ids, uris = searcher.lookup(result)
    assert all(p is None for p in problems)
    expected = [os.path.relpath(p, photo_folder)[:-4] for p in images]
    assert list(image_ids[:, 0]) == expected
    assert list(uris[:, 0]) == images
    assert np.all(result.scores[:, 0] > 0.999)
    assert np.all(result.scores[:, 0] >= result.scores[:, 1])


def test_cli_search_csv_has_exact_columns(built_index, photo_folder):
    out, _ = built_index
    query = _all_images(photo_folder)[3]
    res = CliRunner().invoke(app, ["search", out, query, "-k", "4", "--format", "csv"])
    assert res.exit_code == 0, res.output
    rows = list(csv.reader(io.StringIO(res.stdout)))
    assert rows[0] == ["query", "rank", "id", "uri", "score"]
    assert [r[1] for r in rows[1:]] == ["1", "2", "3", "4"]
    assert rows[1][0] == query and rows[1][3] == query
    scores = [float(r[4]) for r in rows[1:]]
    assert scores == sorted(scores, reverse=True)
