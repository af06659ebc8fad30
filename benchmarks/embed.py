"""Embedding throughput: raysearch's Ray Data pipeline vs a plain single-process PyTorch loop.

Both embed the same JPEG files with the same model, preprocessing (decode, EXIF, resize), batch size
and total torch threads. The plain loop reads, decodes and embeds batch after batch in one process;
raysearch decodes in Ray tasks and embeds in an actor pool, writing Parquet parts.

Reported per repetition:
  plain      images/s of the loop, model load included
  pipeline   images/s of `embed_source` with Ray already running (actor start and model load included)
  cold       images/s of `embed_source` including `ray.init` (what a first `raysearch build` sees)

Usage:
  python benchmarks/embed.py --images 2000 --repeats 3 [--batch-size 32] [--threads 2] [--input-size 224]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np


def make_images(folder: str, n: int, seed: int = 0) -> None:
    from raysearch.samples import write_reference_set

    write_reference_set(folder, n, seed=seed, quality=90)


def plain_loop(folder: str, batch_size: int, threads: int, input_size: int) -> tuple[float, int]:
    import torch

    from raysearch.images import decode_image, resize_image
    from raysearch.models import ModelConfig, build_model, resolve_model

    torch.set_num_threads(threads)
    start = time.perf_counter()
    spec = resolve_model(ModelConfig(input_size=input_size))
    model = build_model(spec)
    paths = sorted(os.path.join(folder, f) for f in os.listdir(folder))
    out = []
    for i in range(0, len(paths), batch_size):
        pixels = []
        for p in paths[i : i + batch_size]:
            with open(p, "rb") as f:
                arr = decode_image(f.read(), draft_size=spec.input_size)
            pixels.append(resize_image(arr, spec.input_size, spec.resize))
        x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float().div_(255.0)
        with torch.inference_mode():
            out.append(model(x).numpy())
    n = sum(len(o) for o in out)
    return time.perf_counter() - start, n


_COLD = """
import sys, time
start = time.perf_counter()
from raysearch.embed import EmbedConfig, embed_source
from raysearch.models import ModelConfig
from raysearch.runtime import ensure_ray
ensure_ray(num_cpus=int(sys.argv[4]))
s = embed_source(sys.argv[1], sys.argv[2], EmbedConfig(model=ModelConfig(input_size=int(sys.argv[5])),
                 batch_size=int(sys.argv[3]), progress=False))
print(time.perf_counter() - start, s.n_embedded)
"""


def pipeline(folder: str, work: str, batch_size: int, input_size: int) -> tuple[float, int]:
    from raysearch.embed import EmbedConfig, embed_source
    from raysearch.models import ModelConfig

    shutil.rmtree(work, ignore_errors=True)
    start = time.perf_counter()
    s = embed_source(folder, work, EmbedConfig(model=ModelConfig(input_size=input_size), batch_size=batch_size, progress=False))
    return time.perf_counter() - start, s.n_embedded


def cold(folder: str, work: str, batch_size: int, cpus: int, input_size: int) -> tuple[float, int]:
    shutil.rmtree(work, ignore_errors=True)
    out = subprocess.run(
        [sys.executable, "-c", _COLD, folder, work, str(batch_size), str(cpus), str(input_size)],
        check=True, capture_output=True, text=True,
    ).stdout.strip().splitlines()[-1].split()
    return float(out[0]), int(out[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="torch threads (plain) = CPUs given to Ray")
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()

    from raysearch.runtime import ensure_ray

    work = args.workdir or tempfile.mkdtemp(prefix="rs-bench-embed-")
    images = os.path.join(work, "images")
    if not os.path.isdir(images) or len(os.listdir(images)) != args.images:
        shutil.rmtree(images, ignore_errors=True)
        make_images(images, args.images)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; python {platform.python_version()}")
    print(f"{args.images} JPEGs (sample photographs and crops), batch {args.batch_size}, {args.threads} threads, input {args.input_size}")

    rows = []
    for r in range(args.repeats):
        t_cold, n_cold = cold(images, os.path.join(work, "cold"), args.batch_size, args.threads, args.input_size)
        t_plain, n_plain = plain_loop(images, args.batch_size, args.threads, args.input_size)
        ensure_ray(num_cpus=args.threads)
        t_pipe, n_pipe = pipeline(images, os.path.join(work, "pipe"), args.batch_size, args.input_size)
        assert n_plain == n_pipe == n_cold == args.images, (n_plain, n_pipe, n_cold)
        row = (args.images / t_plain, args.images / t_pipe, args.images / t_cold)
        rows.append(row)
        print(f"repeat {r + 1}: plain {row[0]:.1f} img/s  pipeline {row[1]:.1f} img/s  cold {row[2]:.1f} img/s")
    plain_m = statistics.median(r[0] for r in rows)
    pipe_m = statistics.median(r[1] for r in rows)
    cold_m = statistics.median(r[2] for r in rows)
    print(f"median: plain {plain_m:.1f} img/s, pipeline {pipe_m:.1f} img/s ({pipe_m / plain_m:.2f}x), "
          f"cold start {cold_m:.1f} img/s ({cold_m / plain_m:.2f}x)")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
