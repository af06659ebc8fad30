"""The command line: build, search, demo, and one-line errors with exit code 2 for bad input."""

from __future__ import annotations

import json
import os

import pytest
from typer.testing import CliRunner

from raysearch.cli import app

pytestmark = pytest.mark.slow
runner = CliRunner()


def _invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def cli_index(tmp_path_factory, photo_folder, ray_local) -> str:
    out = str(tmp_path_factory.mktemp("cli") / "index")
    res = _invoke("build", photo_folder, "--out", out, "--no-progress")
    assert res.exit_code == 0, res.output
    assert "embedded 40 of 40 images (0 errors)" in res.output
    assert "index: Flat" in res.output
    return out


def test_build_writes_a_complete_index(cli_index):
    manifest = json.load(open(os.path.join(cli_index, "manifest.json")))
    assert manifest["n_vectors"] == 40 and manifest["factory"] == "Flat"
    for name, info in manifest["files"].items():
        assert os.path.getsize(os.path.join(cli_index, name)) == info["size"]


def test_search_json_and_table(cli_index, photo_folder):
    query = os.path.join(photo_folder, "a", "img000.jpg")
    res = _invoke("search", cli_index, query, "-k", "2", "--format", "json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc[0]["query"] == query
    assert doc[0]["results"][0] == {"rank": 1, "id": "a/img000", "uri": query, "score": pytest.approx(1.0, abs=1e-3)}
    table = _invoke("search", cli_index, query, "-k", "1")
    assert table.exit_code == 0 and "a/img000" in table.stdout


def test_search_reports_unreadable_queries_and_keeps_the_others(cli_index, photo_folder, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a picture")
    good = os.path.join(photo_folder, "b", "img001.jpg")
    res = _invoke("search", cli_index, str(bad), good, "-k", "1", "--format", "json")
    assert res.exit_code == 1, res.output   # some queries failed: the others are answered, exit 1
    doc = json.loads(res.stdout)
    assert doc[0]["error"].startswith("not an image") and doc[0]["results"] == []
    assert doc[1]["results"][0]["id"] == "b/img001"


def test_building_into_a_non_empty_folder_needs_overwrite(cli_index, photo_folder):
    # Another build (here: another index type) over a complete index is refused.
    res = _invoke("build", photo_folder, "--out", cli_index, "--no-progress", "--index", "HNSW16")
    assert res.exit_code == 2
    assert "holds another index" in res.output and "--overwrite" in res.output


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda d, p: ["build", str(d / "missing"), "--out", str(d / "o")], "source not found"),
        (lambda d, p: ["build", str(d / "empty"), "--out", str(d / "o")], "holds no images"),
        (lambda d, p: ["build", p, "--out", str(d / "o"), "--model", "vit_huge"], "unknown model"),
        (lambda d, p: ["build", p, "--out", str(d / "afile" / "o")], "cannot write to output folder"),
        (lambda d, p: ["build", p, "--out", str(d / "o"), "--index", "IVF9,Nonsense"], "factory string"),
        (lambda d, p: ["search", str(d / "missing-index"), p], "not found"),
        (lambda d, p: ["search", str(d / "empty"), p], "manifest.json is missing"),
        (lambda d, p: ["build", p, "--out", str(d / "o"), "--max-error-rate", "2"], "--max-error-rate"),
    ],
)
def test_user_errors_exit_2_with_one_line(tmp_path, photo_folder, make_args, message, ray_local):
    (tmp_path / "empty").mkdir()
    (tmp_path / "afile").write_text("a file, not a folder")
    res = _invoke(*make_args(tmp_path, photo_folder))
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], res.output


def test_too_many_bad_images_fail_the_build_naming_the_error_table(tmp_path, photo_folder, ray_local):
    src = tmp_path / "src"
    src.mkdir()
    for i, name in enumerate(sorted(os.listdir(os.path.join(photo_folder, "a")))[:4]):
        (src / f"good{i}.jpg").write_bytes(open(os.path.join(photo_folder, "a", name), "rb").read())
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    res = _invoke("build", str(src), "--out", str(tmp_path / "o"), "--no-progress")
    assert res.exit_code == 2
    assert "1 of 5 images could not be used" in res.output and "errors" in res.output
    ok = _invoke("build", str(src), "--out", str(tmp_path / "o"), "--no-progress", "--max-error-rate", "0.5")
    assert ok.exit_code == 0, ok.output
    assert "embedded 4 of 5 images (1 errors" in ok.output


def test_demo_prints_results_and_recall(tmp_path, ray_local):
    res = _invoke("demo", "--workdir", str(tmp_path / "demo"), "--images", "40", "--queries", "8", "--show", "2")
    assert res.exit_code == 0, res.output
    assert "recall@1:" in res.output and "over 8 queries" in res.output
    recall = float(res.output.split("recall@1: ")[1].split()[0])
    assert 0.0 <= recall <= 1.0
    assert os.path.exists(tmp_path / "demo" / "index" / "manifest.json")


def test_models_and_version():
    res = _invoke("models")
    assert res.exit_code == 0 and "efficientnet_lite0_gem" in res.output and "torchscript:PATH" in res.output
    assert _invoke("--version").output.startswith("raysearch ")
