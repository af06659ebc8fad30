"""Pages and metrics without Ray: the search results page, thumbnails, the report helpers, the
service's Prometheus registry, and the Grafana dashboard against what the service exports."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from raysearch.metrics import retrieval as M
from raysearch.pages import plots
from raysearch.pages.render import thumbnail_jpeg, thumbnail_uri
from raysearch.pages.results import group_rows, search_page
from raysearch.serve.metrics import IMAGES_ROUTE, STAGES, ServiceMetrics, route_label

DASHBOARD = Path(__file__).resolve().parents[2] / "cluster" / "raysearch_dashboard.json"


def _jpeg(path: Path, size: tuple[int, int], colour=(200, 30, 30)) -> str:
    Image.new("RGB", size, colour).save(path, quality=90)
    return str(path)


# ---------------------------------------------------------------------------------------------
# Thumbnails and the search page
# ---------------------------------------------------------------------------------------------


def test_thumbnail_keeps_the_aspect_and_bounds_the_longest_side(tmp_path):
    path = _jpeg(tmp_path / "wide.jpg", (600, 200))
    with open(path, "rb") as f:
        thumb = Image.open(io.BytesIO(thumbnail_jpeg(f.read(), 120)))
    assert thumb.format == "JPEG" and thumb.size == (120, 40)
    with pytest.raises(ValueError, match="between 16 and"):
        thumbnail_jpeg(b"", 5000)


def test_thumbnail_uri_of_an_unreadable_image_is_none(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    assert thumbnail_uri(str(tmp_path / "bad.jpg")) is None
    assert thumbnail_uri(str(tmp_path / "missing.jpg")) is None
    assert thumbnail_uri(_jpeg(tmp_path / "ok.jpg", (50, 50))).startswith("data:image/jpeg;base64,")


def test_rows_group_by_query_in_rank_order():
    rows = [{"query": "q1", "rank": 2, "id": "b", "uri": "u", "score": 0.5},
            {"query": "q1", "rank": 1, "id": "a", "uri": "u", "score": 0.9},
            {"query": "q2", "rank": None, "id": None, "uri": None, "score": None, "error": "file not found"}]
    groups = group_rows(rows)
    assert [g["query"] for g in groups] == ["q1", "q2"]
    assert [h["id"] for h in groups[0]["hits"]] == ["a", "b"] and groups[1]["error"] == "file not found"


def test_search_page_embeds_every_thumbnail_and_shows_verification_only_when_given(tmp_path):
    query = _jpeg(tmp_path / "q.jpg", (80, 60))
    ref = _jpeg(tmp_path / "r.jpg", (60, 80), (20, 200, 20))
    rows = [
        {"query": query, "rank": 1, "id": "<b>evil</b>", "uri": ref, "score": 0.93, "verified": True, "inliers": 57},
        {"query": query, "rank": 2, "id": "plain", "uri": ref, "score": 0.41},
    ]
    html = search_page(rows, k=2)
    images = re.findall(r'<img src="([^"]+)"', html)
    assert len(images) == 3 and all(src.startswith("data:image/jpeg;base64,") for src in images)
    assert html.count('class="badge verified"') == 1 and "57 inliers" in html
    assert "not verified" not in html            # the hit without a verdict gets no badge
    assert "<b>evil</b>" not in html and "&lt;b&gt;evil&lt;/b&gt;" in html   # ids are escaped
    assert "http://" not in html and "https://" not in html                # nothing to fetch


# ---------------------------------------------------------------------------------------------
# Report helpers
# ---------------------------------------------------------------------------------------------


def test_p90_threshold_is_where_precision_falls_below_0_9():
    # 9 true matches above 1 false one, then false matches only: the P90 point is the 10th result.
    scores = np.array([0.99, 0.98, 0.97, 0.96, 0.95, 0.94, 0.93, 0.92, 0.91, 0.90, 0.5, 0.4, 0.3])
    is_match = np.array([1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 0, 0], bool)
    threshold = plots.p90_threshold(is_match, scores)
    above = scores >= threshold
    assert is_match[above].mean() >= 0.9
    p, r, t = M.precision_recall(is_match, scores, int(is_match.sum()))
    assert threshold == M.operating_point(p, r, t, 0.9)[1]
    assert plots.p90_threshold(np.zeros(3, bool), scores[:3]) is None


def test_plots_are_png_data_uris():
    rows = [{"nprobe": p, "recall@1": min(1.0, 0.3 * p), "ms_per_query_batch": 0.1 * p,
             "ms_per_query_single_median": 0.2 * p} for p in (1, 2, 4)]
    for uri in (plots.ann_recall_plot(rows, [1], tuned=2), plots.ann_latency_plot(rows, tuned=2),
                plots.cmc_plot(np.array([1, 3, M.NOT_FOUND]), 10, 40, {0.1: 4}),
                plots.score_histogram_plot(np.array([0.9, 0.8]), np.array([0.2]), 0.5),
                plots.precision_recall_plot(np.array([1.0, 0.5]), np.array([0.5, 1.0]), 0.5, 0.7),
                plots.activation_recall_plot({"crop": 0.5}, {"crop": 0.75})):
        assert uri.startswith("data:image/png;base64,")
        import base64
        assert Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).format == "PNG"


def test_amplified_difference_makes_a_small_change_visible():
    from raysearch.pages.reports import amplified_difference

    original = np.full((20, 20, 3), 100, np.uint8)
    activated = original.copy()
    activated[5:10, 5:10] += 2
    diff, gain = amplified_difference(original, activated)
    assert diff.shape == original.shape and diff.max() == 255 and diff[0, 0].max() == 0
    assert gain == pytest.approx(127.5)
    with pytest.raises(ValueError, match="differ in shape"):
        amplified_difference(original, activated[:10])


# ---------------------------------------------------------------------------------------------
# Metrics and the dashboard
# ---------------------------------------------------------------------------------------------


def _samples(metrics: ServiceMetrics) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_service_metrics_count_requests_stages_errors_and_partial_answers():
    m = ServiceMetrics(n_vectors=1234, n_shards=3)
    m.observe_request("/search", 200, 0.02)
    m.observe_request("/search", 401, 0.001)
    m.observe_request("/images/a/b.jpg", 404, 0.003)
    m.observe_request("/no/such/route", 404, 0.001)
    m.observe_stage("embed", 0.015)
    with m.stage("rerank"):
        pass
    m.observe_answer(2, "image", ["shard-00001"])
    m.observe_answer(1, "vector", [])
    s = _samples(m)
    assert s[("raysearch_requests_total", (("route", "/search"), ("status", "200")))] == 1
    assert s[("raysearch_requests_total", (("route", IMAGES_ROUTE), ("status", "404")))] == 1
    assert s[("raysearch_requests_total", (("route", "other"), ("status", "404")))] == 1
    assert s[("raysearch_errors_total", (("status", "404"),))] == 2
    assert s[("raysearch_errors_total", (("status", "401"),))] == 1
    assert s[("raysearch_stage_duration_seconds_count", (("stage", "embed"),))] == 1
    assert s[("raysearch_stage_duration_seconds_count", (("stage", "rerank"),))] == 1
    assert s[("raysearch_stage_duration_seconds_count", (("stage", "merge"),))] == 0   # declared, not yet seen
    assert s[("raysearch_partial_answers_total", ())] == 1
    assert s[("raysearch_missing_shards_total", (("shard", "shard-00001"),))] == 1
    assert s[("raysearch_queries_total", (("kind", "image"),))] == 2
    assert s[("raysearch_index_vectors", ())] == 1234 and s[("raysearch_index_shards", ())] == 3
    with pytest.raises(ValueError, match="unknown stage"):
        m.observe_stage("think", 1.0)


def test_each_replica_has_its_own_registry():
    a, b = ServiceMetrics(), ServiceMetrics()
    a.observe_request("/stats", 200, 0.001)
    assert ("raysearch_requests_total", (("route", "/stats"), ("status", "200"))) not in _samples(b)


def test_route_labels_are_bounded():
    assert route_label("/search") == "/search"
    assert route_label("/images/x/y") == IMAGES_ROUTE
    assert route_label("/static-offline-docs/swagger-ui.css") == "/static-offline-docs"
    assert route_label("/anything") == "other"


def _dashboard_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in doc["panels"] if p["type"] != "row" for t in p["targets"]]


def test_dashboard_panels_query_series_the_service_exports():
    m = ServiceMetrics(n_vectors=1, n_shards=1)
    m.observe_request("/search", 200, 0.01)
    m.observe_answer(1, "image", ["shard-00000"])
    m.errors.labels(status="500").inc()
    exported = {name for name, _ in _samples(m)}
    used = {n for e in _dashboard_exprs() for n in re.findall(r"\b(raysearch_[a-z_]+)", e)}
    assert used and used <= exported, f"dashboard queries series the service does not export: {used - exported}"
    # Every family of the service has a panel.
    families = {f.name for f in text_string_to_metric_families(m.exposition().decode())
                if not f.name.endswith("_created")}   # prometheus_client's creation timestamps
    assert all(any(name.startswith(f) for name in used) for f in families), (families, used)
    assert any("stage" in e for e in _dashboard_exprs()) and set(STAGES) >= {"embed", "search", "merge", "rerank"}


def test_dashboard_ray_serve_panels_use_series_ray_exports():
    # Ray's own Serve dashboard (shipped with Ray) names the series Ray exports.
    import ray.dashboard.modules.metrics.dashboards.serve_dashboard_panels as ray_panels

    ray_source = Path(ray_panels.__file__).read_text()
    used = {n for e in _dashboard_exprs() for n in re.findall(r"\b(ray_serve_[a-z_]+)", e)}
    assert used, "the dashboard has no Ray Serve panel"
    for name in used:
        assert name in ray_source, f"{name} is not a series of Ray's Serve dashboard"
