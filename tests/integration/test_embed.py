"""The Ray Data embedding pipeline: error rows for bad files, the error budget, resuming a killed run."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from raysearch.models.embedder import Embedder
from raysearch.embed import EmbedConfig, embed_source
from raysearch.errors import EmbeddingError
from raysearch.formats.embeddings import embeddings_matrix, list_parts, read_errors, read_part
from raysearch.images import decode_image, resize_image
from raysearch.models import ModelConfig, resolve_model

pytestmark = pytest.mark.slow


def _jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture()
def messy_folder(tmp_path, photos) -> str:
    """Ten good photographs and one file of every bad kind."""
    root = tmp_path / "messy"
    root.mkdir()
    names = list(photos)[:10]
    for n in names:
        (root / f"{n}.jpg").write_bytes(_jpeg(photos[n]))
    good = _jpeg(photos["coffee"])
    (root / "zero.jpg").write_bytes(b"")
    (root / "truncated.jpg").write_bytes(good[: len(good) // 2])
    # A PNG whose compressed pixel data are scrambled (seeded: random bytes after the signature
    # alone were read as "truncated" by PIL about once in 700 draws).
    png = io.BytesIO()
    Image.fromarray(photos["coffee"]).save(png, format="PNG")
    png = png.getvalue()
    start = png.index(b"IDAT") + 104
    scrambled = np.random.default_rng(0).bytes(len(png) - start - 100)
    (root / "corrupt.png").write_bytes(png[:start] + scrambled + png[-100:])
    (root / "document.jpg").write_bytes(b"%PDF-1.7\n" + b"x" * 500)
    os.symlink(root / "deleted-target.jpg", root / "dangling.jpg")  # listed, unreadable
    (root / "extra.png").write_bytes(good)  # a good PNG
    (root / "astronaut.png").write_bytes(good)  # same id as astronaut.jpg: duplicate
    return str(root)


def test_bad_files_become_error_rows_with_reasons(messy_folder, tmp_path, ray_local):
    out = str(tmp_path / "emb")
    summary = embed_source(messy_folder, out, EmbedConfig(progress=False, max_error_rate=1.0))
    errors = read_errors(out).to_pylist()
    reasons = {e["image_id"]: e["reason"] for e in errors}
    assert summary.n_images == 17
    assert summary.n_embedded == 11 and summary.n_errors == 6
    assert reasons["zero"].startswith("empty file")
    assert reasons["truncated"].startswith("truncated image")
    assert reasons["corrupt"].startswith("corrupt image")
    assert reasons["document"].startswith("not an image")
    assert reasons["dangling"] == "file not found"
    assert reasons["astronaut"].startswith("duplicate image_id")
    assert all(e["uri"].startswith(messy_folder) for e in errors)
    rows = np.concatenate([read_part(p).column("row").to_numpy() for p in list_parts(out)])
    assert sorted(rows.tolist() + [e["row"] for e in errors]) == list(range(17))


def test_error_share_above_the_limit_fails_naming_the_error_table(messy_folder, tmp_path, ray_local):
    out = str(tmp_path / "emb")
    with pytest.raises(EmbeddingError, match=r"6 of 17 images could not be used .*errors"):
        embed_source(messy_folder, out, EmbedConfig(progress=False, max_error_rate=0.05))
    # Nothing is lost: a rerun with a higher limit finishes from what is on disk.
    summary = embed_source(messy_folder, out, EmbedConfig(progress=False, max_error_rate=0.5))
    assert summary.n_embedded == 11


_KILLED_RUN = textwrap.dedent(
    """
    import sys
    from raysearch.embed import EmbedConfig, embed_source
    from raysearch.models import ModelConfig
    from raysearch.runtime import ensure_ray
    ensure_ray(num_cpus=2)
    cfg = EmbedConfig(model=ModelConfig(input_size=128), batch_size=16, part_rows=16, chunk_rows=64, progress=False)
    embed_source(sys.argv[1], sys.argv[2], cfg)
    """
)


def test_a_killed_run_resumes_and_matches_an_uninterrupted_one(tmp_path, photos, ray_local):
    from raysearch.samples import random_crop_box

    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(1)
    names = list(photos)
    n = 256  # four decode tasks of 64 images; parts land after each
    for i in range(n):
        arr = photos[names[i % len(names)]]
        left, top, right, bottom = random_crop_box(arr.shape[0], arr.shape[1], rng)
        (src / f"{i:03d}.jpg").write_bytes(_jpeg(arr[top:bottom, left:right]))
    out = tmp_path / "emb"
    parts_dir = out / "parts"
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_RUN, str(src), str(out)],
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            if parts_dir.exists() and any(p.endswith(".parquet") for p in os.listdir(parts_dir)):
                break
            assert proc.poll() is None, "the run ended before it could be interrupted"
            time.sleep(0.02)
        else:
            pytest.fail("no part was written in time")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
        proc.wait()
    assert not (out / "embeddings.json").exists()

    def written():
        return {p: os.path.getmtime(parts_dir / p) for p in os.listdir(parts_dir) if p.endswith(".parquet")}

    # Ray's worker processes outlive the killed driver for a moment (they end when they find their
    # raylet gone): the part writer may land a part or two more, each whole. Wait for it to stop.
    before, quiet_since = written(), time.time()
    while time.time() - quiet_since < 3 and time.time() < deadline + 60:
        time.sleep(0.2)
        if (now := written()) != before:
            before, quiet_since = now, time.time()
    assert 0 < len(before) < n // 16

    config = EmbedConfig(model=ModelConfig(input_size=128), batch_size=16, part_rows=16, progress=False)
    summary = embed_source(str(src), str(out), config)
    assert summary.n_skipped == 16 * len(before)
    assert summary.n_embedded == n and summary.n_errors == 0
    for p, mtime in before.items():  # parts from before the kill were kept, not redone
        assert os.path.getmtime(parts_dir / p) == mtime

    tbl = pa.concat_tables(read_part(p) for p in list_parts(str(out))).sort_by("row")
    assert tbl.column("row").to_pylist() == list(range(n))  # every image exactly once
    # Same vectors as embedding every image directly, in one process.
    spec = resolve_model(ModelConfig(input_size=128))
    embedder = Embedder(spec.to_dict())
    pixels = np.stack([
        resize_image(decode_image((src / f"{i:03d}.jpg").read_bytes(), draft_size=128), 128, "squash")
        for i in range(n)
    ])
    np.testing.assert_allclose(embeddings_matrix(tbl), embedder.embed_pixels(pixels), atol=2e-5)


def test_rerun_with_other_arguments_is_refused(photo_folder, tmp_path, ray_local):
    out = str(tmp_path / "emb")
    embed_source(photo_folder, out, EmbedConfig(progress=False))
    with pytest.raises(EmbeddingError, match="another run"):
        embed_source(photo_folder, out, EmbedConfig(model=ModelConfig(pooling="mac"), progress=False))
