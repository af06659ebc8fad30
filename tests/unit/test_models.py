"""Models: the bundled ImageNet weights load correctly; registry choices are checked early."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from raysearch.models import ModelConfig, build_model, resolve_model
from raysearch.models.backbones import build_efficientnet_lite0

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
# ImageNet classes 281-285: tabby, tiger cat, Persian, Siamese, Egyptian cat.
CAT_CLASSES = range(281, 286)


def _batch(arr: np.ndarray, size: int = 224) -> torch.Tensor:
    img = Image.fromarray(arr).resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float() / 255.0


def test_bundled_weights_classify_the_cat_photo_as_a_cat(photos):
    net = build_efficientnet_lite0(None).eval()
    with torch.no_grad():
        logits = net.classify((_batch(photos["chelsea"]) - IMAGENET_MEAN) / IMAGENET_STD)
    top = int(logits.argmax())
    assert top in CAT_CLASSES, top
    with torch.no_grad():
        coffee = int(net.classify((_batch(photos["coffee"]) - IMAGENET_MEAN) / IMAGENET_STD).argmax())
    assert coffee == 967  # espresso


def test_default_model_gives_unit_vectors_that_tell_photos_apart(photos):
    spec = resolve_model(ModelConfig())
    assert (spec.name, spec.dim, spec.input_size, spec.pooling) == ("efficientnet_lite0_gem", 1280, 224, "gem")
    model = build_model(spec)
    x = torch.cat([_batch(photos[n]) for n in ("chelsea", "coffee", "rocket")])
    flipped = torch.flip(x[:1], dims=[3])
    with torch.no_grad():
        v = model(torch.cat([x, flipped])).numpy()
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)
    sims = v @ v.T
    assert sims[0, 3] > sims[0, 1] and sims[0, 3] > sims[0, 2]  # mirrored cat closer than other photos


def test_multiscale_changes_the_descriptor_but_keeps_unit_norm(photos):
    single = build_model(resolve_model(ModelConfig()))
    multi = build_model(resolve_model(ModelConfig(scales=(1.0, 0.7071, 0.5))))
    x = _batch(photos["astronaut"])
    with torch.no_grad():
        a, b = single(x).numpy(), multi(x).numpy()
    assert abs(np.linalg.norm(b) - 1.0) < 1e-5
    assert 0.8 < float((a @ b.T)[0, 0]) < 0.99999


def test_pooling_override_and_manifest_roundtrip():
    spec = resolve_model(ModelConfig(pooling="mac", input_size=160, resize="pad"))
    assert (spec.pooling, spec.input_size, spec.resize) == ("mac", 160, "pad")
    assert type(spec).from_dict(spec.to_dict()) == spec


def test_resnet_needs_weights_and_loads_a_state_dict(tmp_path):
    import torchvision

    with pytest.raises(ValueError, match="needs --weights"):
        resolve_model(ModelConfig(name="resnet50_gem"))
    path = tmp_path / "r50.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    spec = resolve_model(ModelConfig(name="resnet50_gem", weights=str(path), input_size=64))
    assert spec.dim == 2048 and spec.weights_sha256
    with torch.no_grad():
        out = build_model(spec)(torch.rand(2, 3, 64, 64))
    assert out.shape == (2, 2048)


def test_resnet_weights_of_the_wrong_network_are_refused(tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save(torch.nn.Linear(3, 3).state_dict(), path)
    spec = resolve_model(ModelConfig(name="resnet101_gem", weights=str(path)))
    with pytest.raises(ValueError, match="lacks"):
        build_model(spec)


def test_torchscript_model_dim_is_found_by_running_it(tmp_path):
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 24, 3, stride=2)

        def forward(self, x):
            return self.conv(x).mean(dim=(2, 3))

    path = tmp_path / "tiny.pt"
    torch.jit.script(Tiny()).save(str(path))
    spec = resolve_model(ModelConfig(name=f"torchscript:{path}", input_size=64))
    assert spec.dim == 24 and spec.pooling is None
    with torch.no_grad():
        out = build_model(spec)(torch.rand(3, 3, 64, 64))
    np.testing.assert_allclose(out.norm(dim=1).numpy(), 1.0, rtol=1e-5)


@pytest.mark.parametrize(
    "config, message",
    [
        (ModelConfig(name="vit_giant"), "unknown model"),
        (ModelConfig(pooling="median"), "--pooling"),
        (ModelConfig(resize="stretch"), "--resize"),
        (ModelConfig(input_size=8), "--input-size"),
        (ModelConfig(name="torchscript:/no/such/file.pt"), "no such TorchScript"),
        (ModelConfig(weights="/no/such/weights.pth"), "--weights"),
    ],
)
def test_bad_model_choices_fail_early(config, message):
    with pytest.raises(ValueError, match=message):
        resolve_model(config)
