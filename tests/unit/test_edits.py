"""The seeded edit suite: every edit is deterministic, returns RGB, and changes the picture."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from raysearch.edits import COMBO_EDITS, EDITS, apply_edit


@pytest.fixture(scope="module")
def picture(photos) -> Image.Image:
    return Image.fromarray(photos["chelsea"])


@pytest.mark.parametrize("name", sorted(EDITS))
def test_edit_is_seeded_rgb_and_changes_the_image(name, picture):
    a = apply_edit(name, picture, seed=11)
    b = apply_edit(name, picture, seed=11)
    assert a.mode == "RGB"
    assert np.array_equal(np.asarray(a), np.asarray(b)), "same seed must give the same edit"
    original = np.asarray(picture)
    edited = np.asarray(a)
    assert edited.shape != original.shape or (edited != original).any(axis=2).mean() > 0.002


@pytest.mark.parametrize("name", ["crop", "rotate", "color_jitter", "text", "combo", "noise", "perspective"])
def test_different_seeds_give_different_edits(name, picture):
    a = np.asarray(apply_edit(name, picture, seed=1))
    b = np.asarray(apply_edit(name, picture, seed=2))
    assert a.shape != b.shape or not np.array_equal(a, b)


def test_suite_covers_the_disc21_families():
    for name in ("crop", "rotate", "hflip", "vflip", "color_jitter", "grayscale", "blur", "jpeg", "text", "shapes",
                 "pad", "resize", "meme", "overlay", "pixelate", "noise", "perspective", "combo"):
        assert name in EDITS


def test_combo_draws_from_a_fixed_list():
    # New edits must not change what a seeded combo does (the demo and activation rely on it).
    assert "vflip" not in COMBO_EDITS and "perspective" not in COMBO_EDITS
    assert {"crop", "jpeg", "meme"} <= set(COMBO_EDITS)


def test_geometry_of_simple_edits(picture):
    w, h = picture.size
    assert apply_edit("rotate90", picture, 0).size == (h, w)
    assert np.array_equal(np.asarray(apply_edit("hflip", picture, 0)), np.asarray(picture)[:, ::-1])
    assert np.array_equal(np.asarray(apply_edit("vflip", picture, 0)), np.asarray(picture)[::-1])
    mw, mh = apply_edit("meme", picture, 0).size
    assert mw == w and mh > h
    cw, ch = apply_edit("crop", picture, 0).size
    assert 0.4 * w - 1 <= cw <= 0.9 * w and 0.4 * h - 1 <= ch <= 0.9 * h
    gray = np.asarray(apply_edit("grayscale", picture, 0)).astype(int)
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 1], gray[..., 2])


def test_none_and_unknown_edits(picture):
    assert np.array_equal(np.asarray(apply_edit("none", picture, 0)), np.asarray(picture))
    with pytest.raises(ValueError, match="unknown edit"):
        apply_edit("sepia", picture, 0)
