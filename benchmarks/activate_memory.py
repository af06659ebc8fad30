"""Memory of activating a batch of large photographs: all at once vs groups within a pixel budget.

Activation keeps several full-resolution float tensors per image (the image, its JND heatmap, the
perturbation variable, its gradient, Adam's two moments, the perturbed image, the resize's
buffers). A batch of phone photographs optimised at once can need more memory than a laptop has, so
raysearch optimises a batch in groups of at most `--batch-megapixels` (default 16).

Each measurement runs in a fresh process (peak RSS is per process): --batch images of --size pixels
(scikit-image's photographs, upscaled) are activated with the default model, once as one batch
(the baseline, as before the budget) and once with the budget, alternated --repeats times.
Reported: peak resident memory above the process's before activation, wall time, and the ratio.

Usage:
  python benchmarks/activate_memory.py [--batch 8 --size 3000x2000 --iterations 2 --repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def measure(batch: int, size: tuple[int, int], iterations: int, max_pixels: int | None) -> dict:
    """One activation of `batch` photographs in this process: peak RSS growth (GB) and seconds."""
    import numpy as np
    import torch
    from PIL import Image

    from raysearch.activate.optimize import ActivateConfig, activate_batch
    from raysearch.models.registry import build_model, resolve_model
    from raysearch.models.spec import ModelConfig
    from raysearch.samples import sample_photographs

    torch.set_num_threads(os.cpu_count() or 1)
    spec = resolve_model(ModelConfig())
    model = build_model(spec)
    photos = list(sample_photographs().values())
    w, h = size
    images = [np.asarray(Image.fromarray(photos[i % len(photos)]).resize((w, h), Image.BICUBIC)) for i in range(batch)]
    with torch.no_grad():
        dim = model(torch.zeros(1, 3, spec.input_size, spec.input_size)).shape[1]
    targets = np.random.default_rng(0).normal(size=(batch, dim)).astype(np.float32)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    out = activate_batch(images, targets, model, spec.input_size, spec.resize,
                          ActivateConfig(iterations=iterations, psnr=40.0), max_pixels=max_pixels)
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    assert len(out) == batch
    return {"peak_gb": (peak - before) * 1024 / 1e9, "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", default="3000x2000", help="WIDTHxHEIGHT of each photograph")
    ap.add_argument("--iterations", type=int, default=2, help="optimiser steps (memory does not depend on them)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    size = tuple(int(v) for v in args.size.lower().split("x"))
    if args.child is not None:
        print(json.dumps(measure(args.batch, size, args.iterations, None if args.child == "all" else int(args.child))))
        return

    from raysearch.activate import DEFAULT_BATCH_PIXELS

    modes = {"one batch (baseline)": "all", f"groups of <= {DEFAULT_BATCH_PIXELS / 1e6:g} MP (default)": str(DEFAULT_BATCH_PIXELS)}
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for _ in range(args.repeats):
        for name, child in modes.items():
            cmd = [sys.executable, os.path.abspath(__file__), "--child", child, "--batch", str(args.batch),
                   "--size", args.size, "--iterations", str(args.iterations)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs[name].append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(f"{name}: {runs[name][-1]}", flush=True)
    mp = size[0] * size[1] / 1e6
    print(f"\n{args.batch} photographs of {args.size} ({mp:g} MP each, {args.batch * mp:g} MP in all), "
          f"{args.iterations} iterations, median of {args.repeats}")
    base = statistics.median(r["peak_gb"] for r in runs["one batch (baseline)"])
    base_s = statistics.median(r["seconds"] for r in runs["one batch (baseline)"])
    rows = []
    for name, rs in runs.items():
        peak, secs = statistics.median(r["peak_gb"] for r in rs), statistics.median(r["seconds"] for r in rs)
        rows.append({"mode": name, "peak_gb": peak, "seconds": secs, "runs": rs})
        print(f"{name:<32} peak +{peak:6.2f} GB ({peak / base:4.2f}x)   {secs:6.1f} s ({secs / base_s:4.2f}x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "date": time.strftime("%Y-%m-%d"),
                       "command": " ".join(sys.argv), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
