"""Miniature DISC21 and GLDv2 replicas (real photographs in the published folder structure and CSV
formats) built and evaluated end to end: the DISC21 job locally, GLDv2 through the CLI from
s3:// (moto on loopback)."""

from __future__ import annotations

import csv
import json
import os

import pytest
from typer.testing import CliRunner

from raysearch import storage
from raysearch.cli import app
from raysearch.metrics.gldv2 import read_retrieval_predictions
from raysearch.metrics.groundtruth import read_copy_ground_truth, read_predictions
from raysearch.metrics.retrieval import copy_detection_metrics
from raysearch.datasets.replicas import write_disc21_replica, write_gldv2_replica

pytestmark = pytest.mark.slow


def upload(local: str, uri: str) -> None:
    import s3fs

    fs = s3fs.S3FileSystem()
    for dirpath, _, files in os.walk(local):
        for name in files:
            path = os.path.join(dirpath, name)
            fs.put_file(path, f"{uri.removeprefix('s3://')}/{os.path.relpath(path, local)}")


def test_disc21_job_builds_tunes_evaluates_and_activates_a_local_replica(tmp_path, ray_local):
    from jobs import disc21

    rep = write_disc21_replica(str(tmp_path / "disc21"), n_references=36, n_dev_queries=12, n_test_queries=4, n_train=4)
    out = str(tmp_path / "run")
    # PQ codes of 16 x 4 bits: a quantising index that trains on 36 vectors, so activation applies.
    doc = disc21.main(["--root", rep.root, "--out", out, "--input-size", "64", "--index", "IVF2,PQ16x4",
                       "--activation-iterations", "1", "--edits", "none,crop"])
    assert doc["status"] == "done"
    assert json.loads(open(os.path.join(out, "results.json")).read())["status"] == "done"
    stages = doc["stages"]
    assert stages["build"]["n_embedded"] == 36 and stages["build"]["factory"] == "IVF2,PQ16x4"
    assert sum(stages["build"]["nodes"]["embed"].values()) == 36
    # The build tuned nprobe on held-out references; the job keeps the build's value.
    manifest = json.loads(open(os.path.join(stages["build"]["index_dir"], "manifest.json")).read())
    assert stages["tune"]["source"] == "tuned by the build" and stages["tune"]["nprobe"] in (1, 2)
    assert manifest["search"]["nprobe"] == stages["tune"]["nprobe"]

    # The evaluation read the published ground truth, and its figures are those of its predictions.
    gt = read_copy_ground_truth(os.path.join(rep.root, "dev_queries_groundtruth.csv"))
    ev = stages["eval_dev"]
    assert ev["n_queries"] == 12 and ev["n_ground_truth"] == len(gt.pairs)
    predictions = read_predictions(ev["predictions_csv"])
    assert set(predictions.query_ids) <= set(gt.query_ids)
    assert ev["micro_ap"] == pytest.approx(copy_detection_metrics(gt.pairs, predictions).average_precision)

    # Activation covers exactly the references the dev queries copy (the protocol's 10k split).
    act = stages["activate"]
    assert act["n_activated"] == len({r for _, r in gt.pairs})
    activated = sorted(os.listdir(os.path.join(out, "activated", "images")))
    assert activated == sorted(f"{r}.png" for r in {r for _, r in gt.pairs})
    assert set(stages["eval_activation"]["recall_at_1"]["passive"]) == {"none", "crop"}

    # A rerun reuses the complete index instead of embedding again.
    again = disc21.main(["--root", rep.root, "--out", out, "--input-size", "64", "--index", "IVF2,PQ16x4", "--no-activate"])
    assert again["stages"]["build"]["reused"] is True
    assert again["stages"]["eval_dev"]["micro_ap"] == pytest.approx(ev["micro_ap"])


def test_gldv2_replica_on_s3_builds_and_scores_with_the_cli(tmp_path, s3_bucket, monkeypatch, ray_local):
    rep = write_gldv2_replica(str(tmp_path / "gldv2"), n_index=24, n_test=9, n_train=3, n_landmarks=8)
    root = f"s3://{s3_bucket}/gldv2"
    upload(rep.root, root)
    index_uri = f"s3://{s3_bucket}/runs/gldv2-index"
    monkeypatch.setenv("RAYSEARCH_CACHE", str(tmp_path / "cache"))
    runner = CliRunner()
    res = runner.invoke(app, ["build", f"gldv2:{root}", "--out", index_uri, "--input-size", "64", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "embedded 24 of 24 images" in res.output
    predictions = str(tmp_path / "predictions.csv")
    res = runner.invoke(app, ["eval", "gldv2", index_uri, "--root", root, "--json", "--predictions", predictions])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)

    scored = {t: ids for t, (ids, usage) in rep.solution.items() if usage != "Ignored"}
    assert report["n_ignored"] == len(rep.solution) - len(scored)
    assert report["All"]["n_queries"] == len(scored) == report["Public"]["n_queries"] + report["Private"]["n_queries"]
    preds = read_retrieval_predictions(predictions)
    assert set(preds) == set(scored)          # only the scored test images were embedded and searched
    # A test image that is an exact (re-encoded) copy of an index image finds it first.
    assert rep.copies
    for test_id, index_id in rep.copies.items():
        assert preds[test_id][0] == index_id
    for ranked in preds.values():
        assert set(ranked) <= set(rep.index_ids) and len(ranked) == 24   # the whole index, up to the top 100
    with open(predictions) as f:
        assert next(csv.reader(f)) == ["id", "images"]
    assert 0.0 < report["All"]["map@100"] <= 1.0 and report["All"]["mP@1"] >= len(rep.copies) / len(scored)
    assert storage.exists(f"{index_uri}/manifest.json")
