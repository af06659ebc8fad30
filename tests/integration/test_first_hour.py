"""What a new user meets in the first hour: options checked before any work, reruns that know a
build is complete, failed queries named, files written where they belong, errors listed, and a
terminal that shows raysearch's own lines only (the real `raysearch` command, in a subprocess)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from raysearch.cli import app

pytestmark = pytest.mark.slow
runner = CliRunner()


def _invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def flat_index(tmp_path_factory, photo_folder, ray_local) -> str:
    out = str(tmp_path_factory.mktemp("first-hour") / "index")
    res = _invoke("build", photo_folder, "--out", out, "--no-progress", "--index", "Flat")
    assert res.exit_code == 0, res.output
    return out


# --- --index is checked before any image is embedded --------------------------------------------

@pytest.mark.parametrize("factory, message", [
    ("Flat,Foo", "not a valid FAISS factory string"),
    ("hnsw32", "did you mean 'HNSW32'"),
    ("PQ7", "multiple of the number of subquantizers"),
    ("IVF64,Flat", "needs at least"),
])
def test_a_bad_index_option_fails_before_embedding(tmp_path, photo_folder, factory, message, ray_local):
    out = tmp_path / "o"
    res = _invoke("build", photo_folder, "--out", out, "--no-progress", "--index", factory)
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], res.output
    assert not (out / "embeddings" / "parts").exists()   # nothing was embedded


# --- reruns --------------------------------------------------------------------------------------

def test_a_finished_build_rerun_says_it_is_complete(flat_index, photo_folder):
    res = _invoke("build", photo_folder, "--out", flat_index, "--no-progress", "--index", "Flat")
    assert res.exit_code == 0, res.output
    assert "already holds this build, complete" in res.output and "exact search" in res.output


def test_a_build_that_failed_while_listing_is_rerun_without_overwrite(tmp_path, photo_folder, ray_local):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    assert _invoke("build", src, "--out", out, "--no-progress").exit_code == 2   # no images yet
    shutil.copy(os.path.join(photo_folder, "a", "img000.jpg"), src / "one.jpg")
    shutil.copy(os.path.join(photo_folder, "b", "img001.jpg"), src / "two.jpg")
    res = _invoke("build", src, "--out", out, "--no-progress")
    assert res.exit_code == 0, res.output
    assert "embedded 2 of 2 images" in res.output


def test_a_resumed_build_does_not_report_a_rate(tmp_path, photo_folder, ray_local):
    out = tmp_path / "index"
    assert _invoke("build", photo_folder, "--out", out, "--no-progress", "--index", "Flat").exit_code == 0
    os.remove(out / "manifest.json")   # as if the build had stopped after embedding
    res = _invoke("build", photo_folder, "--out", out, "--no-progress", "--index", "Flat")
    assert res.exit_code == 0, res.output
    assert "all by an earlier run" in res.output and "0.0 images/s" not in res.output


def test_the_summary_names_the_search_parameter_of_each_index_type(flat_index, tmp_path):
    assert "nprobe None" not in _invoke("index", os.path.join(flat_index, "embeddings"), "--out", tmp_path / "f",
                                        "--index", "Flat").output
    res = _invoke("index", os.path.join(flat_index, "embeddings"), "--out", tmp_path / "h", "--index", "HNSW16")
    assert res.exit_code == 0, res.output
    assert "efSearch" in res.output.splitlines()[0] and "nprobe" not in res.output.splitlines()[0]


# --- paths and ground truth ----------------------------------------------------------------------

def test_an_index_of_a_relative_embeddings_path_works_from_anywhere(flat_index, tmp_path, monkeypatch):
    shutil.copytree(os.path.join(flat_index, "embeddings"), tmp_path / "rel" / "embeddings")
    monkeypatch.chdir(tmp_path)
    assert _invoke("index", "rel/embeddings", "--out", "idx", "--index", "Flat").exit_code == 0
    monkeypatch.chdir(tmp_path / "rel")   # somewhere else: the manifest must not depend on it
    res = _invoke("eval", "ann", str(tmp_path / "idx"), "--queries", "10", "--ks", "1,10", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["rows"][0]["recall@10"] == 1.0


def test_ann_recall_after_add_counts_the_added_vectors(tmp_path, photo_folder, ray_local):
    first, more = tmp_path / "first", tmp_path / "more"
    images = sorted(os.path.join(d, f) for d, _, fs in os.walk(photo_folder) for f in fs)
    for target, chosen in ((first, images[:12]), (more, images[12:])):
        target.mkdir()
        for path in chosen:
            shutil.copy(path, target / os.path.basename(path))
    out = tmp_path / "index"
    assert _invoke("build", first, "--out", out, "--no-progress", "--index", "Flat").exit_code == 0
    assert _invoke("add", out, more, "--no-progress").exit_code == 0
    res = _invoke("eval", "ann", out, "--queries", "40", "--ks", "10", "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["n_vectors"] == 40 and doc["rows"][0]["recall@10"] == 1.0   # exact index, exact truth


# --- queries ---------------------------------------------------------------------------------------

def test_search_names_each_failed_query_on_stderr_and_exits_1(flat_index, photo_folder, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a picture")
    good = os.path.join(photo_folder, "a", "img000.jpg")
    res = _invoke("search", flat_index, bad, good, "-k", "2", "--format", "csv")
    assert res.exit_code == 1
    assert f"error: {bad}: not an image" in res.stderr
    rows = res.stdout.strip().splitlines()
    assert rows[0] == "query,rank,id,uri,score" and len(rows) == 3   # no empty row for the bad query
    assert all(r.startswith(good) for r in rows[1:])


def test_search_takes_a_source_of_queries(flat_index, photo_folder):
    res = _invoke("search", flat_index, os.path.join(photo_folder, "a"), "--top-k", "1", "--format", "json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert len(doc) == 20 and all(q["results"][0]["uri"] == q["query"] for q in doc)


def test_the_client_accepts_a_service_address_without_a_scheme():
    from raysearch.serve.client import base_url

    assert base_url("127.0.0.1:8011") == "http://127.0.0.1:8011"
    assert base_url("https://search.example.com/search/") == "https://search.example.com"


# --- evaluation files and the error table ----------------------------------------------------------

def test_eval_copy_writes_its_predictions_next_to_the_index(flat_index, photo_folder, tmp_path, monkeypatch):
    gt = tmp_path / "gt.csv"
    gt.write_text("query_id,reference_id\nimg000,img000\nimg002,img002\n")
    monkeypatch.chdir(tmp_path)
    res = _invoke("eval", "copy", flat_index, "--queries", os.path.join(photo_folder, "a"), "--gt", gt)
    assert res.exit_code == 0, res.output
    assert not (tmp_path / "predictions.csv").exists()
    assert os.path.exists(os.path.join(flat_index, "eval", "copy", "predictions.csv"))
    res = _invoke("eval", "copy", flat_index, "--queries", os.path.join(photo_folder, "a"), "--gt", gt,
                  "--out", tmp_path / "mine")
    assert (tmp_path / "mine" / "predictions.csv").exists()


def test_skipped_images_are_named_and_listed(tmp_path, photo_folder, ray_local):
    src = tmp_path / "src"
    shutil.copytree(os.path.join(photo_folder, "a"), src)
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    out = tmp_path / "index"
    res = _invoke("build", src, "--out", out, "--no-progress", "--max-error-rate", "0.5")
    assert res.exit_code == 0, res.output
    assert f"skipped {src / 'broken.jpg'}: " in res.output
    assert f"raysearch errors {out}" in res.output
    listed = _invoke("errors", out, "--format", "csv")
    assert listed.exit_code == 0
    lines = listed.stdout.strip().splitlines()
    assert lines[0] == "row,image_id,uri,reason" and len(lines) == 2 and "broken" in lines[1]
    assert "1 images skipped" in _invoke("errors", out).stdout


# --- the service --------------------------------------------------------------------------------

def test_serve_on_a_busy_port_is_one_error_line(flat_index):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = _invoke("serve", flat_index, "--port", port)
    assert res.exit_code == 2
    assert res.output.count("\n") == 1 and res.output.startswith("error: cannot listen on 127.0.0.1:")


# --- the real command: quiet by default, Ctrl-C, SIGTERM ---------------------------------------------

NOISE = ("core_worker.cc", "WARNING clustering", " INFO ", "(raylet)")


def _raysearch(*args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "raysearch", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def test_the_command_line_shows_raysearchs_own_lines_only(tmp_path, photo_folder):
    loud = _raysearch("build", photo_folder, "--out", tmp_path / "loud", "--index", "IVF4,Flat", "-v")
    out, err = loud.communicate(timeout=600)
    assert loud.returncode == 0, err
    assert "WARNING clustering" in err    # what -v shows (FAISS's k-means on 40 vectors)
    quiet = _raysearch("build", photo_folder, "--out", tmp_path / "quiet", "--index", "IVF4,Flat", "--no-progress")
    out, err = quiet.communicate(timeout=600)
    assert quiet.returncode == 0, err
    assert not [line for line in (out + err).splitlines() if any(n in line for n in NOISE)], out + err
    assert "embedded 40 of 40 images" in out


def test_ctrl_c_stops_a_build_with_a_resume_hint(tmp_path, photo_folder):
    src = tmp_path / "many"
    src.mkdir()
    images = sorted(os.path.join(d, f) for d, _, fs in os.walk(photo_folder) for f in fs)
    for i in range(2000):
        os.link(images[i % len(images)], src / f"copy{i:05d}.jpg")
    out = tmp_path / "index"
    proc = _raysearch("build", src, "--out", out, "--no-progress")
    deadline = time.time() + 300
    while not (out / "embeddings" / "run.json").exists() and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("interrupted after ")
    assert err.strip().endswith("of 2000 images; rerun the same command to resume")


def test_serve_stops_quietly_on_sigterm(flat_index):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = _raysearch("serve", flat_index, "--port", port)
    lines = []
    deadline = time.time() + 300
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if "press Ctrl-C" in line:
            break
    assert any("press Ctrl-C" in line for line in lines), "".join(lines)
    import httpx

    for _ in range(3):   # requests must not each print an access line
        answer = httpx.post(f"http://127.0.0.1:{port}/search", json={"vector": [0.1] * 1280, "k": 2}, timeout=60)
        assert answer.status_code == 200, answer.text
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    everything = "".join(lines) + out + err
    assert proc.returncode == 0, everything
    assert "stopped" in err
    assert not [line for line in everything.splitlines() if any(n in line for n in NOISE)], everything
    assert "SIGTERM" not in everything and "Stack trace" not in everything
