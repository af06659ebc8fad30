"""The quality tools end to end: multi-scale extraction, PCA-whitening inside the index, DBA at
build time, alpha-QE at search time; each recorded in the manifest and applied automatically."""

from __future__ import annotations

import csv
import io
import json
import os

import numpy as np
import pytest
from typer.testing import CliRunner

from raysearch.cli import app
from raysearch.datasets.copyset import CopySetConfig, write_copy_detection_set
from raysearch.evaluate.queries import read_embeddings_folder
from raysearch.index.transforms import read_whitening
from raysearch.index.expansion import QueryExpansion, database_side_augmentation
from raysearch.search import Searcher

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def copyset(tmp_path_factory):
    return write_copy_detection_set(
        str(tmp_path_factory.mktemp("qset")), CopySetConfig(n_references=40, n_queries=12, n_background=12, seed=2)
    )


@pytest.fixture(scope="module")
def tuned_index(copyset, tmp_path_factory, ray_local):
    out = str(tmp_path_factory.mktemp("tuned") / "index")
    res = CliRunner().invoke(app, [
        "build", copyset.references, "--out", out, "--scales", "1,0.7071", "--whiten", "--dba", "2",
        "--qe", "2", "--no-progress",
    ])
    assert res.exit_code == 0, res.output
    assert "PCA-whitening" in res.stdout and "DBA k=2" in res.stdout
    return out


def _manifest(index_dir: str) -> dict:
    with open(os.path.join(index_dir, "manifest.json")) as f:
        return json.load(f)


def test_manifest_records_every_quality_option(tuned_index):
    m = _manifest(tuned_index)
    assert m["model"]["scales"] == [1.0, 0.7071]
    assert m["whitening"]["trained_on"] == "the indexed embeddings"
    assert m["whitening"]["dim_in"] == 1280 and m["whitening"]["dim_out"] == 39   # 40 vectors -> 39 axes
    assert m["dba"]["k"] == 2 and m["dba"]["alpha"] == 3.0
    assert m["query_expansion"] == {"k": 2, "alpha": 3.0}
    assert m["embeddings"] == ["embeddings-dba"]


def test_queries_are_embedded_with_the_multiscale_model(tuned_index, copyset):
    searcher = Searcher(tuned_index)
    raw = read_embeddings_folder(os.path.join(tuned_index, "embeddings"))
    image_id = raw.ids[3]
    with open(os.path.join(copyset.references, image_id + ".jpg"), "rb") as f:
        xq = searcher.embed_image_bytes([f.read()])
    np.testing.assert_allclose(xq[0], raw.vectors[3], atol=2e-5)


def test_dba_vectors_are_weighted_neighbourhood_means(tuned_index):
    raw = read_embeddings_folder(os.path.join(tuned_index, "embeddings"))
    dba = read_embeddings_folder(os.path.join(tuned_index, "embeddings-dba"))
    assert dba.ids == raw.ids
    x = raw.vectors
    sims = x @ x.T
    order = np.argsort(-sims, axis=1)[:, :3]
    rows = np.arange(len(x))
    expected = database_side_augmentation(x, rows, order, x[order], np.take_along_axis(sims, order, 1), 2, 3.0)
    np.testing.assert_allclose(dba.vectors, expected, atol=1e-5)
    assert not np.allclose(dba.vectors, x, atol=1e-3)


def test_whitening_is_applied_to_queries_inside_the_index(tuned_index):
    searcher = Searcher(tuned_index)
    w = read_whitening(searcher.store.load_trained())
    assert w.A.shape == (39, 1280)
    db = read_embeddings_folder(os.path.join(tuned_index, "embeddings-dba"))
    xq = read_embeddings_folder(os.path.join(tuned_index, "embeddings")).vectors[:5]
    res = searcher.search(xq, k=3, query_expansion=False)
    sims = w.apply(xq) @ w.apply(db.vectors).T
    expected = np.argsort(-sims, axis=1)[:, :3]
    image_ids, _ = searcher.lookup(res)
    assert [list(r) for r in image_ids] == [[db.ids[j] for j in row] for row in expected]
    np.testing.assert_allclose(res.scores, np.take_along_axis(sims, expected, 1), atol=1e-4)


def test_recorded_query_expansion_is_the_default_and_can_be_switched_off(tuned_index, copyset):
    searcher = Searcher(tuned_index)
    assert searcher.query_expansion == QueryExpansion(2, 3.0)
    xq = read_embeddings_folder(os.path.join(tuned_index, "embeddings")).vectors[:8]
    default = searcher.search(xq, k=5)
    explicit = searcher.search(xq, k=5, query_expansion=QueryExpansion(2, 3.0))
    off = searcher.search(xq, k=5, query_expansion=False)
    np.testing.assert_array_equal(default.ids, explicit.ids)
    assert not np.allclose(default.scores, off.scores)

    query = os.path.join(copyset.queries, sorted(os.listdir(copyset.queries))[0])

    def cli_scores(*extra: str) -> list[float]:
        res = CliRunner().invoke(app, ["search", tuned_index, query, "-k", "3", "--format", "csv", *extra])
        assert res.exit_code == 0, res.output
        return [float(r["score"]) for r in csv.DictReader(io.StringIO(res.stdout))]

    assert cli_scores() != cli_scores("--qe", "0")


def test_whitening_learned_on_another_set(tuned_index, copyset, tmp_path):
    out = str(tmp_path / "bg-whitened")
    res = CliRunner().invoke(app, ["index", os.path.join(tuned_index, "embeddings"), "--out", out,
                                   "--whiten-on", copyset.background, "--whiten-dim", "8"])
    assert res.exit_code == 0, res.output
    m = _manifest(out)
    assert m["whitening"]["trained_on"] == copyset.background
    assert m["whitening"]["n_train"] == 12 and m["whitening"]["dim_out"] == 8
    assert os.path.exists(os.path.join(out, "whitening-embeddings", "embeddings.json"))
    assert "dba" not in m and "query_expansion" not in m


def test_ann_recall_of_a_whitened_ivf_index_is_measured_in_its_own_space(tuned_index, tmp_path):
    out = str(tmp_path / "ivf")
    res = CliRunner().invoke(app, ["index", os.path.join(tuned_index, "embeddings"), "--out", out,
                                   "--index", "IVF4,Flat", "--whiten"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["eval", "ann", out, "--queries", "40", "--ks", "1,10", "--json"])
    assert res.exit_code == 0, res.output
    rows = {r["nprobe"]: r for r in json.loads(res.stdout)["rows"]}
    assert sorted(rows) == [1, 2, 4]
    # Scanning every list is exact search: the exact reference must be computed in the whitened space.
    assert rows[4]["recall@1"] == 1.0 and rows[4]["recall@10"] == 1.0
    assert rows[1]["recall@10"] <= rows[4]["recall@10"]
    text = CliRunner().invoke(app, ["eval", "ann", out, "--queries", "10", "--nprobe", "1,4"])
    assert text.exit_code == 0 and "ms/q batch" in text.stdout


def test_bad_quality_options_are_refused(copyset, tmp_path):
    for args, message in (
        (["--scales", "1,half"], "--scales"),
        (["--dba", "-1"], "--dba"),
        (["--whiten-dim", "8"], "--whiten-dim needs"),
        (["--qe", "500"], "--qe"),
    ):
        res = CliRunner().invoke(app, ["build", copyset.references, "--out", str(tmp_path / "x"), *args])
        assert res.exit_code == 2 and message in res.output, (args, res.output)


def test_query_expansion_over_ivf_shards_matches_a_flat_index(tuned_index, tmp_path):
    # Expanded queries need the database vectors of the first results: IVF shards reconstruct them
    # through an id -> list table, Flat through its IDMap; with every list scanned both must agree.
    emb = os.path.join(tuned_index, "embeddings")
    for name, extra in (("flat", ["--index", "Flat"]), ("ivf", ["--index", "IVF4,Flat", "--shards", "2", "--nprobe", "4"])):
        res = CliRunner().invoke(app, ["index", emb, "--out", str(tmp_path / name), *extra])
        assert res.exit_code == 0, res.output
    flat, ivf = Searcher(str(tmp_path / "flat")), Searcher(str(tmp_path / "ivf"))
    assert len(ivf.shards) == 2
    xq = read_embeddings_folder(emb).vectors[::4]
    qe = QueryExpansion(3, 1.0)
    a = flat.search(xq, k=5, query_expansion=qe)
    b = ivf.search(xq, k=5, query_expansion=qe)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)
    assert not np.allclose(a.scores, flat.search(xq, k=5).scores)
