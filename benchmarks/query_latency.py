"""Query-path latency before and after the fast embedding settings.

"before" runs with RAYSEARCH_EMBED_FAST=0 (the settings from before: batch norms unfolded, NCHW
weights on CPU, float32 and no pinned buffers on GPU), "after" with the defaults; both in fresh
processes, alternated --repeats times, medians reported. Index: --references small photographs
(benchmarks/embed.py's crops of photos.py's train group) built once with the default model; the
query is another photograph of that set, edited by a crop.

Measured:
  search wall      `python -m raysearch search INDEX QUERY.jpg`: the whole command, as a user waits
  first embed      in one process: `Searcher.embed_image_bytes` of the query, model load included
  embed p50        the same call once the model is loaded: median of --calls calls
  serve embed p50  what one request costs the serve deployment `QueryEmbedder`: its Embedder,
                   built with the replica's settings, run in a worker thread from an event loop
                   as the replica's batch method runs it (serve.batch itself only runs inside a
                   Serve replica), one request at a time, median of --calls calls

Usage:
  python benchmarks/query_latency.py [--references 300 --repeats 5 --calls 30 --threads 2] [--workdir DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
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


def _child(index_dir: str, query: str, calls: int, threads: int, device: str) -> None:
    """One process of one mode: prints a JSON line of its latencies in ms."""
    import numpy as np
    import torch

    from raysearch.models.embedder import Embedder
    from raysearch.search import Searcher

    torch.set_num_threads(threads)
    data = open(query, "rb").read()
    searcher = Searcher(index_dir, verify=False)
    start = time.perf_counter()
    searcher.embed_image_bytes([data])
    first = 1e3 * (time.perf_counter() - start)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        searcher.embed_image_bytes([data])
        times.append(1e3 * (time.perf_counter() - start))
    pixels = searcher.preprocess(data)
    # The replica's Embedder, with the settings build_app gives QueryEmbedder.
    embedder = Embedder(searcher.store.manifest["model"], device=device, torch_threads=threads)

    async def one_request() -> np.ndarray:
        # QueryEmbedder.embed_batch with a batch of one: np.stack, the forward pass in a thread.
        return (await asyncio.to_thread(embedder.embed_pixels, np.stack([pixels])))[0]

    async def serve_calls() -> list[float]:
        out = []
        await one_request()
        for _ in range(calls):
            start = time.perf_counter()
            vector = await one_request()
            out.append(1e3 * (time.perf_counter() - start))
        assert np.asarray(vector).shape == (searcher.store.model_spec.dim,)
        return out

    serve_times = asyncio.run(serve_calls())
    print(json.dumps({"first_embed_ms": first, "embed_p50_ms": statistics.median(times),
                      "serve_embed_p50_ms": statistics.median(serve_times)}))


def build_index(folder: str, index_dir: str) -> None:
    if os.path.exists(os.path.join(index_dir, "manifest.json")):
        return
    subprocess.run([sys.executable, "-m", "raysearch", "build", folder, "--out", index_dir, "--overwrite",
                    "--no-progress"], check=True, cwd=ROOT,
                   capture_output=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--references", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--device", default="cpu", help="where the serve replica embeds (cpu or cuda)")
    ap.add_argument("--photos", default=None, help="folder of photographs to cut from (default: photos.py's train group)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.child[0], args.child[1], args.calls, args.threads, args.device)
        return

    from PIL import Image

    from embed import make_set

    work = args.workdir or tempfile.mkdtemp(prefix="rs-bench-query-")
    paths = make_set(os.path.join(work, "small"), "small", args.references + 1, args.photos)
    refs = os.path.join(work, "refs")
    os.makedirs(refs, exist_ok=True)
    for p in paths[:-1]:
        target = os.path.join(refs, os.path.basename(p))
        if not os.path.exists(target):
            os.link(p, target)
    query = os.path.join(work, "query.jpg")
    with Image.open(paths[-1]) as img:
        w, h = img.size
        img.crop((w // 10, h // 10, w - w // 10, h - h // 10)).save(query, quality=90)
    index_dir = os.path.join(work, "index")
    build_index(refs, index_dir)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"{time.strftime('%Y-%m-%d %H:%M')}; index of {args.references} photographs; {args.threads} threads")

    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    for r in range(args.repeats):
        order = list(MODES) if r % 2 == 0 else list(MODES)[::-1]
        for mode in order:
            env = {**os.environ, "RAYSEARCH_EMBED_FAST": MODES[mode]}
            load = os.getloadavg()[0]
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "raysearch", "search", index_dir, query, "-k", "5"],
                           check=True, cwd=ROOT, env=env, capture_output=True)
            wall = time.perf_counter() - start
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", index_dir, query,
                                  "--calls", str(args.calls), "--threads", str(args.threads), "--device", args.device],
                                 check=True, cwd=ROOT, env=env, capture_output=True, text=True)
            row = {"search_wall_s": wall, **json.loads(out.stdout.strip().splitlines()[-1]), "load": load}
            runs[mode].append(row)
            print(f"  {mode:6s} search {wall:5.2f} s, first embed {row['first_embed_ms']:7.1f} ms, "
                  f"embed p50 {row['embed_p50_ms']:6.1f} ms, serve embed p50 {row['serve_embed_p50_ms']:6.1f} ms "
                  f"(load {load:.1f})", flush=True)

    keys = ("search_wall_s", "first_embed_ms", "embed_p50_ms", "serve_embed_p50_ms")
    med = {m: {k: statistics.median(r[k] for r in rows) for k in keys} for m, rows in runs.items()}
    loads = [r["load"] for rows in runs.values() for r in rows]
    print(f"\nmedians of {args.repeats} (1-minute load average: median {statistics.median(loads):.1f}, "
          f"max {max(loads):.1f}, on {os.cpu_count()} CPUs)")
    for k in keys:
        b, a = med["before"][k], med["after"][k]
        print(f"  {k:20s} before {b:8.2f}  after {a:8.2f}  ({b / a:.2f}x faster)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": platform.processor(), "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
                       "medians": med, "runs": runs}, f, indent=2)


if __name__ == "__main__":
    main()
