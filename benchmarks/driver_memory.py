"""Peak memory of the driver process as the image count grows.

Embeds N small generated JPEGs (distinct random-noise tiles) with the default model and reports the
driver's peak resident memory (ru_maxrss) for each N, each in a fresh process. The listing streams to
Parquet and the driver only collects counts, so the peak should not grow with N.

Usage:
  python benchmarks/driver_memory.py --counts 1000 10000 [--input-size 64]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
from PIL import Image

_RUN = """
import resource, sys, time
from raysearch.embed import EmbedConfig, embed_source
from raysearch.models import ModelConfig
from raysearch.runtime import ensure_ray
ensure_ray(num_cpus=2)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
s = embed_source(sys.argv[1], sys.argv[2], EmbedConfig(model=ModelConfig(input_size=int(sys.argv[3])), progress=False))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(s.n_embedded, base, peak, time.perf_counter() - t)
"""


def make_tiles(folder: str, n: int) -> None:
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        sub = os.path.join(folder, f"{i // 1000:03d}")
        os.makedirs(sub, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, size=(48, 48, 3), dtype=np.uint8)).save(os.path.join(sub, f"{i:06d}.jpg"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--input-size", type=int, default=64)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="rs-bench-mem-")
    try:
        for n in args.counts:
            images = os.path.join(work, f"img{n}")
            make_tiles(images, n)
            out = subprocess.run(
                [sys.executable, "-c", _RUN, images, os.path.join(work, f"emb{n}"), str(args.input_size)],
                check=True, capture_output=True, text=True,
            ).stdout.strip().splitlines()[-1].split()
            done, base, peak, secs = int(out[0]), int(out[1]), int(out[2]), float(out[3])
            print(f"{n:>7} images: embedded {done}, driver peak RSS {peak / 1024:.0f} MiB "
                  f"(after ray.init {base / 1024:.0f} MiB, +{(peak - base) / 1024:.0f} MiB during the run), {secs:.0f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
