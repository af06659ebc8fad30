"""A collection to manage: remove, compact, add --replace, the Python API, and a live service that
honours DELETE /images/{id} and POST /reload. Real photographs, the index's own model, real HTTP."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import httpx
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from raysearch.cli import app
from raysearch.formats.embeddings import list_parts, part_sizes, read_vectors
from raysearch.index.build import IndexConfig, build_index
from raysearch.index.store import IndexStore
from raysearch.search import Searcher
from raysearch.serve.config import ServeConfig

pytestmark = pytest.mark.slow

API_KEY = "collection-key-9c1"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def _images(folder: str) -> list[str]:
    return sorted(os.path.join(d, f) for d, _, files in os.walk(folder) for f in files if f.endswith(".jpg"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _embeddings(folder: str) -> tuple[np.ndarray, list[str]]:
    """Every vector of an embeddings folder, with its image_id, in row order."""
    xs, names = [], []
    parts = list_parts(folder, "parts")
    dim = None
    for part, n in zip(parts, part_sizes(parts)):
        if dim is None:
            import pyarrow.parquet as pq

            dim = len(pq.read_table(part).column("embedding")[0].as_py())
        x, meta = read_vectors(part, 0, n, dim)
        xs.append(x)
        names += meta.column("image_id").to_pylist()
    return np.concatenate(xs), names


LABELS = ("red", "green", "blue", "red")   # image i gets LABELS[i % 4]: half red, a quarter each else


@pytest.fixture(scope="module")
def built(tmp_path_factory, photo_folder, ray_local):
    """The 40 photographs, listed in a CSV with metadata (label, n), embedded once and indexed
    three ways: one shard, two shards, two shards merged into one (inverted files, so the shards
    share a quantiser)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    import raysearch
    from raysearch.index.fields import attach_fields

    root = tmp_path_factory.mktemp("collection")
    images = _images(photo_folder)
    listing = str(root / "list.csv")
    pacsv.write_csv(pa.table({
        "path": images, "id": [os.path.relpath(p, photo_folder)[:-4] for p in images],
        "label": [LABELS[i % 4] for i in range(len(images))], "n": list(range(len(images))),
    }), listing)
    two = str(root / "two")
    raysearch.build(listing, two, factory="IVF2,Flat", nprobe=2, shards=2)
    emb = os.path.join(two, "embeddings")
    layouts = {"two": two}
    for name, shards, merge in (("one", 1, False), ("merged", 2, True)):
        layouts[name] = str(root / name)
        build_index(emb, layouts[name], IndexConfig(factory="IVF2,Flat", nprobe=2, shards=shards, merge=merge, train_on="cpu"))
        attach_fields(layouts[name], listing)
    x, names = _embeddings(emb)
    labels = {os.path.relpath(p, photo_folder)[:-4]: LABELS[i % 4] for i, p in enumerate(images)}
    return layouts, x, names, labels, listing


def _copy(src: str, tmp_path, name: str = "index") -> str:
    out = str(tmp_path / name)
    # The embeddings folder is not needed to search; symlinked to keep the copy small and quick.
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("embeddings"))
    os.symlink(os.path.join(src, "embeddings"), os.path.join(out, "embeddings"))
    return out


@pytest.mark.parametrize("layout", ["one", "two", "merged"])
def test_removed_images_never_come_back_and_compact_keeps_the_results(built, tmp_path, layout):
    layouts, x, names, _, _ = built
    out = _copy(layouts[layout], tmp_path)
    assert len(IndexStore(out).shards) == (2 if layout == "two" else 1)
    gone = names[:6]
    res = CliRunner().invoke(app, ["remove", out, *gone[:3]])
    assert res.exit_code == 0, res.output
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("# more\n" + "\n".join(gone[3:]) + "\n")
    res = CliRunner().invoke(app, ["remove", out, "--ids-file", str(ids_file)])
    assert res.exit_code == 0, res.output
    assert "6 removed vectors await" in res.output

    searcher = Searcher(out)
    result = searcher.search(x, 10)          # every image's own vector as a query
    image_ids, _ = searcher.lookup(result)
    assert not set(image_ids.ravel()) & set(gone)
    assert np.all(result.ids >= 0), "34 images remain: every query still gets 10"
    kept = [i for i, n in enumerate(names) if n not in gone]
    assert list(image_ids[kept, 0]) == [names[i] for i in kept]

    res = CliRunner().invoke(app, ["compact", out])
    assert res.exit_code == 0, res.output
    assert "dropped 6 vectors" in res.output
    store = IndexStore(out)
    assert store.ntotal == 34 and not store.removed_ids().size
    after = Searcher(out).search(x, 10)
    np.testing.assert_array_equal(after.ids, result.ids)
    np.testing.assert_allclose(after.scores, result.scores, atol=1e-6)


def _exact_subset(x: np.ndarray, names: list[str], keep: list[bool], xq: np.ndarray, k: int) -> list[list[str]]:
    """The exact top-k image_ids of queries `xq` among the images where `keep` is true."""
    subset = np.flatnonzero(keep)
    scores = xq @ x[subset].T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return [[names[subset[j]] for j in row] for row in order]


@pytest.mark.parametrize("layout", ["one", "two", "merged"])
def test_filtered_search_equals_an_exact_search_over_the_subset(built, tmp_path, layout):
    layouts, x, names, labels, _ = built
    out = _copy(layouts[layout], tmp_path)
    CliRunner().invoke(app, ["remove", out, names[0]])      # filters and tombstones together
    searcher = Searcher(out)
    for where, keep in (('label == "red"', [labels[n] == "red" for n in names]),
                        ('label in ["green", "blue"] and n >= 10', [labels[n] != "red" and i >= 10 for i, n in enumerate(names)])):
        keep[0] = False
        result = searcher.search(x, 5, where=where)
        image_ids, _ = searcher.lookup(result)
        assert [list(row) for row in image_ids] == _exact_subset(x, names, keep, x, 5)
        assert all(f["label"] == labels[i] for row, ids in zip(searcher.fields_of(result, ["label"]), image_ids)
                   for f, i in zip(row, ids))


def test_cli_search_where_and_fields(built, photo_folder, tmp_path):
    layouts, _, names, labels, _ = built
    query = _images(photo_folder)[1]        # a green image
    res = CliRunner().invoke(app, ["search", layouts["two"], query, "-k", "4", "--where", 'label == "red"',
                                   "--fields", "label,n", "--format", "json"])
    assert res.exit_code == 0, res.output
    hits = json.loads(res.output)[0]["results"]
    assert len(hits) == 4 and all(h["fields"]["label"] == "red" == labels[h["id"]] for h in hits)
    res = CliRunner().invoke(app, ["search", layouts["two"], query, "--where", "colour == 'red'"])
    assert res.exit_code == 2 and "no metadata column 'colour'" in res.output
    res = CliRunner().invoke(app, ["search", layouts["two"], query, "--where", "label.upper() == 'RED'"])
    assert res.exit_code == 2 and "compare a column with a literal" in res.output
    res = CliRunner().invoke(app, ["search", layouts["two"], query, "--where", "open('/etc/passwd')"])
    assert res.exit_code == 2 and "is not allowed" in res.output


def test_unknown_id_exits_2_naming_it_and_writes_nothing(built, tmp_path):
    layouts, _, names, _, _ = built
    out = _copy(layouts["one"], tmp_path)
    before = open(os.path.join(out, "manifest.json")).read()
    res = CliRunner().invoke(app, ["remove", out, names[0], "no/such-image"])
    assert res.exit_code == 2
    assert "'no/such-image'" in res.output and "nothing was removed" in res.output
    assert open(os.path.join(out, "manifest.json")).read() == before


def _replace_folders(photo_folder: str, tmp_path) -> tuple[str, str, str, str]:
    """`first`: 8 photographs; `second`: the same names, where a/img000 now holds another picture."""
    images = _images(photo_folder)[:8]
    first, second = tmp_path / "first", tmp_path / "second"
    for path in images:
        rel = os.path.relpath(path, photo_folder)
        for target in (first, second):
            (target / os.path.dirname(rel)).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target / rel)
    changed = os.path.relpath(images[0], photo_folder)
    # A picture the index does not hold: a mirrored, recoloured crop of another photograph.
    other = np.asarray(Image.open(_images(photo_folder)[-1]).convert("RGB"))[::-1, ::-1, ::-1]
    Image.fromarray(np.ascontiguousarray(other)).save(second / changed, quality=92)
    return str(first), str(second), changed[:-4], images[0]


def test_add_replace_embeds_known_images_again(photo_folder, tmp_path, ray_local):
    import raysearch

    first, second, changed, old_image = _replace_folders(photo_folder, tmp_path)
    out = str(tmp_path / "index")
    col = raysearch.build(first, out, factory="Flat")
    new_image = os.path.join(second, changed + ".jpg")
    assert col.search(new_image, k=1)[0][0].score < 0.99          # not in the index yet

    res = CliRunner().invoke(app, ["add", out, second, "--replace", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "replaced 8 of 8 images" in res.output
    col = raysearch.open_index(out)
    assert col.info["n_vectors"] == 8 and col.info["n_removed"] == 0   # the old vectors were compacted
    top = col.search(new_image, k=3)[0]
    assert top[0].id == changed and top[0].score > 0.999
    old = col.search(old_image, k=8)[0]
    assert not [h for h in old if h.id == changed and h.score > 0.99], old
    # Without --replace the same images are skipped.
    res = CliRunner().invoke(app, ["add", out, second, "--no-progress"])
    assert "nothing to add" in res.output


def _readme_python_example() -> str:
    """The code block under the README's "### Python API" heading."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("### Python API\n"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_python_api_example(photo_folder, tmp_path, ray_local, monkeypatch, capsys):
    """The README's Python example runs as printed, in a folder holding what it names: photos/,
    query.jpg and other.jpg (two of the photos), new-photos/ (one new image, one re-edited)."""
    images = _images(photo_folder)
    os.makedirs(tmp_path / "photos")
    for p in images[:12]:
        shutil.copy(p, tmp_path / "photos" / os.path.basename(p))
    shutil.copy(images[0], tmp_path / "query.jpg")
    shutil.copy(images[1], tmp_path / "other.jpg")
    os.makedirs(tmp_path / "new-photos")
    shutil.copy(images[12], tmp_path / "new-photos" / os.path.basename(images[12]))
    # A known id with new pixels: --replace must swap its vector for the new image's.
    Image.open(images[13]).save(tmp_path / "new-photos" / os.path.basename(images[2]))
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(_readme_python_example(), "README.md", "exec"), scope)
    hits, col = scope["hits"], scope["col"]

    first, second = (os.path.basename(q)[:-4] for q in images[:2])
    assert hits[0][0].id == first and hits[0][0].score > 0.999
    assert hits[1][0].id == second
    assert len(hits) == 2 and all(len(h) == 3 for h in hits)
    assert f"{first} " in capsys.readouterr().out      # the print of the first hit
    # 12 built, the first removed and compacted away, one new image added, one replaced.
    info = col.info
    assert info["n_removed"] == 0 and info["n_vectors"] == 12
    reopened = scope["raysearch"].open_index("photos-index")
    assert first not in [h.id for h in reopened.search(["query.jpg"], k=3)[0]]
    replaced = os.path.basename(images[2])[:-4]
    top = reopened.search([str(tmp_path / "new-photos" / os.path.basename(images[2]))], k=1)[0][0]
    assert top.id == replaced and top.score > 0.999
    # Bytes, arrays and vectors are queries too.
    data = open(images[1], "rb").read()
    as_array = np.asarray(Image.open(images[1]).convert("RGB"))
    vector = reopened.searcher().embed_image_bytes([data])
    for q in (data, as_array, vector):
        assert reopened.search(q, k=1)[0][0].id == second


@pytest.fixture()
def served(built, tmp_path, ray_local):
    """The two-shard index (a copy) served twice on one Serve: one searcher deployment per shard,
    and with the shards searched in the ingress (route /local). Watching the manifest is left to
    POST /reload and DELETE here (reload_check_s 0 would need a ServeConfig field; the default
    check every 2 s only makes reloads sooner)."""
    from ray import serve

    from raysearch.serve.app import service_url, start_service

    layouts, x, names, labels, _ = built
    out = _copy(layouts["two"], tmp_path)
    port = _free_port()
    common = dict(host="127.0.0.1", port=port, api_key=API_KEY, ingress_cpus=0.1, embedder_cpus=0.2,
                  embedder_gpus=0, shard_cpus=0.1, access_log=False, shard_timeout_s=10.0)
    fanned = ServeConfig(out, app_name="collection-fanned", **common)
    local = ServeConfig(out, app_name="collection-local", route_prefix="/local", shards_in_ingress=True, **common)
    start_service(fanned)
    start_service(local)
    try:
        yield out, service_url(fanned), service_url(local), x, names, labels
    finally:
        serve.shutdown()   # the next test module starts Serve with its own HTTP options


def _top(client: httpx.Client, x: np.ndarray, k: int) -> list[list[str]]:
    doc = client.post("/search", json={"vector": x.tolist(), "k": k})
    assert doc.status_code == 200, doc.text
    assert doc.json()["partial"] is False
    return [[h["id"] for h in row] for row in doc.json()["results"]]


def test_served_index_honours_delete_and_reload(served, tmp_path, photo_folder):
    out, url, local_url, x, names, labels = served
    with httpx.Client(base_url=url, headers=AUTH, timeout=60) as fanned, \
            httpx.Client(base_url=local_url, headers=AUTH, timeout=60) as local:
        assert _top(fanned, x[:3], 1) == [[n] for n in names[:3]]
        # Metadata filters and fields, in JSON and multipart requests, on both paths.
        for client in (fanned, local):
            doc = client.post("/search", json={"vector": x[:3].tolist(), "k": 4, "where": 'label == "blue"',
                                               "fields": ["label", "n"]}).json()
            for row in doc["results"]:
                assert len(row) == 4 and all(h["fields"]["label"] == "blue" == labels[h["id"]] for h in row)
            bad = client.post("/search", json={"vector": x[0].tolist(), "where": "colour == 1"})
            assert bad.status_code == 422 and "colour" in bad.json()["error"]
            bad = client.post("/search", json={"vector": x[0].tolist(), "where": "__import__('os')"})
            assert bad.status_code == 422
        path = _images(photo_folder)[5]
        doc = fanned.post("/search", files={"image": ("q.jpg", open(path, "rb").read())},
                          data={"k": "3", "where": "n < 5", "fields": "n"}).json()
        assert [h["fields"]["n"] < 5 for h in doc["results"]] == [True] * 3
        # DELETE needs the key, like every data route.
        refused = httpx.delete(f"{url}/images/{names[0]}", timeout=30)
        assert refused.status_code == 401
        assert fanned.delete("/images/no/such-image").status_code == 404
        doc = fanned.delete(f"/images/{names[0]}")
        assert doc.status_code == 200, doc.text
        assert doc.json()["n_removed"] == 1 and doc.json()["reloaded"] is True
        rows = _top(fanned, x[:3], 10)
        assert names[0] not in sum(rows, []) and all(len(r) == 10 for r in rows)
        assert rows[1][0] == names[1]
        assert fanned.get(f"/images/{names[0]}").status_code == 404     # no thumbnail of a removed image
        assert fanned.get("/stats").json()["count"] == 39
        # The other application learns of the change on POST /reload.
        assert httpx.post(f"{local_url}/reload", timeout=30).status_code == 401
        assert local.post("/reload").json()["reloaded"] is True
        assert names[0] not in sum(_top(local, x[:3], 10), [])

        # Changes made on disk (the CLI, another process) are picked up by POST /reload too.
        res = CliRunner().invoke(app, ["remove", out, names[1]])
        assert res.exit_code == 0, res.output
        for client in (fanned, local):
            state = client.post("/reload").json()
            assert state["n_removed"] == 2, state
            rows = _top(client, x[:3], 10)
            assert not {names[0], names[1]} & set(sum(rows, []))
            assert rows[2][0] == names[2]
        res = CliRunner().invoke(app, ["compact", out])
        assert res.exit_code == 0, res.output
        for client in (fanned, local):
            assert client.post("/reload").json() | {"version": None} == {
                "reloaded": True, "version": None, "count": 38, "n_removed": 0}
            assert _top(client, x[2:4], 1) == [[names[2]], [names[3]]]
        assert json.load(open(os.path.join(out, "manifest.json")))["n_vectors"] == 38

        # `raysearch add` makes a third shard: the two searcher deployments deal it out between them.
        new = tmp_path / "new"
        new.mkdir()
        for i, path in enumerate(_images(photo_folder)[:2]):
            flipped = np.asarray(Image.open(path).convert("RGB"))[:, ::-1]
            Image.fromarray(np.ascontiguousarray(flipped)).save(new / f"flipped-{i}.jpg", quality=92)
        # Run as a user would, from another process (its own Ray): the services hold most of the
        # test Ray's two CPUs.
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        done = subprocess.run([sys.executable, "-m", "raysearch", "add", out, str(new), "--no-progress",
                               "--concurrency", "1"], env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout + done.stderr
        assert len(IndexStore(out).shards) == 3
        for client in (fanned, local):
            assert client.post("/reload").json()["count"] == 40
            doc = client.post("/search", files={"image": ("q.jpg", (new / "flipped-1.jpg").read_bytes())},
                              data={"k": "2"}).json()
            assert doc["results"][0]["id"] == "flipped-1" and doc["results"][0]["score"] > 0.999, doc
            assert fanned.get("/images/flipped-1").status_code == 200
