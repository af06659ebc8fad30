"""Every page the commands write, made by the real commands on a real index and opened in headless
Chromium with the network blocked: `search --html`, `eval copy|cmc|landmarks|ann --report`,
`activate --report` and `eval activation --report`. Each test takes a screenshot, counts the result
images in the DOM and checks that every image loaded (the page marks its <body> once they have)."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil

import pytest
from PIL import Image
from typer.testing import CliRunner

from raysearch.builder import build
from raysearch.cli import app
from raysearch.datasets.copyset import CopySetConfig, write_copy_detection_set
from raysearch.embed import EmbedConfig
from raysearch.index.build import IndexConfig
from raysearch.pages.browser import chromium_path, run_chromium

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(chromium_path() is None, reason="no Chromium (apt-get install chromium)")]

SCREENSHOTS_ENV = "RAYSEARCH_SCREENSHOTS"   # a folder: the tests copy their screenshots there (docs/)


def _open(page: str, name: str, tmp_path, window=(1280, 1000)) -> tuple[str, dict[str, str]]:
    """Open a page file offline: screenshot it, return its DOM and its <body>'s data-* attributes."""
    url = "file://" + os.path.abspath(page)
    shot = str(tmp_path / f"{name}.png")
    run_chromium(url, screenshot=shot, window=window, offline=True)
    assert os.path.getsize(shot) > 5_000
    if os.environ.get(SCREENSHOTS_ENV):
        shutil.copy(shot, os.path.join(os.environ[SCREENSHOTS_ENV], f"{name}.png"))
    dom = run_chromium(url, dump_dom=True, offline=True)
    tag = re.search(r"<body([^>]*)>", dom)
    assert tag, dom[:300]
    body = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', tag.group(1)))
    assert body.get("ready") == "1", body
    assert int(body["images"]) > 0 and body["images"] == body["images-loaded"], body   # every image loaded
    return dom, body


def _ok(res) -> str:
    assert res.exit_code == 0, res.output
    return res.output


@pytest.fixture(scope="module")
def copyset(tmp_path_factory):
    return write_copy_detection_set(str(tmp_path_factory.mktemp("pages-copyset")),
                                    CopySetConfig(n_references=40, n_queries=16, n_background=0, seed=3))


@pytest.fixture(scope="module")
def index_dir(copyset, tmp_path_factory, ray_local) -> str:
    # IVF with PQ codes: nprobe to sweep for `eval ann`, codes to activate for.
    out = str(tmp_path_factory.mktemp("pages-index") / "index")
    build(copyset.references, out, EmbedConfig(progress=False), IndexConfig(factory="IVF2,PQ8x4"))
    return out


def test_search_html_shows_each_query_beside_its_top_k(index_dir, copyset, tmp_path):
    queries = sorted(os.listdir(copyset.queries))[:3]
    page = str(tmp_path / "search.html")
    res = CliRunner().invoke(app, ["search", index_dir, *[os.path.join(copyset.queries, q) for q in queries],
                                   str(tmp_path / "missing.jpg"), "-k", "4", "--format", "csv", "--html", page])
    assert res.exit_code == 1                                  # the missing query fails, the others are answered
    assert res.stdout.splitlines()[0] == "query,rank,id,uri,score"   # --html leaves the CSV on stdout intact
    assert f"wrote {page}" in res.stderr
    dom, body = _open(page, "search-page", tmp_path)
    assert dom.count('class="card hit"') == 3 * 4
    assert dom.count('class="row query-row"') == 4 and "could not be searched" in dom
    assert body["images"] == str(3 + 3 * 4)                    # three query thumbnails and their hits


def test_eval_copy_report(index_dir, copyset, tmp_path):
    report = str(tmp_path / "copy-report")
    res = CliRunner().invoke(app, ["eval", "copy", index_dir, "--queries", copyset.queries, "--gt", copyset.ground_truth,
                                   "--predictions", "", "--json", "--report", report])
    doc = json.loads(_ok(res) and res.stdout)
    summary = json.load(open(os.path.join(report, "summary.json")))
    assert summary["micro_ap"] == pytest.approx(doc["micro_ap"]) and summary["n_queries"] == doc["n_queries"]
    dom, body = _open(os.path.join(report, "index.html"), "eval-copy", tmp_path, (1280, 1600))
    assert 'alt="precision-recall"' in dom and 'alt="score histograms"' in dom
    misses = re.search(r'data-gallery="misses">(.*?)</section>', dom, re.S).group(1)
    false_pos = re.search(r'data-gallery="false-positives">(.*?)</section>', dom, re.S).group(1)
    # Every miss row shows its query first; every false positive its query and the wrong result.
    assert misses.count('class="card query"') == misses.count('class="row"')
    assert false_pos.count('class="card wrong"') >= false_pos.count('class="row"') > 0
    assert f"{doc['micro_ap']:.4f}" in dom


def test_eval_cmc_report(index_dir, copyset, tmp_path):
    labels = tmp_path / "labels.csv"
    pairs = [(q, r) for q, r in copyset.query_reference.items() if r]
    labels.write_text("query_id,reference_id\n" + "".join(f"{q},{r}\n" for q, r in pairs))
    report = str(tmp_path / "cmc-report")
    res = CliRunner().invoke(app, ["eval", "cmc", index_dir, "--queries", copyset.queries, "--labels", str(labels),
                                   "--json", "--report", report])
    doc = json.loads(_ok(res) and res.stdout)
    dom, _ = _open(os.path.join(report, "index.html"), "eval-cmc", tmp_path, (1280, 1400))
    assert 'alt="CMC"' in dom and 'alt="score histograms"' in dom
    assert f"{doc['cmc_at_rank']['1']:.4f}" in dom
    # Each labelled query that missed at rank 1 is in the gallery (fewer than its limit here).
    misses = re.search(r'data-gallery="misses">(.*?)</section>', dom, re.S).group(1)
    assert misses.count('class="row"') == round((1 - doc["cmc_at_rank"]["1"]) * doc["n_queries"])


def test_eval_landmarks_report(index_dir, copyset, tmp_path, photos):
    meta = json.load(open(os.path.join(copyset.folder, "copyset.json")))["references"]
    refs = copyset.reference_ids
    qdir = tmp_path / "jpg"
    qdir.mkdir()
    imlist, gnd, names = refs, [], []
    for ref in refs[:3]:
        photo = meta[ref]["photo"]
        if photo in names:
            continue
        names.append(photo)
        Image.fromarray(photos[photo]).save(qdir / f"{photo}.jpg", quality=90)
        gnd.append({"bbx": meta[ref]["box"], "easy": [imlist.index(ref)], "hard": [], "junk": []})
    pkl = tmp_path / "gnd.pkl"
    with open(pkl, "wb") as f:
        pickle.dump({"imlist": imlist, "qimlist": names, "gnd": gnd}, f)
    report = str(tmp_path / "landmarks-report")
    _ok(CliRunner().invoke(app, ["eval", "landmarks", index_dir, "--queries", str(qdir), "--gnd", str(pkl),
                                 "--report", report]))
    dom, body = _open(os.path.join(report, "index.html"), "eval-landmarks", tmp_path, (1280, 1200))
    assert "mAP" in dom and 'alt="score histograms"' in dom
    worst = re.search(r'data-gallery="misses">(.*?)</section>', dom, re.S).group(1)
    assert worst.count('class="row"') == len(names)            # every query, lowest AP first
    assert worst.count('class="card query"') == len(names)


def test_eval_ann_report(index_dir, tmp_path):
    report = str(tmp_path / "ann-report")
    res = CliRunner().invoke(app, ["eval", "ann", index_dir, "--queries", "20", "--nprobe", "1,2", "--ks", "1,10",
                                   "--json", "--report", report])
    doc = json.loads(_ok(res) and res.stdout)
    page = os.path.join(report, "index.html")
    html = open(page).read()
    assert 'alt="recall vs nprobe"' in html and 'alt="latency vs nprobe"' in html
    # One table row per nprobe, with its recall.
    for row in doc["rows"]:
        assert f"<th>{row['nprobe']}</th>" in html and f"{row['recall@1']:.4f}" in html
    dom, body = _open(page, "eval-ann", tmp_path)
    assert body["images"] == "2"


def test_activate_and_eval_activation_reports(index_dir, copyset, tmp_path):
    chosen = copyset.reference_ids[:3]
    listing = tmp_path / "to_activate.csv"
    listing.write_text("path,id\n" + "".join(f"{os.path.join(copyset.references, r)}.jpg,{r}\n" for r in chosen))
    out, report = str(tmp_path / "activated"), str(tmp_path / "activation-report")
    args = ["activate", index_dir, str(listing), "--out", out, "--iterations", "2", "--batch-size", "3",
            "--no-progress", "--report", report]
    assert f"wrote {os.path.join(report, 'index.html')}" in _ok(CliRunner().invoke(app, args))
    dom, body = _open(os.path.join(report, "index.html"), "activate", tmp_path, (1280, 1200))
    assert body["images"] == str(3 * len(chosen))                 # original, activated, difference each
    for r in chosen:
        assert f'alt="difference {r}"' in dom
    assert "PSNR" in dom and "Recall@1" not in dom              # no evaluation yet

    res = CliRunner().invoke(app, ["eval", "activation", index_dir, "--activated", out, "--edits", "none,crop",
                                   "--json", "--report", report])
    doc = json.loads(_ok(res) and res.stdout)
    dom, body = _open(os.path.join(report, "index.html"), "eval-activation", tmp_path, (1280, 1400))
    assert "Recall@1 of edited copies" in dom and 'alt="recall per edit"' in dom
    assert body["images"] == str(3 * len(chosen) + 1)           # and the recall plot
    assert f"{doc['mean_activated']:.3f}" in dom

    # A later `activate --report` of the same activation keeps the recall figures it measured.
    _ok(CliRunner().invoke(app, args))
    assert "Recall@1 of edited copies" in open(os.path.join(report, "index.html")).read()
