"""Decoding: every image kind converts to RGB uint8, every failure kind becomes a DecodeError."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from raysearch import images
from raysearch.images import DecodeError, decode_image, resize_image


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def cat(photos) -> np.ndarray:
    return photos["chelsea"]


def test_jpeg_roundtrip_gives_rgb_uint8(cat):
    arr = decode_image(_encode(Image.fromarray(cat), "JPEG", quality=95))
    assert arr.dtype == np.uint8 and arr.shape == cat.shape
    assert np.abs(arr.astype(int) - cat.astype(int)).mean() < 4


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "BMP", "TIFF", "GIF"])
def test_every_supported_format_decodes(cat, fmt):
    arr = decode_image(_encode(Image.fromarray(cat), fmt))
    assert arr.shape == cat.shape and arr.dtype == np.uint8


def test_exif_orientation_is_applied(cat):
    img = Image.fromarray(cat)  # 451 wide, 300 high
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    arr = decode_image(_encode(img, "JPEG", exif=exif.tobytes()))
    assert arr.shape[:2] == (cat.shape[1], cat.shape[0])


def test_grayscale_palette_cmyk_become_rgb(cat):
    img = Image.fromarray(cat)
    gray = decode_image(_encode(img.convert("L"), "PNG"))
    assert gray.shape == cat.shape and np.array_equal(gray[..., 0], gray[..., 1])
    pal = decode_image(_encode(img.convert("P"), "PNG"))
    assert pal.shape == cat.shape
    cmyk = decode_image(_encode(img.convert("CMYK"), "JPEG", quality=95))
    assert cmyk.shape == cat.shape
    assert np.abs(cmyk.astype(int) - cat.astype(int)).mean() < 12


def test_16_bit_grayscale_keeps_its_range():
    ramp = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    arr = decode_image(_encode(Image.fromarray(ramp), "PNG"))
    assert arr.shape == (64, 64, 3)
    assert arr.min() == 0 and arr.max() == 255
    assert arr[0, 0, 0] < arr[-1, -1, 0]


def test_transparent_pixels_are_composited_on_white():
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:4, :, 3] = 255  # top half opaque red-ish, bottom half fully transparent
    arr = decode_image(_encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert tuple(arr[0, 0]) == (200, 0, 0)
    assert tuple(arr[7, 7]) == (255, 255, 255)


def test_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    arr = decode_image(buf.getvalue())
    assert arr[8, 8, 0] > 200 and arr[8, 8, 2] < 50


def test_zero_byte_file():
    with pytest.raises(DecodeError, match="empty"):
        decode_image(b"")


def test_non_image_bytes():
    with pytest.raises(DecodeError, match="not an image"):
        decode_image(b"%PDF-1.4 this is a document, not a picture" * 10)


def test_truncated_jpeg(cat):
    data = _encode(Image.fromarray(cat), "JPEG", quality=95)
    with pytest.raises(DecodeError, match="truncated"):
        decode_image(data[: len(data) // 2])


def test_truncated_png(cat):
    data = _encode(Image.fromarray(cat), "PNG")
    with pytest.raises(DecodeError):
        decode_image(data[: len(data) // 3])


def test_corrupt_header():
    data = bytearray(_encode(Image.new("RGB", (32, 32), (1, 2, 3)), "PNG"))
    data[16:24] = b"\xff" * 8  # width/height fields of the IHDR chunk
    with pytest.raises(DecodeError):
        decode_image(bytes(data))


def test_decompression_bomb_is_refused(monkeypatch):
    monkeypatch.setattr(images, "MAX_PIXELS", 1000)
    with pytest.raises(DecodeError, match="too large"):
        decode_image(_encode(Image.new("RGB", (100, 100)), "PNG"))


def test_pil_bomb_limit_is_refused_too(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(DecodeError, match="decompression bomb"):
        decode_image(_encode(Image.new("RGB", (40, 40)), "PNG"))


def test_draft_decoding_keeps_at_least_the_requested_size(photos):
    big = Image.fromarray(photos["hubble_deep_field"])  # 1000 x 872
    arr = decode_image(_encode(big, "JPEG", quality=90), draft_size=224)
    assert min(arr.shape[:2]) >= 224
    assert arr.shape[0] < 872


@pytest.mark.parametrize("policy", ["squash", "crop", "pad"])
def test_resize_policies_give_the_model_size(cat, policy):
    out = resize_image(cat, 96, policy)
    assert out.shape == (96, 96, 3) and out.dtype == np.uint8


def test_crop_policy_keeps_the_centre_and_pad_keeps_everything():
    arr = np.zeros((100, 300, 3), np.uint8)
    arr[:, 100:200] = 255  # white centre third
    cropped = resize_image(arr, 50, "crop")
    assert cropped.mean() > 250  # the centre square is all white
    padded = resize_image(arr, 60, "pad")
    assert padded[0, 30].tolist() != [255, 255, 255]  # letterbox band at the top
    assert padded[30, 30].tolist() == [255, 255, 255]


def test_unknown_resize_policy():
    with pytest.raises(ValueError, match="resize policy"):
        resize_image(np.zeros((8, 8, 3), np.uint8), 4, "stretch")  # type: ignore[arg-type]
