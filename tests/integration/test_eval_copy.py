"""`raysearch eval` end to end on real photographs: copy detection, landmarks, CMC, ANN recall.

One Flat index over crops of scikit-image photographs (built with Ray), queries embedded in-process
and through the Ray pipeline, metrics checked against what the images make certain.
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import shutil

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from raysearch.builder import build
from raysearch.cli import app
from raysearch.embed import EmbedConfig
from raysearch.datasets.copyset import CopySetConfig, write_copy_detection_set
from raysearch.metrics.groundtruth import read_predictions
from raysearch.metrics.retrieval import copy_detection_metrics
from raysearch.evaluate.copy import CopyEvalConfig, evaluate_copy_detection
from raysearch.evaluate.queries import embed_images
from raysearch.index.build import IndexConfig
from raysearch.search import Searcher

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def copyset(tmp_path_factory):
    return write_copy_detection_set(
        str(tmp_path_factory.mktemp("copyset")),
        CopySetConfig(n_references=40, n_queries=24, n_background=12, seed=1),
    )


@pytest.fixture(scope="module")
def index_dir(copyset, tmp_path_factory, ray_local):
    out = str(tmp_path_factory.mktemp("eval-index") / "index")
    build(copyset.references, out, EmbedConfig(progress=False), IndexConfig(factory="Flat"))
    return out


@pytest.fixture(scope="module")
def searcher(index_dir):
    return Searcher(index_dir)


def _json(res) -> dict:
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_unedited_copies_give_perfect_scores_and_a_predictions_csv(copyset, index_dir, tmp_path):
    # Exact copies of five references under DISC21-style names, three images no reference copies
    # (background crops), and one query listed in the ground truth but absent: its match is missed.
    qdir = tmp_path / "queries"
    qdir.mkdir()
    rows = []
    for i, ref in enumerate(copyset.reference_ids[:5]):
        shutil.copy(os.path.join(copyset.references, ref + ".jpg"), qdir / f"Q{i:05d}.jpg")
        rows.append((f"Q{i:05d}", ref))
    for i, name in enumerate(sorted(os.listdir(copyset.background))[:3]):
        shutil.copy(os.path.join(copyset.background, name), qdir / f"Q{10 + i:05d}.jpg")
        rows.append((f"Q{10 + i:05d}", ""))
    gt = tmp_path / "gt.csv"
    gt.write_text("query_id,reference_id\n" + "".join(f"{q},{r}\n" for q, r in rows))
    pred = tmp_path / "pred.csv"
    doc = _json(CliRunner().invoke(app, ["eval", "copy", index_dir, "--queries", str(qdir), "--gt", str(gt),
                                         "--predictions", str(pred), "--json"]))
    assert doc["micro_ap"] == pytest.approx(1.0)
    assert doc["recall_at_1"] == 1.0 and doc["recall_at_p90"] == 1.0
    assert doc["n_queries"] == 8 and doc["n_ground_truth"] == 5
    with open(pred) as f:
        table = list(csv.reader(f))
    assert table[0] == ["query_id", "reference_id", "score"]
    assert len(table) - 1 == 8 * 10   # k = 10 predictions for each query
    # The CSV alone gives the same metrics (what the ISC2021 scorer would compute from it).
    again = copy_detection_metrics([(q, r) for q, r in rows if r], read_predictions(str(pred)))
    assert again.average_precision == pytest.approx(doc["micro_ap"])
    # With a listed query missing, its match counts as missed.
    gt.write_text(gt.read_text() + "Q00099,R000001\n")
    doc2 = _json(CliRunner().invoke(app, ["eval", "copy", index_dir, "--queries", str(qdir), "--gt", str(gt),
                                          "--predictions", "", "--json"]))
    assert doc2["recall_at_1"] == pytest.approx(5 / 6)
    assert doc2["n_missing_queries"] == 1


def test_edited_copies_are_evaluated_with_the_text_report(copyset, index_dir, tmp_path):
    res = CliRunner().invoke(app, ["eval", "copy", index_dir, "--queries", copyset.queries, "--gt",
                                   copyset.ground_truth, "--predictions", str(tmp_path / "p.csv")])
    assert res.exit_code == 0, res.output
    lines = {line.split()[0]: line for line in res.stdout.splitlines() if line.strip()}
    assert "micro-AP" in lines and "recall@1" in lines and "recall@10" in lines
    recall1 = float(lines["recall@1"].split()[1])
    assert 0.5 <= recall1 <= 1.0   # edited copies of 12 references among 40: most are found


def test_ray_pipeline_and_in_process_embed_queries_alike(copyset, searcher, tmp_path):
    spec = searcher.store.model_spec
    local = embed_images(copyset.queries, spec, in_process_limit=1000, embedder=searcher.embedder())
    work = str(tmp_path / "work")
    remote = embed_images(copyset.queries, spec, in_process_limit=0, work_dir=work)
    assert remote.ids == local.ids
    np.testing.assert_allclose(remote.vectors, local.vectors, atol=2e-5)
    # The embeddings stay in --work and a rerun reads them back instead of embedding again.
    assert any(name.startswith("embeddings-") for name in os.listdir(work))
    again = embed_images(copyset.queries, spec, in_process_limit=0, work_dir=work)
    np.testing.assert_array_equal(again.vectors, remote.vectors)


def test_score_normalisation_subtracts_the_background_term(copyset, searcher):
    spec = searcher.store.model_spec
    queries = embed_images(copyset.queries, spec, embedder=searcher.embedder())
    background = embed_images(copyset.background, spec, embedder=searcher.embedder())
    plain = evaluate_copy_detection(searcher, queries, copyset.ground_truth, CopyEvalConfig(k=5))
    normed = evaluate_copy_detection(searcher, queries, copyset.ground_truth, CopyEvalConfig(k=5, beta=0.5),
                                     background=background)
    # Expected: for each query, 0.5 * mean of its 3 best cosine similarities to the background.
    sims = queries.vectors @ background.vectors.T
    bias = 0.5 * np.sort(sims, axis=1)[:, -3:].mean(axis=1)
    q_index = {q: i for i, q in enumerate(queries.ids)}
    got = {(q, r): s for q, r, s in zip(normed.predictions.query_ids, normed.predictions.reference_ids,
                                        normed.predictions.scores)}
    for q, r, s in zip(plain.predictions.query_ids, plain.predictions.reference_ids, plain.predictions.scores):
        assert got[(q, r)] == pytest.approx(s - bias[q_index[q]], abs=1e-5)
    assert normed.config["score_normalisation"]["background"] == f"{len(background)} vectors"


def test_background_given_as_an_embeddings_folder_is_streamed(copyset, searcher, index_dir):
    from raysearch.evaluate.queries import read_embeddings_folder

    queries = embed_images(copyset.queries, searcher.store.model_spec, embedder=searcher.embedder())
    in_memory = read_embeddings_folder(os.path.join(index_dir, "embeddings"))
    a = evaluate_copy_detection(searcher, queries, copyset.ground_truth, CopyEvalConfig(k=3), background=in_memory)
    # An index directory names its embeddings folder; its parts are read one by one.
    b = evaluate_copy_detection(searcher, queries, copyset.ground_truth, CopyEvalConfig(k=3, background=index_dir))
    np.testing.assert_allclose(a.predictions.scores, b.predictions.scores, atol=1e-6)
    assert b.config["score_normalisation"]["background"].endswith("embeddings")


def test_query_expansion_searches_with_the_expanded_query(copyset, searcher, index_dir):
    from raysearch.index.expansion import QueryExpansion, alpha_query_expansion

    spec = searcher.store.model_spec
    queries = embed_images(copyset.queries, spec, embedder=searcher.embedder())
    xq = queries.vectors[:6]
    result = searcher.search_many(xq, 5, query_expansion=QueryExpansion(2, 3.0))
    # Done by hand over the index's own vectors (a Flat index stores them exactly).
    emb = embed_images(os.path.join(index_dir, "embeddings"), spec)
    xb = emb.vectors
    first = np.argsort(-(xq @ xb.T), axis=1)[:, :2]
    sims = np.take_along_axis(xq @ xb.T, first, axis=1)
    expanded = alpha_query_expansion(xq, xb[first], sims, 3.0)
    expected_top = np.argsort(-(expanded @ xb.T), axis=1)[:, 0]
    image_ids, _ = searcher.lookup(result)
    assert list(image_ids[:, 0]) == [emb.ids[i] for i in expected_top]
    np.testing.assert_allclose(result.scores[:, 0], (expanded @ xb.T).max(axis=1), atol=1e-4)


def test_cmc_rank_one_matches_plain_top_one(copyset, searcher, index_dir, tmp_path):
    labels = tmp_path / "labels.csv"
    pairs = [(q, r) for q, r in copyset.query_reference.items() if r]
    labels.write_text("query_id,reference_id\n" + "".join(f"{q},{r}\n" for q, r in pairs))
    doc = _json(CliRunner().invoke(app, ["eval", "cmc", index_dir, "--queries", copyset.queries,
                                         "--labels", str(labels), "--json"]))
    paths = [os.path.join(copyset.queries, q + ".jpg") for q, _ in pairs]
    result, _ = searcher.search_images(paths, k=1)
    top1, _ = searcher.lookup(result)
    expected = np.mean([t == r for t, (_, r) in zip(top1[:, 0], pairs)])
    assert doc["cmc_at_rank"]["1"] == pytest.approx(expected)
    assert doc["n_queries"] == len(pairs) and doc["n_collection"] == 40
    assert doc["fraction_ranks"] == {"1%": 1, "5%": 2, "10%": 4}
    values = [doc["cmc_at_rank"][r] for r in ("1", "5", "10", "20")]
    assert values == sorted(values) and doc["depth"] >= 20


def test_landmarks_crop_queries_to_their_boxes(copyset, index_dir, tmp_path, photos):
    meta = json.load(open(os.path.join(copyset.folder, "copyset.json")))["references"]
    refs = copyset.reference_ids
    # Queries are whole photographs; each box is one reference's crop, which is the easy positive.
    qdir = tmp_path / "jpg"
    qdir.mkdir()
    chosen = refs[:4]
    gnd = []
    imlist = refs[5:] + refs[:4]      # R000004 is indexed but not in imlist: left out of rankings
    for ref in chosen:
        photo = meta[ref]["photo"]
        Image.fromarray(photos[photo]).save(qdir / f"{photo}.jpg", quality=90)
        # The photograph's other crops stay in the ranking: uncropped, the query resembles them too
        # (without --crop the mAP of this set drops below 1).
        gnd.append({"bbx": meta[ref]["box"], "easy": [imlist.index(ref)], "hard": [], "junk": []})
    pkl = tmp_path / "gnd_test.pkl"
    with open(pkl, "wb") as f:
        pickle.dump({"imlist": imlist, "qimlist": [meta[r]["photo"] for r in chosen], "gnd": gnd}, f)
    doc = _json(CliRunner().invoke(app, ["eval", "landmarks", index_dir, "--queries", str(qdir), "--gnd", str(pkl),
                                         "--json"]))
    assert doc["easy"]["map"] == pytest.approx(1.0)
    assert doc["easy"]["mp_at"]["1"] == pytest.approx(1.0)
    assert doc["hard"]["n_queries"] == 0            # no hard positives: every query left out
    assert doc["indexed_not_in_imlist"] == 1 and doc["depth"] == 40
    res = CliRunner().invoke(app, ["eval", "landmarks", index_dir, "--queries", str(qdir), "--gnd", str(pkl)])
    assert res.exit_code == 0 and "easy" in res.stdout and "mAP" in res.stdout


def test_bad_inputs_give_one_line_errors(index_dir, copyset, tmp_path):
    res = CliRunner().invoke(app, ["eval", "copy", index_dir, "--queries", copyset.queries, "--gt",
                                   str(tmp_path / "nope.csv"), "--predictions", ""])
    assert res.exit_code == 2 and "ground truth not found" in res.output
    res = CliRunner().invoke(app, ["eval", "copy", index_dir, "--queries", copyset.queries, "--gt",
                                   copyset.ground_truth, "--match-ids", "fuzzy"])
    assert res.exit_code == 2 and "--match-ids" in res.output
    other = tmp_path / "other_gt.csv"
    other.write_text("query_id,reference_id\nX1,R000001\n")
    res = CliRunner().invoke(app, ["eval", "copy", index_dir, "--queries", copyset.queries, "--gt", str(other),
                                   "--predictions", ""])
    assert res.exit_code == 2 and "none of the 24 query images" in res.output
    res = CliRunner().invoke(app, ["eval", "ann", index_dir, "--ks", "1,ten"])
    assert res.exit_code == 2 and "--ks" in res.output


def test_ann_recall_of_a_flat_index_is_exact(index_dir):
    doc = _json(CliRunner().invoke(app, ["eval", "ann", index_dir, "--queries", "20", "--ks", "1,10", "--json"]))
    assert doc["factory"] == "Flat" and len(doc["rows"]) == 1
    assert doc["rows"][0]["recall@1"] == 1.0 and doc["rows"][0]["recall@10"] == 1.0
