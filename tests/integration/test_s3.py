"""Building from s3:// into s3:// (moto server on loopback) and searching the remote index."""

from __future__ import annotations

import os

import pytest

from raysearch.builder import build
from raysearch.embed import EmbedConfig
from raysearch.index.build import IndexConfig
from raysearch.index.store import IndexFormatError
from raysearch.search import Searcher

pytestmark = pytest.mark.slow


def test_build_and_search_entirely_on_s3(s3_bucket, photo_folder, tmp_path, monkeypatch, ray_local):
    import s3fs

    fs = s3fs.S3FileSystem()
    local = sorted(os.path.join(d, f) for d, _, fs_ in os.walk(photo_folder) for f in fs_)[:12]
    for path in local:
        fs.put_file(path, f"{s3_bucket}/photos/{os.path.relpath(path, photo_folder)}")
    index_uri = f"s3://{s3_bucket}/indexes/first"
    result = build(f"s3://{s3_bucket}/photos", index_uri, EmbedConfig(progress=False), IndexConfig(shards=2))
    assert result.embed.n_embedded == 12
    assert fs.exists(f"{s3_bucket}/indexes/first/manifest.json")
    assert fs.exists(f"{s3_bucket}/indexes/first/shards/shard-00001.index")

    monkeypatch.setenv("RAYSEARCH_CACHE", str(tmp_path / "cache"))
    searcher = Searcher(index_uri)
    res, problems = searcher.search_images(local[:3], k=1)
    ids, uris = searcher.lookup(res)
    assert problems == [None] * 3
    assert [u for u in uris[:, 0]] == [f"s3://{s3_bucket}/photos/{os.path.relpath(p, photo_folder)}" for p in local[:3]]

    # A remote index with its manifest removed is refused.
    fs.rm(f"{s3_bucket}/indexes/first/manifest.json")
    with pytest.raises(IndexFormatError, match="manifest.json is missing"):
        Searcher(index_uri)
