"""`raysearch train --init-projection whitening`: the closed-form fit, the network it starts, and the
stored fit (no Ray; the Ray path runs in tests/integration/test_train.py)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn as nn

from raysearch.train.config import TrainConfig
from raysearch.train.model import build_descriptor_net, export_torchscript, resolve_init, set_projection
from raysearch.train.views import ViewConfig
from raysearch.train.whitening import ProjectionInit, learned_whitening, view_features


def _views(rng: np.random.Generator, n: int, v: int, d: int, nuisance: float) -> np.ndarray:
    """n instances spread over every axis but the last; their views differ by noise that is large
    along one direction (what an edit moves) and small elsewhere."""
    centres = rng.normal(size=(n, 1, d))
    centres[..., -1] = 0.0
    direction = np.zeros(d)
    direction[-1] = 1.0
    noise = 0.05 * rng.normal(size=(n, v, d)) + nuisance * rng.normal(size=(n, v, 1)) * direction
    x = centres + noise
    return x / np.linalg.norm(x, axis=2, keepdims=True)


def test_whitening_equals_the_direct_computation_and_flattens_what_edits_move():
    rng = np.random.default_rng(0)
    views = _views(rng, 300, 4, 8, nuisance=2.0)
    weight, bias = learned_whitening(views, dim=5, shrinkage=0.0)
    assert weight.shape == (5, 8) and bias.shape == (5,)
    # The same steps written out: Cw^-1/2 of the view offsets, then PCA of all views in that space.
    offsets = (views - views.mean(axis=1, keepdims=True)).reshape(-1, 8)
    cw = offsets.T @ offsets / (300 * 3)
    w, u = np.linalg.eigh(cw)
    inv_sqrt = u @ np.diag((w + 1e-12) ** -0.5) @ u.T
    flat = views.reshape(-1, 8)
    y = (flat - flat.mean(axis=0)) @ inv_sqrt
    wb, ub = np.linalg.eigh(np.cov(y.T))
    expected = (inv_sqrt @ ub[:, np.argsort(wb)[::-1][:5]]).T
    # Axes are defined up to sign.
    signs = np.sign((weight * expected).sum(axis=1))
    np.testing.assert_allclose(weight, expected * signs[:, None], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(bias, -weight @ flat.mean(axis=0), rtol=1e-4, atol=1e-4)
    # In the whitened space the edits' variation is the same, and uncorrelated, in every kept direction.
    np.testing.assert_allclose(weight @ cw @ weight.T, np.eye(5), atol=1e-3)


def test_whitened_descriptors_find_the_views_the_raw_ones_miss():
    rng = np.random.default_rng(1)
    train = _views(rng, 400, 4, 16, nuisance=6.0)
    weight, bias = learned_whitening(train, dim=None, shrinkage=0.1)
    test = _views(np.random.default_rng(2), 200, 2, 16, nuisance=6.0)

    def recall_at_1(a: np.ndarray, b: np.ndarray) -> float:
        a = a / np.linalg.norm(a, axis=1, keepdims=True)
        b = b / np.linalg.norm(b, axis=1, keepdims=True)
        return float(((a @ b.T).argmax(axis=1) == np.arange(len(a))).mean())

    raw = recall_at_1(test[:, 0], test[:, 1])
    whitened = recall_at_1(test[:, 0] @ weight.T + bias, test[:, 1] @ weight.T + bias)
    assert raw < 0.5 and whitened > 0.95, (raw, whitened)


def test_whitening_settings_are_checked():
    with pytest.raises(ValueError, match="views >= 2"):
        learned_whitening(np.zeros((5, 1, 4)))
    with pytest.raises(ValueError, match="1 to 4 dimensions"):
        learned_whitening(np.random.default_rng(0).normal(size=(5, 2, 4)), dim=6)
    with pytest.raises(ValueError, match="--init-projection"):
        TrainConfig(projection_init="pca")
    with pytest.raises(ValueError, match="--whiten-images"):
        TrainConfig(projection_init="whitening", whiten_images=1)


@pytest.fixture(scope="module")
def tiny_init(tmp_path_factory) -> str:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU())
    path = str(tmp_path_factory.mktemp("init") / "tiny.pt")
    torch.jit.script(net).save(path)
    return path


def test_network_starts_from_the_fit_and_exports_it(tiny_init, photos):
    init = resolve_init(f"torchscript:{tiny_init}", None, 48)
    with pytest.raises(ValueError, match="at most the trunk's 16"):
        build_descriptor_net(init, 32, 3.0, "all", "whitening")
    base = build_descriptor_net(init, None, 3.0, "all").eval()
    pixels = np.empty(len(photos), dtype=object)  # one (h, w, 3) array per row, as the dataset yields
    for i, name in enumerate(photos):
        pixels[i] = photos[name]
    images = {"image_id": np.array(list(photos), dtype=object), "error": np.array([""] * len(photos), dtype=object),
              "pixels": pixels}
    feats = view_features([images], base, init.mean, init.std, ViewConfig(size=48), views=3, seed=0, max_images=100)
    assert feats.shape == (len(photos), 3, 16)
    np.testing.assert_allclose(np.linalg.norm(feats, axis=2), 1.0, rtol=1e-5)
    weight, bias = learned_whitening(feats, dim=8)

    net = build_descriptor_net(init, 8, 3.0, "all", "whitening")
    set_projection(net, weight, bias)
    net.eval()
    x = torch.randn(4, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        f = base(x).numpy()  # the unit descriptors the fit saw
        got = net(x).numpy()
    y = f @ weight.T + bias
    np.testing.assert_allclose(got, y / np.linalg.norm(y, axis=1, keepdims=True), rtol=1e-4, atol=1e-5)
    scripted = torch.jit.load(io.BytesIO(export_torchscript(net)))
    with torch.no_grad():
        torch.testing.assert_close(scripted(x).numpy(), got, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="does not fit"):
        set_projection(net, weight[:4], bias[:4])
    with pytest.raises(ValueError, match="no whitening projection"):
        set_projection(base, weight, bias)


def test_stored_fit_round_trips_exactly():
    rng = np.random.default_rng(0)
    fit = ProjectionInit(rng.normal(size=(4, 6)).astype(np.float32), rng.normal(size=4).astype(np.float32), 10, 4, 0.1, 1.5)
    back = ProjectionInit.from_bytes(fit.to_bytes())
    np.testing.assert_array_equal(back.weight, fit.weight)
    np.testing.assert_array_equal(back.bias, fit.bias)
    assert back.record() == fit.record() == {"method": "learned whitening from views", "images": 10, "views": 4,
                                             "shrinkage": 0.1, "dim": 4, "seconds": 1.5}


def test_run_started_before_the_setting_existed_resumes_only_with_its_default(tmp_path):
    import json

    from raysearch.train.run import _check_previous_run

    doc = json.loads(json.dumps({"source": "photos/", "settings": TrainConfig().learning_settings()}))
    older = json.loads(json.dumps(doc))
    del older["settings"]["projection_init"], older["settings"]["whiten_images"]
    (tmp_path / "run.json").write_text(json.dumps(older))
    assert _check_previous_run(str(tmp_path), doc, overwrite=False) is None  # same run: resume it
    whitened = json.loads(json.dumps({"source": "photos/",
                                      "settings": TrainConfig(projection_init="whitening").learning_settings()}))
    with pytest.raises(ValueError, match=r"other settings \(projection_init\)"):
        _check_previous_run(str(tmp_path), whitened, overwrite=False)
