"""Loading refuses a damaged index: corrupt, truncated, foreign or missing files, named in the message."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from raysearch.cli import app
from raysearch.index.build import IndexConfig, build_index
from raysearch.index.store import IndexFormatError, IndexStore
from raysearch.formats.embeddings import write_embeddings
from raysearch.index.synthetic import ClusteredVectors
from raysearch.search import Searcher

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_indexes(tmp_path_factory, ray_local):
    """Two indexes of the same shape over different vectors (so their files have equal sizes)."""
    root = tmp_path_factory.mktemp("integrity")
    out = []
    for seed in (0, 1):
        emb = str(root / f"emb{seed}")
        write_embeddings(emb, ClusteredVectors(16, 30, seed=seed).rows(0, 2000), part_rows=500, first_row=seed * 5000)
        index = str(root / f"index{seed}")
        build_index(emb, index, IndexConfig(factory="IVF8,Flat", shards=2, nprobe=2, seed=seed))
        out.append(index)
    return out


@pytest.fixture()
def index_copy(two_indexes, tmp_path):
    target = str(tmp_path / "index")
    shutil.copytree(two_indexes[0], target)
    return target


def test_intact_index_loads(index_copy):
    searcher = Searcher(index_copy)
    assert sum(s.ntotal for s in searcher.shards) == 2000
    IndexStore(index_copy).verify_files()


def test_corrupt_shard_is_refused_by_name(index_copy):
    path = os.path.join(index_copy, "shards", "shard-00001.index")
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(IndexFormatError, match=r"shards/shard-00001\.index does not match its checksum"):
        Searcher(index_copy)
    res = CliRunner().invoke(app, ["search", index_copy, "query.jpg"])
    assert res.exit_code == 2
    assert "shard-00001.index does not match its checksum" in res.output


def test_truncated_shard_is_refused_even_without_checksums(index_copy):
    path = os.path.join(index_copy, "shards", "shard-00000.index")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 100)
    for verify in (True, False):
        with pytest.raises(IndexFormatError, match=rf"shard-00000\.index has {size - 100} bytes, the manifest says {size}"):
            Searcher(index_copy, verify=verify)


def test_foreign_shard_and_id_map_are_refused(two_indexes, index_copy):
    other = two_indexes[1]
    for name in ("shards/shard-00001.index", "shards/shard-00001.ids.parquet"):
        original = os.path.join(index_copy, name)
        saved = original + ".saved"
        shutil.copy(original, saved)
        shutil.copy(os.path.join(other, name), original)
        if name.endswith(".index"):
            assert os.path.getsize(original) == os.path.getsize(saved)   # same size: only the checksum tells
        with pytest.raises(IndexFormatError, match=name.replace(".", r"\.")):
            Searcher(index_copy)
        os.replace(saved, original)
    Searcher(index_copy)


def test_missing_files_and_manifest(index_copy):
    os.remove(os.path.join(index_copy, "trained.index"))
    with pytest.raises(IndexFormatError, match="index file missing: .*trained.index"):
        IndexStore(index_copy).load_trained()
    os.remove(os.path.join(index_copy, "manifest.json"))
    with pytest.raises(IndexFormatError, match="not a complete raysearch index"):
        Searcher(index_copy)


def test_queries_of_the_wrong_dimension_are_refused(index_copy):
    with pytest.raises(ValueError, match=r"query vectors must have shape \(n, 16\)"):
        Searcher(index_copy).search(np.zeros((2, 8), np.float32))
