"""Activation images/s before and after the fast embedding settings (its forward and backward run
the index's model, as the Activator gets it from `Embedder`).

"before" runs with RAYSEARCH_EMBED_FAST=0 (batch norms unfolded, NCHW weights on CPU, float32 on
GPU), "after" with the defaults; each in a fresh process, alternated --repeats times, medians
reported. Images: --images small photographs at full resolution (benchmarks/embed.py's 0.3-0.5 MP
crops of photos.py's train group); targets: random unit vectors (the speed does not depend on
them). Timed: one `activate_batch` call of all the images, after a one-image warm-up (model load
and kernel set-up excluded).

Usage:
  python benchmarks/activate_speed.py [--images 8 --iterations 10 --augment 0 --repeats 3 --threads 2]
         [--device cpu|cuda] [--workdir DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

MODES = {"before": "0", "after": "1"}


def _child(paths: list[str], iterations: int, augment: int, threads: int, device: str) -> None:
    import numpy as np
    import torch
    from PIL import Image

    from raysearch.activate.optimize import ActivateConfig, activate_batch
    from raysearch.models import ModelConfig, resolve_model
    from raysearch.models.embedder import Embedder

    torch.set_num_threads(threads)
    spec = resolve_model(ModelConfig())
    model = Embedder(spec.to_dict(), device=device).model   # what the Activator runs
    images = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    targets = np.random.default_rng(0).normal(size=(len(images), spec.dim)).astype(np.float32)
    config = ActivateConfig(iterations=iterations, augment=augment)
    activate_batch(images[:1], targets[:1], model, spec.input_size, spec.resize,
                   ActivateConfig(iterations=1, augment=augment), device=device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = activate_batch(images, targets, model, spec.input_size, spec.resize, config, device=device)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "images_per_s": len(images) / seconds,
                      "cos_after_mean": float(np.mean([r.cos_after for r in out]))}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--augment", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--photos", default=None, help="folder of photographs to cut from (default: photos.py's train group)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", nargs="+", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.child, args.iterations, args.augment, args.threads, args.device)
        return

    from embed import make_set

    work = args.workdir or tempfile.mkdtemp(prefix="rs-bench-activate-")
    paths = make_set(os.path.join(work, "small"), "small", max(args.images, 16), args.photos)[:args.images]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; {args.device}; "
          f"{time.strftime('%Y-%m-%d %H:%M')}; {args.images} photographs of 0.3-0.5 MP, {args.iterations} "
          f"iterations, augment {args.augment}, {args.threads} threads")
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    for r in range(args.repeats):
        for mode in (list(MODES) if r % 2 == 0 else list(MODES)[::-1]):
            load = os.getloadavg()[0]
            cmd = [sys.executable, os.path.abspath(__file__), "--iterations", str(args.iterations), "--augment",
                   str(args.augment), "--threads", str(args.threads), "--device", args.device, "--child", *paths]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT,
                                 env={**os.environ, "RAYSEARCH_EMBED_FAST": MODES[mode]})
            row = {**json.loads(out.stdout.strip().splitlines()[-1]), "load": load}
            runs[mode].append(row)
            print(f"  {mode:6s} {row['images_per_s']:6.2f} images/s ({row['seconds']:.1f} s; mean cosine to "
                  f"target after {row['cos_after_mean']:.3f}; load {load:.1f})", flush=True)
    med = {m: statistics.median(r["images_per_s"] for r in rows) for m, rows in runs.items()}
    loads = [r["load"] for rows in runs.values() for r in rows]
    print(f"\nmedians of {args.repeats}: before {med['before']:.2f} images/s, after {med['after']:.2f} images/s "
          f"({med['after'] / med['before']:.2f}x); 1-minute load average median {statistics.median(loads):.1f}, "
          f"max {max(loads):.1f}, on {os.cpu_count()} CPUs")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": platform.processor(), "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
                       "medians": med, "runs": runs}, f, indent=2)


if __name__ == "__main__":
    main()
