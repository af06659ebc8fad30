"""The service's pages and metrics over real HTTP on 127.0.0.1 (Ray Serve, a two-shard index, an
API key): the search page and /docs in headless Chromium with the network blocked, thumbnails at
/images/{image_id}, and /metrics read with prometheus_client's parser."""

from __future__ import annotations

import io
import os
import re
import shutil
import socket

import httpx
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from raysearch.index.build import IndexConfig
from raysearch.pages.browser import chromium_path, run_chromium
from raysearch.serve.config import ServeConfig

pytestmark = pytest.mark.slow

API_KEY = "pages-key-81c3"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
N_IMAGES = 40
SCREENSHOTS_ENV = "RAYSEARCH_SCREENSHOTS"   # a folder: the tests copy their screenshots there (docs/)

needs_chromium = pytest.mark.skipif(chromium_path() is None, reason="no Chromium (apt-get install chromium)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _body(dom: str) -> dict[str, str]:
    """The data-* attributes of the page's <body> after its scripts ran."""
    tag = re.search(r"<body([^>]*)>", dom)
    assert tag, dom[:500]
    return dict(re.findall(r'data-([a-z-]+)="([^"]*)"', tag.group(1)))


def _keep_screenshot(path: str, name: str) -> None:
    folder = os.environ.get(SCREENSHOTS_ENV)
    if folder:
        shutil.copy(path, os.path.join(folder, name))


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, build_photo_index) -> str:
    out = str(tmp_path_factory.mktemp("serve-pages") / "index")
    build_photo_index(out, IndexConfig(shards=2))
    return out


@pytest.fixture(scope="module")
def url(index_dir, ray_local):
    from ray import serve

    from raysearch.serve.app import service_url, start_service

    config = ServeConfig(
        index_dir, host="127.0.0.1", port=_free_port(), app_name="raysearch-pages", api_key=API_KEY,
        ingress_cpus=0.1, embedder_cpus=0.4, embedder_gpus=0, shard_cpus=0.1, access_log=False,
    )
    start_service(config)
    try:
        yield service_url(config)
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def http(url):
    with httpx.Client(base_url=url, timeout=60) as client:
        yield client


def _metrics(http: httpx.Client) -> dict[tuple[str, tuple], float]:
    res = http.get("/metrics", headers=AUTH)
    assert res.status_code == 200 and res.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(res.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _count(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_images_serves_indexed_thumbnails_only_and_with_the_key(http, photo_folder):
    res = http.get("/images/a/img000", headers=AUTH, params={"size": 96})
    assert res.status_code == 200 and res.headers["content-type"] == "image/jpeg"
    thumb = Image.open(io.BytesIO(res.content))
    original = Image.open(os.path.join(photo_folder, "a", "img000.jpg"))
    assert max(thumb.size) == 96 and abs(thumb.size[0] / thumb.size[1] - original.size[0] / original.size[1]) < 0.05
    assert "private" in res.headers["cache-control"]

    assert http.get("/images/a/img000").status_code == 401                       # no key
    assert http.get("/images/a/img000", headers={"Authorization": "Bearer wrong"}).status_code == 401
    unknown = http.get("/images/a/no-such-image", headers=AUTH)
    assert unknown.status_code == 404 and "not in the index" in unknown.json()["error"]
    # A path is an id like any other: never read unless the index lists it.
    assert http.get("/images/..%2F..%2Fetc%2Fpasswd", headers=AUTH).status_code == 404
    assert http.get(f"/images/{photo_folder.lstrip('/')}/a/img000.jpg", headers=AUTH).status_code == 404
    assert http.get("/images/a/img000", headers=AUTH, params={"size": 5000}).status_code == 422


def test_metrics_count_the_requests_made(http, photo_folder):
    before = _metrics(http)
    with open(os.path.join(photo_folder, "b", "img001.jpg"), "rb") as f:
        image = f.read()
    for _ in range(3):
        assert http.post("/search", files={"image": ("q.jpg", image)}, data={"k": "5"}, headers=AUTH).status_code == 200
    assert http.post("/search", files={"image": ("q.jpg", image)}).status_code == 401
    assert http.get("/images/nope", headers=AUTH).status_code == 404
    assert http.get("/metrics").status_code == 401                               # metrics need the key too
    after = _metrics(http)

    def delta(name: str, **labels: str) -> float:
        return _count(after, name, **labels) - _count(before, name, **labels)

    assert delta("raysearch_requests_total", route="/search", status="200") == 3
    assert delta("raysearch_requests_total", route="/search", status="401") == 1
    assert delta("raysearch_requests_total", route="/images/{image_id}", status="404") == 1
    assert delta("raysearch_requests_total", route="/metrics", status="401") == 1
    assert delta("raysearch_errors_total", status="401") == 2
    assert delta("raysearch_request_duration_seconds_count", route="/search") == 4
    for stage in ("embed", "search", "merge"):
        assert delta("raysearch_stage_duration_seconds_count", stage=stage) == 3, stage
    assert delta("raysearch_queries_total", kind="image") == 3
    assert delta("raysearch_partial_answers_total") == 0
    assert _count(after, "raysearch_index_vectors") == N_IMAGES and _count(after, "raysearch_index_shards") == 2


def test_openapi_declares_the_bearer_scheme_on_the_keyed_routes(http):
    doc = http.get("/openapi.json").json()               # open: the description holds no data
    assert doc["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http", "scheme": "bearer", "description": doc["components"]["securitySchemes"]["bearerAuth"]["description"]}
    for path, method in (("/search", "post"), ("/stats", "get"), ("/images/{image_id}", "get"), ("/metrics", "get")):
        assert doc["paths"][path][method]["security"] == [{"bearerAuth": []}], path
    assert "security" not in doc["paths"]["/healthz"]["get"]
    html = http.get("/docs").text
    assert "static-offline-docs/swagger-ui-bundle.js" in html and "cdn" not in html.lower()


@needs_chromium
def test_docs_render_offline_with_the_authorize_button(url, tmp_path):
    shot = str(tmp_path / "docs.png")
    run_chromium(f"{url}/docs", screenshot=shot, window=(1200, 900), offline=True, budget_ms=8000)
    dom = run_chromium(f"{url}/docs", dump_dom=True, offline=True, budget_ms=8000)
    assert 'class="swagger-ui"' in dom
    assert dom.count('class="opblock ') >= 5 or dom.count("opblock-summary-path") >= 5, "Swagger UI listed no operations"
    assert "authorize" in dom.lower() and "/images/{image_id}" in dom
    _keep_screenshot(shot, "serve-docs.png")


@needs_chromium
def test_search_page_shows_the_top_k_as_loaded_thumbnails(url, tmp_path):
    # #like=ID searches with an indexed image (as a click on a result does); #key= hands the page
    # the key, as a user types it into its field.
    dom = run_chromium(f"{url}/#key={API_KEY}&like=a/img002", dump_dom=True, offline=True, budget_ms=15000)
    body = _body(dom)
    assert "error" not in body, body
    assert body.get("results") == "10", body
    assert dom.count('class="card hit"') == 10
    # The query and every result thumbnail arrived (fetched with the key) and decoded.
    assert body["images"] == body["images-loaded"] == "11", body
    assert 'data-id="a/img002"' in dom                  # an image is its own nearest neighbour
    shot = str(tmp_path / "search.png")
    run_chromium(f"{url}/#key={API_KEY}&like=a/img002", screenshot=shot, window=(1280, 900), offline=True, budget_ms=15000)
    assert os.path.getsize(shot) > 10_000
    _keep_screenshot(shot, "serve-search.png")


@needs_chromium
def test_search_page_without_the_key_says_it_was_refused(url):
    dom = run_chromium(f"{url}/#like=a/img002", dump_dom=True, offline=True, budget_ms=8000)
    body = _body(dom)
    assert "401" in body.get("error", ""), body
    assert 'class="card hit"' not in dom
