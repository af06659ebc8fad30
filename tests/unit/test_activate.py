"""Activation: JND heatmaps, the PSNR floor, features pulled toward the index's quantisation."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch

from raysearch.activate.jnd import contrast_masking, jnd_heatmap, luminance, luminance_adaptation
from raysearch.activate.optimize import (
    ActivateConfig,
    TorchTransform,
    activate_batch,
    check_quantising,
    differentiable_resize,
    pixel_groups,
    psnr,
    quantised_targets,
)
from raysearch.index.transforms import split_pretransform


def test_jnd_is_positive_and_larger_on_texture_than_on_flat_regions():
    rng = np.random.default_rng(0)
    img = np.full((64, 128, 3), 0.5, np.float32)
    img[:, 64:] = np.clip(0.5 + rng.uniform(-0.3, 0.3, size=(64, 64, 1)), 0, 1)  # textured right half
    heat = jnd_heatmap(torch.from_numpy(img).permute(2, 0, 1)[None])[0, 0].numpy()
    assert heat.shape == (64, 128) and (heat > 0).all()
    flat, textured = heat[8:-8, 8:56], heat[8:-8, 72:-8]
    assert textured.mean() > 2 * flat.mean()
    assert flat.max() < 0.05  # a few grey levels on a flat mid-grey area


def test_luminance_adaptation_tolerates_more_in_dark_and_bright_areas():
    levels = torch.tensor([0.0, 64.0, 127.0, 200.0, 255.0]).view(1, 1, 1, 5).expand(1, 1, 8, 5).contiguous()
    la = luminance_adaptation(levels.repeat_interleave(8, dim=3))[0, 0, 4, 4::8]  # band centres
    assert la[0] > la[1] > la[2] and la[4] > la[3] > la[2]
    assert contrast_masking(torch.full((1, 1, 8, 8), 100.0)).abs().max() < 1e-3


def test_luminance_weights():
    x = torch.ones(1, 3, 2, 2)
    assert torch.allclose(luminance(x), torch.full((1, 1, 2, 2), 255.0), atol=1e-3)


@pytest.mark.parametrize("policy", ["squash", "crop", "pad"])
def test_differentiable_resize_matches_the_model_size_and_passes_gradients(policy):
    x = torch.rand(1, 3, 50, 80, requires_grad=True)
    out = differentiable_resize(x, 32, policy)
    assert out.shape == (1, 3, 32, 32)
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def _trained_ivfpq(d: int = 32, n: int = 4000, seed: int = 0) -> tuple[faiss.Index, np.ndarray]:
    rng = np.random.default_rng(seed)
    xt = rng.normal(size=(n, d)).astype(np.float32)
    xt /= np.linalg.norm(xt, axis=1, keepdims=True)
    index = faiss.index_factory(d, "IVF8,PQ4x4", faiss.METRIC_L2)
    index.train(xt)
    return index, xt


def test_targets_are_the_indexed_codes_reconstruction_and_the_centroid():
    index, xt = _trained_ivfpq()
    x = xt[:5]
    index.add(x)
    ivf = faiss.extract_index_ivf(index)
    ivf.make_direct_map()
    np.testing.assert_allclose(quantised_targets(index, x, "pq"), index.reconstruct_n(0, 5), atol=1e-5)
    _, assign = ivf.quantizer.search(x, 1)
    np.testing.assert_allclose(quantised_targets(index, x, "ivf"), ivf.quantizer.reconstruct_batch(assign.ravel()), atol=1e-6)


def test_flat_indexes_cannot_be_activated():
    with pytest.raises(ValueError, match="stores vectors exactly"):
        check_quantising(faiss.IndexFlatL2(8), "pq")
    with pytest.raises(ValueError, match="try --target ivf"):
        check_quantising(faiss.index_factory(8, "IVF2,Flat"), "pq")


def test_torch_transform_matches_the_index_pretransform():
    rng = np.random.default_rng(1)
    xt = rng.normal(size=(2000, 16)).astype(np.float32)
    index = faiss.index_factory(16, "PCAW8,L2norm,IVF4,PQ4x4", faiss.METRIC_L2)
    index.train(xt)
    parts = split_pretransform(index)
    chain, inner = parts.transforms, parts.quantiser
    expected = xt[:7]
    for vt in chain:
        expected = vt.apply(expected)
    got = TorchTransform(chain)(torch.from_numpy(xt[:7])).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)


class _TinyNet(torch.nn.Module):
    """A small random CNN with GeM-like pooling: enough to have gradients w.r.t. pixels."""

    def __init__(self, dim: int = 32):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = torch.nn.Conv2d(3, 16, 5, stride=2)
        self.conv2 = torch.nn.Conv2d(16, dim, 3, stride=2)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return torch.nn.functional.normalize(x.clamp(min=1e-6).pow(3).mean(dim=(2, 3)).pow(1 / 3), dim=-1)


@pytest.fixture(scope="module")
def tiny_setup(photos):
    from raysearch.images import resize_image

    net = _TinyNet().eval()
    rng = np.random.default_rng(0)
    names = list(photos)
    images = []
    for i in range(6):
        arr = photos[names[i]]
        images.append(np.ascontiguousarray(arr[: min(arr.shape[0], 160), : min(arr.shape[1], 200)]))
    crops = []
    for _ in range(600):
        arr = photos[names[rng.integers(len(names))]]
        t, l = rng.integers(0, arr.shape[0] - 64), rng.integers(0, arr.shape[1] - 64)
        crops.append(resize_image(np.ascontiguousarray(arr[t : t + 64, l : l + 64]), 64, "squash"))
    with torch.no_grad():
        xt = net(torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 255).numpy()
        x = net(torch.cat([differentiable_resize(torch.from_numpy(im).permute(2, 0, 1)[None].float() / 255, 64, "squash")
                           for im in images])).numpy()
    index = faiss.index_factory(32, "IVF4,PQ4x4", faiss.METRIC_L2)
    index.train(xt)
    return net, images, quantised_targets(index, x, "pq"), x


def test_activation_moves_features_toward_the_target(tiny_setup):
    net, images, targets, x = tiny_setup
    before = np.sum(x / np.linalg.norm(x, axis=1, keepdims=True) * targets / np.linalg.norm(targets, axis=1, keepdims=True), axis=1)
    out = activate_batch(images, targets, net, 64, "squash", ActivateConfig(iterations=10, lr=0.5))
    assert len(out) == len(images)
    for r, im, b in zip(out, images, before):
        assert r.pixels.shape == im.shape and r.pixels.dtype == np.uint8
        assert r.cos_after > r.cos_before
        assert r.cos_before == pytest.approx(b, abs=1e-4)
        assert r.linf > 0 and r.psnr < 80


def test_psnr_floor_is_met_by_every_image(tiny_setup):
    net, images, targets, _ = tiny_setup
    strong = ActivateConfig(iterations=5, lr=1.0, lambda_i=0.0, scaling=30.0)
    unconstrained = activate_batch(images, targets, net, 64, "squash", strong)
    assert min(r.psnr for r in unconstrained) < 38
    floored = activate_batch(images, targets, net, 64, "squash", ActivateConfig(**{**strong.__dict__, "psnr": 42.0}))
    for r, im, free in zip(floored, images, unconstrained):
        assert psnr(r.pixels, im) >= 42.0 and r.psnr >= 42.0
        # Perturbations over the floor were scaled down; an image whose best iterate was the
        # original itself keeps scale 1 and is unchanged.
        assert (0 < r.scale < 1) if free.psnr < 42.0 else r.scale == 1.0
    assert sum(0 < r.scale < 1 for r in floored) >= 1


def test_each_image_keeps_its_best_iterate(tiny_setup):
    net, images, targets, x = tiny_setup
    for lr in (0.05, 1.0):
        for r in activate_batch(images, targets, net, 64, "squash", ActivateConfig(iterations=6, lr=lr, lambda_i=0.0)):
            # Never worse than the original (up to 8-bit rounding of the saved pixels).
            assert r.cos_after >= r.cos_before - 2e-3
    # Images whose feature already is the target: every step can only move away from it, so the
    # best iterate is the (almost) unperturbed image.
    for r, im in zip(activate_batch(images, x, net, 64, "squash", ActivateConfig(iterations=6, lr=1.0, lambda_i=0.0)), images):
        assert r.cos_after > 0.999 and r.linf <= 1


def _own_probability(f: np.ndarray, own: np.ndarray, competitors: np.ndarray, tau: float) -> np.ndarray:
    """softmax(-d / tau)[own] over [own, competitors], d = squared L2, f normalised: (n,)."""
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    cands = np.concatenate([own[:, None], competitors], axis=1)
    logits = -((f[:, None] - cands) ** 2).sum(-1) / tau
    logits -= logits.max(axis=1, keepdims=True)
    return np.exp(logits[:, 0]) / np.exp(logits).sum(axis=1)


def test_rank_loss_makes_the_own_code_outscore_its_competitors(tiny_setup):
    net, images, targets, x = tiny_setup
    # Competitors: reconstructions of the 5 database vectors nearest to each image's feature.
    rng = np.random.default_rng(3)
    db = rng.normal(size=(700, x.shape[1])).astype(np.float32) * 0.3 + x[rng.integers(len(x), size=700)]
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    index = faiss.index_factory(x.shape[1], "IVF4,PQ4x4", faiss.METRIC_L2)
    index.train(np.concatenate([db, x]))
    recon = quantised_targets(index, db, "pq")
    nearest = np.argsort(((x[:, None] - recon[None]) ** 2).sum(-1), axis=1)[:, :5]
    own = quantised_targets(index, x, "pq")
    competitors = recon[nearest]
    config = ActivateConfig(iterations=10, lr=0.5, loss="rank", competitors=5, tau=0.05)
    out = activate_batch(images, own, net, 64, "squash", config, competitors=competitors)

    def feats(ims):
        with torch.no_grad():
            return net(torch.cat([differentiable_resize(torch.from_numpy(im).permute(2, 0, 1)[None].float() / 255, 64, "squash")
                                  for im in ims])).numpy()

    before = _own_probability(feats(images), own, competitors, 0.05)
    after = _own_probability(feats([r.pixels for r in out]), own, competitors, 0.05)
    assert np.all(after >= before - 1e-3) and np.mean(after - before) > 0.01
    for r in out:  # cosine to the own target is still reported
        assert -1.0 <= r.cos_before <= 1.0 and -1.0 <= r.cos_after <= 1.0 and r.linf > 0


def test_rank_loss_needs_competitors(tiny_setup):
    net, images, targets, _ = tiny_setup
    rank = ActivateConfig(iterations=1, loss="rank", competitors=3)
    with pytest.raises(ValueError, match="needs competitors"):
        activate_batch(images, targets, net, 64, "squash", rank)
    with pytest.raises(ValueError, match="competitors must be"):
        activate_batch(images, targets, net, 64, "squash", rank, competitors=np.zeros((len(images), 3, 7), np.float32))
    # The cosine loss ignores them.
    out = activate_batch(images[:1], targets[:1], net, 64, "squash", ActivateConfig(iterations=1),
                         competitors=np.zeros((1, 3, targets.shape[1]), np.float32))
    assert len(out) == 1


def test_config_checks():
    with pytest.raises(ValueError, match="--target"):
        ActivateConfig(target="centroid")
    with pytest.raises(ValueError, match="--psnr"):
        ActivateConfig(psnr=5)
    with pytest.raises(ValueError, match="--loss must be one of"):
        ActivateConfig(loss="margin")
    with pytest.raises(ValueError, match="--competitors must be >= 1"):
        ActivateConfig(loss="rank", competitors=0)
    for tau in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="--tau must be a positive number"):
            ActivateConfig(loss="rank", tau=tau)
    with pytest.raises(ValueError, match="needs --target pq"):
        ActivateConfig(loss="rank", target="ivf")
    with pytest.raises(ValueError, match="images but"):
        activate_batch([np.zeros((8, 8, 3), np.uint8)], np.zeros((2, 4), np.float32), _TinyNet(), 32, "squash")


def test_shared_codes_are_the_vectors_another_vector_encodes_like():
    """The evaluation counts images the index cannot tell from another: exact duplicates share a
    code; distinct random vectors do not, with 64-bit PQ codes."""
    from raysearch.evaluate.activation import _shares_code

    rng = np.random.default_rng(0)
    x = rng.standard_normal((600, 32)).astype(np.float32)
    x[[10, 20, 30]] = x[[5, 6, 7]]  # three pairs of duplicates
    index = faiss.index_factory(32, "IVF4,PQ8x8")
    index.train(x)
    shared = _shares_code(index, x)
    assert sorted(np.flatnonzero(shared).tolist()) == [5, 6, 7, 10, 20, 30]
    assert _shares_code(faiss.IndexHNSWFlat(32, 8), x) is None  # a graph has no standalone codes


def test_the_cosine_loss_with_the_built_in_model_is_warned_about():
    """The published cosine loss lowered recall with the built-in model in the benchmark: that pairing
    alone gets the warning; the rank loss, other models and fine-tuned weights do not."""
    from types import SimpleNamespace

    from raysearch.activate.pipeline import loss_advice
    from raysearch.models.names import DEFAULT_MODEL

    built_in = SimpleNamespace(name=DEFAULT_MODEL, weights=None)
    advice = loss_advice(built_in, ActivateConfig(loss="cosine"))
    assert advice is not None and "--loss rank" in advice and "raysearch eval activation" in advice
    assert loss_advice(built_in, ActivateConfig(loss="rank")) is None
    assert loss_advice(SimpleNamespace(name="torchscript:/models/sscd.pt", weights=None), ActivateConfig()) is None
    assert loss_advice(SimpleNamespace(name=DEFAULT_MODEL, weights="/models/tuned.pt"), ActivateConfig()) is None


def test_pixel_groups_keep_the_order_and_the_budget():
    assert pixel_groups([4, 4, 4, 10, 1, 1], 8) == [[0, 1], [2], [3], [4, 5]]
    assert pixel_groups([4, 4, 4], None) == [[0, 1, 2]]
    assert pixel_groups([], 8) == []
    with pytest.raises(ValueError, match="max_pixels"):
        pixel_groups([1], 0)


def test_a_batch_over_the_pixel_budget_is_activated_group_by_group(tiny_setup):
    """Each group of images within the budget is optimised on its own, exactly as a batch of its own
    would be; its competitors go with it, and the results come back in the input order."""
    net, images, targets, _ = tiny_setup
    sizes = [im.shape[0] * im.shape[1] for im in images]
    budget = max(sizes) + min(sizes)
    groups = pixel_groups(sizes, budget)
    assert 1 < len(groups) < len(images)
    competitors = np.stack([np.roll(targets, k + 1, axis=0) for k in range(3)], axis=1)
    config = ActivateConfig(iterations=3, lr=0.5, loss="rank", competitors=3, psnr=42.0)

    class Recording(torch.nn.Module):
        """The model, noting how many images each forward pass holds."""

        def __init__(self):
            super().__init__()
            self.net, self.batches = net, []

        def forward(self, x):
            self.batches.append(x.shape[0])
            return self.net(x)

    seen = Recording()
    out = activate_batch(images, targets, seen, 64, "squash", config, competitors=competitors, max_pixels=budget)
    assert len(out) == len(images)
    assert max(seen.batches) == max(len(g) for g in groups)
    for group in groups:
        alone = activate_batch([images[i] for i in group], targets[group], net, 64, "squash", config,
                               competitors=competitors[group])
        for i, r in zip(group, alone):
            assert np.array_equal(out[i].pixels, r.pixels) and out[i].psnr == r.psnr >= 42.0


def test_the_defaults_follow_the_index_model_and_keep_a_psnr_floor():
    """With the built-in model the default is the loss that measured best with it (rank, lr 0.5, 3
    views) and a 40 dB floor; an edit-invariant model gets the published cosine loss; a loss asked
    for by name comes with its own step size and views."""
    from types import SimpleNamespace

    from raysearch.activate.pipeline import ActivatePipelineConfig
    from raysearch.models.names import DEFAULT_MODEL

    built_in = SimpleNamespace(name=DEFAULT_MODEL, weights=None)
    sscd = SimpleNamespace(name="torchscript:/models/sscd.pt", weights=None)
    s = ActivatePipelineConfig().settings(built_in)
    assert (s.loss, s.lr, s.augment, s.psnr, s.target) == ("rank", 0.5, 3, 40.0, "pq")
    s = ActivatePipelineConfig().settings(sscd)
    assert (s.loss, s.lr, s.augment, s.psnr) == ("cosine", 1.0, 0, 40.0)
    s = ActivatePipelineConfig(options=(("loss", "cosine"),)).settings(built_in)
    assert (s.loss, s.lr, s.augment) == ("cosine", 1.0, 0)
    s = ActivatePipelineConfig(options=(("target", "ivf"),)).settings(built_in)
    assert (s.loss, s.target) == ("cosine", "ivf")                   # rank needs PQ codes
    s = ActivatePipelineConfig(options=(("psnr", None), ("lr", 2.0))).settings(built_in)
    assert s.psnr is None and s.lr == 2.0 and s.loss == "rank"
    explicit = ActivateConfig(iterations=3)
    assert ActivatePipelineConfig(activate=explicit).settings(built_in) is explicit
