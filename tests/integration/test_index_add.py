"""`raysearch add`: growing an index with new photographs, without retraining."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from raysearch.builder import build
from raysearch.cli import app
from raysearch.embed import EmbedConfig
from raysearch.index.build import IndexConfig
from raysearch.add import AddConfig, add_images
from raysearch.index.store import IndexFormatError, IndexStore
from raysearch.search import Searcher

pytestmark = pytest.mark.slow


def _images(folder):
    return sorted(os.path.join(d, f) for d, _, files in os.walk(folder) for f in files if f.endswith(".jpg"))


@pytest.fixture()
def first_and_more(photo_folder, tmp_path):
    """`first`: 12 photographs; `more`: the same 12 (same relative names) plus 8 new ones."""
    images = _images(photo_folder)
    first, more = tmp_path / "first", tmp_path / "more"
    for i, path in enumerate(images[:20]):
        rel = os.path.relpath(path, photo_folder)
        for target in ([first, more] if i < 12 else [more]):
            (target / os.path.dirname(rel)).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target / rel)
    return str(first), str(more)


def test_add_skips_known_images_and_search_finds_the_new_ones(first_and_more, tmp_path, ray_local):
    first, more = first_and_more
    out = str(tmp_path / "index")
    # An inverted file, so the added images go through the trained quantiser of the build.
    build(first, out, EmbedConfig(progress=False), IndexConfig(factory="IVF2,Flat", nprobe=2))
    before = IndexStore(out).manifest
    trained_sha = before["files"]["trained.index"]["sha256"]

    res = CliRunner().invoke(app, ["add", out, more, "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "skipped 12 of 20 images already in the index" in res.output
    assert "added 8 images (0 errors) as additions/00001" in res.output

    store = IndexStore(out)
    m = store.manifest
    assert m["n_vectors"] == 20 and m["n_images"] == 20
    assert len(m["shards"]) == 2
    assert m["files"]["trained.index"]["sha256"] == trained_sha     # not retrained
    assert m["next_row"] == before["next_row"] + 8
    record = m["additions"][0]
    assert (record["n_source"], record["n_skipped"], record["n_added"]) == (20, 12, 8)
    new_ids = store.load_ids(1)
    assert new_ids.ids.min() >= before["next_row"]
    assert sorted(new_ids.image_ids.to_pylist()) == sorted(
        os.path.relpath(p, more)[:-4] for p in _images(more) if not os.path.exists(os.path.join(first, os.path.relpath(p, more)))
    )

    # Every image of `more` finds itself at rank 1 (the 8 new ones in the new shard).
    queries = _images(more)
    searcher = Searcher(out)
    result, problems = searcher.search_images(queries, k=2)
    image_ids, uris = searcher.lookup(result)
    assert problems == [None] * 20
    assert list(image_ids[:, 0]) == [os.path.relpath(q, more)[:-4] for q in queries]
    assert np.all(result.scores[:, 0] > 0.999)

    # Adding the same images again changes nothing.
    again = add_images(out, more, AddConfig(embed=EmbedConfig(progress=False)))
    assert again.addition is None and again.n_skipped == 20
    assert IndexStore(out).manifest["n_vectors"] == 20

    # The CLI search takes --nprobe, and refuses a nonsensical one.
    res = CliRunner().invoke(app, ["search", out, queries[-1], "-k", "1", "--nprobe", "1", "--format", "csv"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["search", out, queries[-1], "--nprobe", "0"])
    assert res.exit_code == 2 and "--nprobe" in res.output


def test_add_into_the_last_shard_and_refuse_damaged_indexes(first_and_more, tmp_path, ray_local):
    first, more = first_and_more
    out = str(tmp_path / "index")
    build(first, out, EmbedConfig(progress=False), IndexConfig(shards=2))
    result = add_images(out, more, AddConfig(embed=EmbedConfig(progress=False), merge=True))
    assert result.n_added == 8
    m = result.manifest
    assert [s["name"] for s in m["shards"]] == ["shards/shard-00000.index", "shards/shard-00002.index"]
    assert not os.path.exists(os.path.join(out, "shards", "shard-00001.index"))   # replaced, then removed
    assert sum(s["ntotal"] for s in m["shards"]) == 20
    searcher = Searcher(out)
    result, _ = searcher.search_images(_images(more)[-3:], k=1)
    assert set(searcher.lookup(result)[0][:, 0]) == {os.path.relpath(p, more)[:-4] for p in _images(more)[-3:]}

    # A damaged index is refused before anything is embedded.
    shard = os.path.join(out, "shards", "shard-00002.index")
    with open(shard, "r+b") as f:
        f.seek(100)
        f.write(b"\xff\xff")
    with pytest.raises(IndexFormatError, match="shard-00002.index does not match its checksum"):
        add_images(out, more, AddConfig(embed=EmbedConfig(progress=False)))
    assert not os.path.exists(os.path.join(out, "additions", "00002"))
    assert json.load(open(os.path.join(out, "manifest.json")))["n_vectors"] == 20
