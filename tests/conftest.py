"""Shared fixtures: sample photographs on disk, a local Ray, an S3 server (moto) on loopback.

S3 settings are put in the environment before anything starts, so Ray workers inherit them.
"""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
from PIL import Image


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_S3_PORT = _free_port()
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{_S3_PORT}"
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# OpenMP threads that spin while waiting (the default) slow FAISS and torch several-fold when the
# test machine's cores are shared; waiting threads sleep instead. Set before faiss/torch load.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1; yields its endpoint URL. Buckets are made by the tests."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=_S3_PORT, verbose=False)
    server.start()
    yield os.environ["AWS_ENDPOINT_URL"]
    server.stop()


@pytest.fixture()
def s3_bucket(s3_server, request):
    """A fresh, empty bucket; yields its name."""
    import boto3
    import s3fs

    name = "rs-" + request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[:40].strip("-")
    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket=name)
    s3fs.S3FileSystem.clear_instance_cache()
    yield name


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray cluster shared by the tests of a session (started on first use)."""
    import ray

    if not ray.is_initialized():
        from raysearch.runtime import ensure_ray

        ensure_ray(num_cpus=2)
    yield ray


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    from raysearch.samples import sample_photographs

    return sample_photographs()


@pytest.fixture(scope="session")
def photo_folder(tmp_path_factory, photos) -> str:
    """A folder of 40 JPEGs: the sample photographs and crops of them, in two subfolders."""
    from raysearch.samples import random_crop_box

    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    names = list(photos)
    for i in range(40):
        name = names[i % len(names)]
        arr = photos[name]
        if i >= len(names):
            left, top, right, bottom = random_crop_box(arr.shape[0], arr.shape[1], rng)
            arr = arr[top:bottom, left:right]
        sub = root / ("a" if i % 2 == 0 else "b")
        sub.mkdir(exist_ok=True)
        Image.fromarray(arr).save(sub / f"img{i:03d}.jpg", quality=92)
    return str(root)


@pytest.fixture(scope="session")
def photo_embeddings(tmp_path_factory, photo_folder, ray_local) -> str:
    """photo_folder embedded once, with the default model, by the Ray pipeline."""
    from raysearch.embed import EmbedConfig, embed_source

    out = str(tmp_path_factory.mktemp("photo-embeddings") / "embeddings")
    embed_source(photo_folder, out, EmbedConfig(progress=False))
    return out


@pytest.fixture(scope="session")
def build_photo_index(photo_folder, photo_embeddings):
    """`build(photo_folder, out, default model, index_config)` that resumes from
    photo_embeddings: a build whose embedding step finished (copied in) goes on to the index. The
    modules that test what is done with an index use it, so the 40 photographs are embedded once
    a session instead of once a module; test_build_search and the CLI tests run whole builds."""
    import shutil

    from raysearch.builder import EMBEDDINGS_SUBDIR, build
    from raysearch.embed import EmbedConfig

    def run(out: str, index_config):
        shutil.copytree(photo_embeddings, os.path.join(out, EMBEDDINGS_SUBDIR))
        result = build(photo_folder, out, EmbedConfig(progress=False), index_config)
        assert result.embed.n_embedded == 40 and result.embed.n_skipped == 40   # resumed, not embedded again
        return result

    return run
