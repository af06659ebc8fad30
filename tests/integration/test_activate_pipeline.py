"""`raysearch activate` on a real index: writes activated images and a report, records images the
index does not hold, and resumes."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from raysearch.activate.optimize import ActivateConfig
from raysearch.activate.pipeline import ActivatePipelineConfig, activate_source, read_report
from raysearch.build import build
from raysearch.cli import app
from raysearch.embed import EmbedConfig, list_parts, read_errors
from raysearch.index.build import IndexConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pq_index(tmp_path_factory, photo_folder, ray_local) -> str:
    out = str(tmp_path_factory.mktemp("act") / "index")
    build(photo_folder, out, EmbedConfig(progress=False), IndexConfig(factory="IVF2,PQ8x4"))
    return out


@pytest.fixture()
def to_activate(tmp_path, photo_folder) -> str:
    """A list file naming five indexed images and one the index does not hold."""
    stranger = tmp_path / "stranger.jpg"
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(stranger)
    lines = ["path,id"]
    for name in ["a/img000", "b/img001", "a/img002", "b/img003", "a/img004"]:
        lines.append(f"{os.path.join(photo_folder, name)}.jpg,{name}")
    lines.append(f"{stranger},stranger")
    path = tmp_path / "to_activate.csv"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_activation_writes_images_and_report_and_resumes(pq_index, to_activate, tmp_path, photo_folder):
    out = str(tmp_path / "activated")
    config = ActivatePipelineConfig(activate=ActivateConfig(iterations=10), batch_size=2, chunk_rows=2,
                                    progress=False, max_error_rate=0.5)
    summary = activate_source(pq_index, to_activate, out, config)
    assert (summary.n_images, summary.n_activated, summary.n_errors) == (6, 5, 1)
    errors = read_errors(out).to_pylist()
    assert errors[0]["image_id"] == "stranger" and "not in the index" in errors[0]["reason"]
    report = read_report(out).to_pylist()
    assert [r["image_id"] for r in report] == ["a/img000", "b/img001", "a/img002", "b/img003", "a/img004"]
    for r in report:
        original = np.asarray(Image.open(os.path.join(photo_folder, r["image_id"] + ".jpg")).convert("RGB"))
        activated = np.asarray(Image.open(r["output"]))
        assert r["output"].endswith(".png") and activated.shape == original.shape
        assert 0 < np.abs(activated.astype(int) - original.astype(int)).max() == r["linf"]
        assert 25 < r["psnr"] < 80 and 0.5 < r["ssim"] <= 1.0
        assert r["dist_after"] < r["dist_before"]  # measured through the build's own preprocessing

    # Interrupt: drop two report parts as if the run had stopped before writing them.
    parts = list_parts(out, "report")
    for p in parts[:2]:
        os.remove(p)
    os.remove(os.path.join(out, "activate.json"))
    resumed = activate_source(pq_index, to_activate, out, config)
    assert resumed.n_activated == 5 and resumed.n_skipped == 6 - 2 * 2
    assert sorted(r["image_id"] for r in read_report(out).to_pylist()) == sorted(x["image_id"] for x in report)


def test_activate_cli_and_its_refusals(pq_index, photo_folder, tmp_path, to_activate):
    runner = CliRunner()
    flat = str(tmp_path / "flat")
    build(photo_folder, flat, EmbedConfig(progress=False), IndexConfig(factory="Flat"))
    res = runner.invoke(app, ["activate", flat, to_activate, "--out", str(tmp_path / "o1"), "--no-progress"])
    assert res.exit_code == 2 and "stores vectors exactly" in res.output
    res = runner.invoke(app, ["activate", pq_index, to_activate, "--out", str(tmp_path / "o2"), "--no-progress",
                              "--iterations", "1", "--psnr", "45", "--max-error-rate", "0.5"])
    assert res.exit_code == 0, res.output
    assert "activated 5 of 6 images (1 errors)" in res.output
    assert all(r["psnr"] >= 45.0 for r in read_report(str(tmp_path / "o2")).to_pylist())
