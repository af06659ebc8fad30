"""`raysearch train`: views, the network and its TorchScript export, and training on Ray Train.

The Ray tests train a tiny randomly initialised CNN (a TorchScript file written by the test, used as
`--init torchscript:PATH`) on 32 small crops of the sample photographs, one of them a corrupt file,
with 2 Ray Train workers on the local 2-CPU Ray (half a CPU each).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from raysearch.models.embedder import Embedder
from raysearch.models.registry import build_model, resolve_model
from raysearch.models.spec import ModelConfig
from raysearch.train.config import TrainConfig, parse_duration
from raysearch.train.loop import id_digest, load_checkpoint_dir
from raysearch.train.model import build_descriptor_net, export_torchscript, resolve_init
from raysearch.train.views import ViewConfig, make_views, mix_views
from raysearch.train.whitening import PROJECTION_FILE, ProjectionInit

N_IMAGES = 32  # 31 photographs + 1 corrupt file: 16 rows per worker, 2 batches of 8
SIZE = 64
EPOCHS = 12
STEPS = EPOCHS * 2


@pytest.fixture(scope="module")
def train_images(tmp_path_factory, photos) -> str:
    from raysearch.samples import random_crop_box

    root = tmp_path_factory.mktemp("train-images")
    rng = np.random.default_rng(0)
    names = list(photos)
    for i in range(N_IMAGES - 1):
        arr = photos[names[i % len(names)]]
        left, top, right, bottom = random_crop_box(arr.shape[0], arr.shape[1], rng, 0.3, 0.6)
        Image.fromarray(arr[top:bottom, left:right]).resize((96, 96)).save(root / f"img{i:03d}.jpg", quality=90)
    (root / "broken.jpg").write_bytes(b"this is not a JPEG file")
    return str(root)


@pytest.fixture(scope="module")
def tiny_init(tmp_path_factory) -> str:
    """A tiny random CNN returning a (B, 32, h, w) feature map, as a TorchScript file."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(),  # (a BatchNorm here makes KoLeo's term fall slower)
    )
    path = str(tmp_path_factory.mktemp("init") / "tiny.pt")
    torch.jit.script(net).save(path)
    return path


def _tiny_config(init_path: str, **kw) -> TrainConfig:
    settings = dict(
        init=f"torchscript:{init_path}", input_size=SIZE, batch_size=8, workers=2, cpus_per_worker=0.5,
        train_blocks="all", seed=0, lr=3e-3, edits_per_view=(0, 0), crop_scale=(0.5, 1.0), epochs=EPOCHS,
    )
    settings.update(kw)
    return TrainConfig(**settings)


# -- views, network, config (no Ray) ---------------------------------------------------------------


def test_views_are_seeded_per_image_and_epoch(photos):
    images = [photos["astronaut"], photos["coffee"], photos["rocket"]]
    cfg = ViewConfig(size=48, n_views=3)
    a = make_views(images, ["a", "b", "c"], cfg, seed=1, epoch=0)
    b = make_views(images[::-1], ["c", "b", "a"], cfg, seed=1, epoch=0)
    assert a.pixels.shape == (9, 48, 48, 3) and a.pixels.dtype == np.uint8
    np.testing.assert_array_equal(a.pixels[0:3], b.pixels[6:9])  # image "a": same views in any position
    c = make_views(images, ["a", "b", "c"], cfg, seed=1, epoch=1)
    assert not np.array_equal(a.pixels, c.pixels)
    assert not np.array_equal(a.pixels[0], a.pixels[1])  # two views of one image differ
    assert a.instance.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_mixed_views_record_both_sources_and_their_share(photos):
    images = [photos[n] for n in ("astronaut", "coffee", "rocket", "chelsea")]
    cfg = ViewConfig(size=32, mixup_prob=0.5, cutmix_prob=0.5)
    views = make_views(images, list("abcd"), cfg, seed=0, epoch=0)
    pixels, membership = mix_views(views, 4, cfg, np.random.default_rng(0))
    np.testing.assert_allclose(membership.sum(axis=1), 1.0, rtol=1e-6)
    first = views.view == 0
    assert (membership[first].max(axis=1) < 1).all()  # every first view was mixed (probability 1)
    np.testing.assert_array_equal(membership[~first].max(axis=1), 1.0)  # second views stay clean
    np.testing.assert_array_equal(pixels[~first], views.pixels[~first])
    for r in np.flatnonzero(first):
        assert membership[r, views.instance[r]] > 0  # its own image and one partner
        assert np.count_nonzero(membership[r]) == 2
    # No mixing asked for: one-hot memberships, pixels untouched.
    plain = ViewConfig(size=32)
    p2, m2 = mix_views(views, 4, plain, np.random.default_rng(0))
    np.testing.assert_array_equal(m2.max(axis=1), 1.0)
    np.testing.assert_array_equal(p2, views.pixels)


def test_lite0_torchscript_export_computes_the_same_descriptors():
    net = build_descriptor_net(resolve_init("efficientnet_lite0_gem", None, None), dim=64, gem_p=3.0, train_blocks="3")
    assert len(net.trainable) == 3 and not any(p.requires_grad for p in net.frozen.parameters())
    net.train()
    assert not net.frozen.training and net.trainable.training  # frozen BatchNorm keeps its statistics
    scripted = torch.jit.load(io.BytesIO(export_torchscript(net)))
    net.eval()
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = net(x), scripted(x)
    assert got.shape == (2, 64)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(2))


def test_resnet_trunk_is_cut_into_stem_and_bottlenecks():
    from raysearch.models.backbones import build_resnet
    from raysearch.train.model import backbone_blocks

    blocks = backbone_blocks(build_resnet(50, None))
    assert len(blocks) == 1 + 3 + 4 + 6 + 3
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for block in blocks:
            x = block.eval()(x)
    assert x.shape == (1, 2048, 2, 2)


def test_settings_are_checked_with_the_option_named():
    with pytest.raises(ValueError, match="--objective"):
        TrainConfig(objective="simclr")
    with pytest.raises(ValueError, match="supcon needs --labels"):
        TrainConfig(objective="supcon")
    with pytest.raises(ValueError, match="--mixup applies to --objective copy"):
        TrainConfig(objective="triplet", mixup_prob=0.2)
    with pytest.raises(ValueError, match="--train-blocks"):
        TrainConfig(train_blocks="some")
    with pytest.raises(ValueError, match="--max-time"):
        parse_duration("twenty minutes")
    assert parse_duration("1h30m") == 5400.0 and parse_duration("20m") == 1200.0 and parse_duration("45") == 45.0
    with pytest.raises(ValueError, match="edits"):
        ViewConfig(edits=("nope",))


def test_missing_or_incomplete_model_directory_is_one_value_error(tmp_path):
    with pytest.raises(ValueError, match="no such model directory"):
        resolve_model(ModelConfig(name=str(tmp_path / "absent")))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "model-0.pt").write_bytes(b"partial")
    with pytest.raises(ValueError, match="no model.json"):
        resolve_model(ModelConfig(name=str(tmp_path / "half")))


# -- training on Ray Train -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(ray_local, train_images, tiny_init, tmp_path_factory):
    from raysearch.train import train

    out = str(tmp_path_factory.mktemp("models") / "tiny")
    started = time.monotonic()
    result = train(train_images, out, _tiny_config(tiny_init))
    print(f"trained in {time.monotonic() - started:.1f} s")
    return result


@pytest.mark.slow
def test_two_workers_read_disjoint_shards_that_cover_the_images(trained, train_images):
    from raysearch.sources import open_source

    ids = [i for b in open_source(train_images).iter_batches() for i in b.column("image_id").to_pylist()]
    assert len(ids) == N_IMAGES
    epochs = trained.model["training"]["epochs"]
    assert len(epochs) == EPOCHS
    for e in epochs:
        assert e["shard_rows"] == [N_IMAGES // 2, N_IMAGES // 2]
        # Digests of a partition add up to the digest of the whole: each image read exactly once.
        assert sum(e["shard_digests"]) % (1 << 62) == id_digest(ids)
        assert e["shard_digests"][0] != e["shard_digests"][1]
        assert e["errors"] == 1 and e["images"] == N_IMAGES - 1  # the corrupt file is skipped, counted
    assert trained.model["n_errors"] == 1


@pytest.mark.slow
def test_ddp_averages_gradients_so_replicas_stay_identical(trained):
    spreads = [e["replica_spread"] for e in trained.model["training"]["epochs"]]
    assert spreads == [0.0] * len(spreads)
    assert trained.model["training"]["steps"] == STEPS  # 2 steps per worker and epoch


@pytest.mark.slow
def test_loss_goes_down(trained):
    with open(os.path.join(trained.model_dir, "loss.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1))
    assert set(rows[0]) >= {"step", "epoch", "loss", "info_nce", "koleo", "lr"}
    loss = np.array([float(r["loss"]) for r in rows])
    # Quarters of the run, not single steps: one step's loss depends on which images met.
    first, last = loss[: STEPS // 4].mean(), loss[-(STEPS // 4):].mean()
    assert last < 0.75 * first, (first, last)


@pytest.mark.slow
def test_model_directory_is_complete_and_its_torchscript_matches_the_checkpoint(trained, tiny_init):
    out = trained.model_dir
    m = json.load(open(os.path.join(out, "model.json")))
    assert m["training"]["finished"] and m["dim"] == 32 and m["input_size"] == SIZE
    assert m["settings"]["lr"] == 3e-3 and m["objective"] == "copy" and m["n_images"] == N_IMAGES - 1
    script = os.path.join(out, m["torchscript"])
    assert hashlib.sha256(open(script, "rb").read()).hexdigest() == m["torchscript_sha256"]
    # The network rebuilt from the last checkpoint computes what the TorchScript file computes.
    state, progress = load_checkpoint_dir(os.path.join(out, m["checkpoint"]))
    assert progress.step == STEPS
    cfg = _tiny_config(tiny_init)
    net = build_descriptor_net(resolve_init(cfg.init, None, SIZE), cfg.dim, cfg.gem_p, "all")
    net.load_state_dict(state["model"])
    net.eval()
    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(script)(x), net(x), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_model_directory_resolves_like_a_registry_model_and_embeds(trained, photos):
    out = trained.model_dir
    spec = resolve_model(ModelConfig(name=out))
    m = trained.model
    assert spec.name == "trained:" + out and spec.dim == 32 and spec.input_size == SIZE
    assert spec.weights == os.path.join(out, m["torchscript"]) and spec.weights_sha256 == m["torchscript_sha256"]
    assert spec.pooling is None and spec.mean == tuple(m["mean"])
    pixels = np.stack([np.asarray(Image.fromarray(photos[n]).resize((SIZE, SIZE))) for n in ("astronaut", "coffee")])
    vectors = Embedder(spec.to_dict(), device="cpu").embed_pixels(pixels)
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(m["mean"]).view(1, 3, 1, 1)) / torch.tensor(m["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = torch.jit.load(spec.weights)(x).numpy()
    np.testing.assert_allclose(vectors, expected, rtol=1e-5, atol=1e-6)
    # A model file changed after the index recorded it is refused, not silently used.
    with open(spec.weights, "ab") as f:
        f.write(b"\0")
    try:
        with pytest.raises(ValueError, match="SHA-256"):
            build_model(spec)
        with pytest.raises(ValueError, match="modified or is incomplete"):
            resolve_model(ModelConfig(name=out))
    finally:
        with open(spec.weights, "r+b") as f:
            f.truncate(os.path.getsize(spec.weights) - 1)


@pytest.mark.slow
def test_rerun_of_a_finished_run_does_nothing_and_other_settings_are_refused(trained, train_images, tiny_init):
    from raysearch.train import train

    again = train(train_images, trained.model_dir, _tiny_config(tiny_init))
    assert not again.trained_now and again.model == trained.model
    with pytest.raises(ValueError, match="other settings.*lr"):
        train(train_images, trained.model_dir, _tiny_config(tiny_init, lr=1e-2))


@pytest.mark.slow
def test_labelled_objectives_train_on_labels_and_on_views(ray_local, train_images, tiny_init, tmp_path):
    from raysearch.train import train

    labels = tmp_path / "labels.csv"
    names = sorted(f[:-4] for f in os.listdir(train_images))
    # Five labels; one image left without a label is dropped and counted.
    labels.write_text("image_id,label\n" + "".join(f"{n},L{i % 5}\n" for i, n in enumerate(names) if i != 3))
    supcon = train(train_images, str(tmp_path / "supcon"),
                   _tiny_config(tiny_init, objective="supcon", labels=str(labels), workers=1, cpus_per_worker=1, epochs=1))
    m = supcon.model
    assert (m["n_labels"], m["n_unlabelled"], m["n_rows"]) == (5, 1, N_IMAGES - 1)
    assert m["effective"]["temperature"] == 0.1 and m["training"]["finished"]
    with open(os.path.join(supcon.model_dir, "loss.csv")) as f:
        assert next(csv.reader(f))[:4] == ["step", "epoch", "loss", "supcon"]
    # Without labels, triplet's positives are the views of each image. This run also starts its
    # projection from a whitening fitted on views (in a Ray task) before the first step.
    triplet = train(train_images, str(tmp_path / "triplet"),
                    _tiny_config(tiny_init, objective="triplet", workers=1, cpus_per_worker=1, epochs=1,
                                 projection_init="whitening", dim=16))
    m = triplet.model
    assert m["n_labels"] is None and m["effective"]["margin"] == 0.2
    assert np.isfinite(m["training"]["final_loss"])
    assert m["dim"] == 16 and m["projection_init"]["images"] == N_IMAGES - 1  # the corrupt file is skipped
    fit = ProjectionInit.from_bytes(open(os.path.join(triplet.model_dir, PROJECTION_FILE), "rb").read())
    state, _ = load_checkpoint_dir(os.path.join(triplet.model_dir, m["checkpoint"]))
    trained_weight = state["model"]["projection.1.weight"].numpy()
    # AdamW moves a weight by at most about 3.2 x lr a step (beta1 0.9, beta2 0.999): the workers
    # started from the fit, not from a random projection (which is further from it than that).
    bound = 3.2 * 3e-3 * m["training"]["steps"]
    assert np.abs(trained_weight - fit.weight).max() <= bound
    assert np.abs(fit.weight).max() > 10 * bound


# Ray's Python-level lines in a training job (its C++ core's lines are Ray's to tune).
RAY_TRAIN_NOISE = ("PlacementGroupCleaner", "Requesting resources", "worker group", "Reporting training result",
                   "SplitCoordinator", "Progress bars disabled", "exclude_resources", "Checkpoint successfully created",
                   "DistributedDataParallel")


def _cli(*args: str) -> list[str]:
    # The train command on the shared Typer app, without importing the other commands.
    return [sys.executable, "-c", "from raysearch.cli.common import app; import raysearch.cli.train; app()", "train", *args]


@pytest.mark.slow
def test_killed_run_resumes_from_its_last_checkpoint(ray_local, train_images, tiny_init, tmp_path):
    out = str(tmp_path / "killed")
    address = ray_local.get_runtime_context().gcs_address
    args = _cli(train_images, "--out", out, "--init", f"torchscript:{tiny_init}", "--input-size", str(SIZE),
                "--epochs", "6", "--batch-size", "8", "--workers", "2", "--cpus-per-worker", "0.5",
                "--train-blocks", "all", "--checkpoint-every", "1", "--address", address)
    snapshot = os.path.join(out, "run", "checkpoint_manager_snapshot.json")
    driver = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and driver.poll() is None:
            # Kill once the checkpoint of step 2 is being written: that of step 1 is registered.
            if os.path.exists(snapshot) and any(
                name >= "checkpoint_00000002" for name in os.listdir(os.path.dirname(snapshot)) if name.startswith("checkpoint_0")
            ):
                time.sleep(0.5)
                break
            time.sleep(0.2)
        assert driver.poll() is None, "the run finished before it could be killed"
    finally:
        driver.kill()
        driver.wait()
    assert not os.path.exists(os.path.join(out, "model.json"))
    done = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    said = done.stdout + done.stderr
    assert "trained on" in done.stdout and "finished" in done.stdout, said[-2000:]
    # Ray's own lines stay off the console, on a cluster without the dashboard too (whose absence
    # made Ray Train's placement-group cleaner warn once a second).
    assert not [line for line in said.splitlines() if any(n in line for n in RAY_TRAIN_NOISE)], said[-3000:]
    m = json.load(open(os.path.join(out, "model.json")))
    starts = m["training"]["starts"]
    # Continued, not restarted (a third start would be Ray Train recovering from a worker failure).
    assert len(starts) >= 2 and starts[0] == 0 and starts[1] >= 1 and starts == sorted(starts), starts
    assert m["training"]["steps"] == 6 * 2 and m["training"]["finished"]
    with open(os.path.join(out, "loss.csv")) as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(1, 13))


def test_cli_reports_bad_options_in_one_line(train_images, tmp_path):
    from typer.testing import CliRunner

    import raysearch.cli.train  # noqa: F401 - registers the command
    from raysearch.cli.common import app

    result = CliRunner().invoke(app, ["train", train_images, "--out", str(tmp_path / "m"), "--objective", "simclr"])
    assert result.exit_code == 2
    assert "--objective must be one of" in result.output


@pytest.mark.slow
def test_zero_epochs_exports_the_starting_network_with_its_fitted_projection(ray_local, train_images, tiny_init, tmp_path):
    from typer.testing import CliRunner

    import raysearch.cli.train  # noqa: F401 - registers the command
    from raysearch.cli.common import app

    with pytest.raises(ValueError, match="--epochs 0 leaves nothing to learn"):
        _tiny_config(tiny_init, epochs=0)
    out = str(tmp_path / "fit")
    result = CliRunner().invoke(app, [
        "train", train_images, "--out", out, "--init", f"torchscript:{tiny_init}", "--input-size", str(SIZE),
        "--train-blocks", "all", "--batch-size", "8", "--workers", "1", "--epochs", "0", "--init-projection", "whitening"])
    assert result.exit_code == 0, result.output
    assert f"fitted the whitened projection on 4 views of {N_IMAGES - 1} images" in result.output
    assert "no gradient step" in result.output
    m = json.load(open(os.path.join(out, "model.json")))
    assert m["training"]["finished"] and m["training"]["steps"] == 0 and m["checkpoint"] is None
    assert m["dim"] == 32 and m["projection_init"]["images"] == N_IMAGES - 1
    fit = ProjectionInit.from_bytes(open(os.path.join(out, PROJECTION_FILE), "rb").read())
    # The exported model is the starting network, its unit descriptors projected by the fit.
    base = build_descriptor_net(resolve_init(f"torchscript:{tiny_init}", None, SIZE), None, 3.0, "all").eval()
    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = base(x).numpy() @ fit.weight.T + fit.bias
        got = torch.jit.load(os.path.join(out, m["torchscript"]))(x).numpy()
    np.testing.assert_allclose(got, y / np.linalg.norm(y, axis=1, keepdims=True), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_model_directory_builds_searches_serves_and_activates(trained, photo_folder, ray_local, tmp_path):
    """`--model MODEL_DIR` end to end: the index records the trained model, search and the service
    embed their queries with its TorchScript file, and activation optimises images through it."""
    import httpx
    from ray import serve

    from raysearch.activate.optimize import ActivateConfig
    from raysearch.activate.pipeline import ActivatePipelineConfig, activate_source, read_report
    from raysearch.builder import build
    from raysearch.embed import EmbedConfig
    from raysearch.index.build import IndexConfig
    from raysearch.index.store import IndexStore
    from raysearch.models.embedder import preprocess_image
    from raysearch.search import Searcher
    from raysearch.serve.app import service_url, start_service
    from raysearch.serve.config import ServeConfig
    from tests.integration.test_serve import _free_port

    model_dir = trained.model_dir
    index = str(tmp_path / "index")
    build(photo_folder, index, EmbedConfig(model=ModelConfig(name=model_dir), progress=False),
          IndexConfig(factory="IVF2,PQ8x4"))
    spec = resolve_model(ModelConfig(name=model_dir))
    recorded = IndexStore(index).manifest["model"]
    assert recorded["name"] == "trained:" + model_dir and recorded["dim"] == 32
    assert recorded["weights_sha256"] == trained.model["torchscript_sha256"]

    # search: what the trained TorchScript computes for each query, searched as vectors.
    images = sorted(os.path.join(d, f) for d, _, files in os.walk(photo_folder) for f in files)
    queries = images[::10]
    pixels = np.stack([preprocess_image(open(p, "rb").read(), spec) for p in queries])
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)
    with torch.no_grad():
        xq = torch.jit.load(spec.weights)(x).numpy()
    searcher = Searcher(index)
    by_image, problems = searcher.search_images(queries, k=3)
    by_vector = searcher.search(xq, k=3)
    assert problems == [None] * len(queries)
    np.testing.assert_array_equal(by_image.ids, by_vector.ids)
    np.testing.assert_allclose(by_image.scores, by_vector.scores, atol=1e-4)
    _, uris = searcher.lookup(by_image)

    # serve: the service answers image queries as search does.
    config = ServeConfig(index, host="127.0.0.1", port=_free_port(), app_name="raysearch-train-test",
                         ingress_cpus=0.1, embedder_cpus=0.4, embedder_gpus=0, shard_cpus=0.1, access_log=False)
    start_service(config)
    try:
        files = [("images", (os.path.basename(p), open(p, "rb").read(), "image/jpeg")) for p in queries]
        answer = httpx.post(service_url(config) + "/search", files=files, data={"k": "3"}, timeout=120)
        assert answer.status_code == 200, answer.text
        for q, hits in enumerate(answer.json()["results"]):
            assert [h["uri"] for h in hits] == list(uris[q])
            np.testing.assert_allclose([h["score"] for h in hits], by_image.scores[q], atol=1e-4)
    finally:
        serve.shutdown()

    # activate: two indexed images optimised through the trained model come closer to their codes.
    listing = tmp_path / "activate.csv"
    chosen = images[:2]
    listing.write_text("path,id\n" + "".join(f"{p},{os.path.relpath(p, photo_folder)[:-4]}\n" for p in chosen))
    activated = str(tmp_path / "activated")
    summary = activate_source(index, str(listing), activated, ActivatePipelineConfig(
        activate=ActivateConfig(iterations=5), batch_size=2, chunk_rows=2, progress=False))
    assert (summary.n_images, summary.n_activated, summary.n_errors) == (2, 2, 0)
    for r in read_report(activated).to_pylist():
        assert r["dist_after"] < r["dist_before"]

