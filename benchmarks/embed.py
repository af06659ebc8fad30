"""Embedding throughput: raysearch's Ray Data pipeline against a plain PyTorch loop, the model alone
and decoding alone, on the same JPEG files, for small and for 12 MP photographs.

Photographs: benchmarks/photos.py's "train" group (never the judging packages), or --photos DIR.
  small  random crops of 0.3-0.5 MP (aspect 3:4 to 4:3), JPEG quality 90, like DISC21's images
  large  the photographs upscaled to 4000x3000 (3000x4000 when portrait) with a grain of sigma 4
         grey levels, so that a file holds about as much detail as a phone's (~2.7 MB), quality 92

Reported per set, each measurement repeated --repeats times, the variants in a rotating order
within each repeat (baseline and candidates alternate), medians:
  plain        the loop a user writes: PIL open, convert("RGB"), resize((S, S), BICUBIC), a CHW
               float tensor per image, the model in float32 NCHW, batch after batch in one process
               with --threads torch threads (model load included)
  plain_draft  the same loop with raysearch's preprocessing (JPEG draft decoding, EXIF, its resize),
               the baseline of the earlier RESULTS.md figures
  decode       raysearch's read + decode + resize alone, one process: images/s and CPU ms/image
  model        the model alone on pre-decoded pixels with raysearch's fast settings (the ceiling):
               one process with --threads threads and --threads processes of one thread each
               (started together, timed together), at each of --model-batch-sizes images per
               forward pass; the ceiling is the best of them
  pipeline     `embed_source` with Ray already running ("warm"): the stage-cost probe, the actors'
               start and model load and the last part's write are inside the timed window
  steady       the pipeline's rate with those fixed costs cancelled: (n - n/4) / (t(n) - t(n/4)),
               from a run on the set's first quarter and the same repeat's `pipeline` run
  cold         `embed_source` in a fresh process, `ray.init` included (a first `raysearch build`)
  before       `embed_source` with RAYSEARCH_EMBED_FAST=0's settings: the pipeline before the fast
               settings (fixed stage sizing, no batch-norm folding, batch 32), Ray running
Also: the pipeline's vectors against the float32 NCHW reference (min cosine), the machine's
1-minute load average during each measurement (the machine may be shared), and where the
`pipeline` runs' CPU time went (with psutil installed): the model actors, the decode tasks, the
part writer, the driver, every other process, and idle, as shares of one core and CPU ms/image;
on CPUs, the most a pipeline can reach when decoding and the model share the same CPUs (decode
CPU ms/image plus the ceiling's, every cycle busy).

Usage:
  python benchmarks/embed.py [--small 2000] [--large 300] [--repeats 3] [--threads 2] [--batch-size N]
         [--plain-seconds 60] [--variants plain,plain_draft,decode,model,pipeline,steady,cold,before]
         [--workdir DIR] [--json OUT]
  python benchmarks/embed.py --save-photos DIR [--count 16]   # a few photographs to carry elsewhere
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

# Dense bf16 tensor-core peaks in TFLOP/s (vendors' data sheets, no sparsity), by name part.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}
VARIANTS = ("plain", "plain_draft", "decode", "model", "pipeline", "steady", "cold", "before")
CPU_MODEL_BATCHES = (2, 4, 8, 16, 32)   # the model-only sweep on CPUs: the ceiling is its best
LARGE_SIZE = (4000, 3000)
GRAIN_SIGMA = 4.0


# ---------------------------------------------------------------------------------------------
# Photographs
# ---------------------------------------------------------------------------------------------


def seed_photographs(photos_dir: str | None) -> list[np.ndarray]:
    """The photographs to cut from: every image file of `photos_dir`, else photos.py's train group."""
    from PIL import Image

    if photos_dir:
        names = sorted(f for f in os.listdir(photos_dir) if f.lower().endswith((".jpg", ".jpeg", ".png")))
        if not names:
            raise SystemExit(f"error: no .jpg/.png photographs in {photos_dir}")
        return [np.asarray(Image.open(os.path.join(photos_dir, f)).convert("RGB")) for f in names]
    from photos import photographs

    return list(photographs("train").values())


def save_photos(folder: str, count: int, max_side: int = 1024) -> None:
    """Write `count` train photographs (at most max_side pixels) as JPEGs: a seed small enough to
    carry to a machine without the Debian packages (benchmarks/device_check.sh uses it)."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    photos = seed_photographs(None)
    step = max(1, len(photos) // count)
    for i, arr in enumerate(photos[::step][:count]):
        img = Image.fromarray(arr)
        img.thumbnail((max_side, max_side), Image.BICUBIC)
        img.save(os.path.join(folder, f"train{i:03d}.jpg"), quality=92)
    print(f"{min(count, len(photos[::step]))} photographs in {folder}")


_SEEDS: list[np.ndarray] = []   # the photographs, inherited by the forked writer processes


def _write_small(task: tuple[int, str, int]) -> None:
    from PIL import Image

    index, path, seed = task
    arr = _SEEDS[index % len(_SEEDS)]
    rng = np.random.default_rng(seed)
    h, w = arr.shape[:2]
    area, aspect = rng.uniform(0.3e6, 0.5e6), rng.uniform(0.75, 4 / 3)
    ch, cw = int(round((area / aspect) ** 0.5)), int(round((area * aspect) ** 0.5))
    scale = min(1.0, h / ch, w / cw)      # a photograph smaller than the crop: a smaller crop
    ch, cw = max(32, int(ch * scale)), max(32, int(cw * scale))
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    Image.fromarray(arr[top:top + ch, left:left + cw]).save(path, quality=90)


def _write_large(task: tuple[int, str, int]) -> None:
    from PIL import Image

    index, path, seed = task
    arr = _SEEDS[index % len(_SEEDS)]
    size = LARGE_SIZE if arr.shape[1] >= arr.shape[0] else LARGE_SIZE[::-1]
    big = np.asarray(Image.fromarray(arr).resize(size, Image.BICUBIC), dtype=np.int16)
    grain = np.random.default_rng(seed).normal(0.0, GRAIN_SIGMA, big.shape).round().astype(np.int16)
    Image.fromarray(np.clip(big + grain, 0, 255).astype(np.uint8)).save(path, quality=92)


def make_set(folder: str, kind: str, n: int, photos_dir: str | None) -> list[str]:
    """n JPEGs of `kind` ("small" or "large") in folder, written once (a folder written with more
    images of the same kind and photographs is reused: its first n); returns their sorted paths."""
    import glob
    import multiprocessing

    source = os.path.basename(os.path.normpath(photos_dir)) if photos_dir else "train"
    done = [int(m.split("-")[2]) for m in (os.path.basename(x) for x in glob.glob(os.path.join(folder, f".done-{kind}-*")))
            if m.endswith(f"-{source}")]
    if not any(m >= n for m in done):
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        _SEEDS[:] = seed_photographs(photos_dir)
        tasks = [(i, os.path.join(folder, f"{kind}{i:05d}.jpg"), i) for i in range(n)]
        with ProcessPoolExecutor(os.cpu_count() or 1, mp_context=multiprocessing.get_context("fork")) as pool:
            list(pool.map(_write_small if kind == "small" else _write_large, tasks, chunksize=16))
        open(os.path.join(folder, f".done-{kind}-{n}-{source}"), "w").close()
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".jpg"))[:n]


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------


def _user_pixels(path: str, size: int) -> "np.ndarray":
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB").resize((size, size), Image.BICUBIC))


def _raysearch_pixels(path: str, size: int, resize: str) -> "np.ndarray":
    from raysearch.images import decode_image, resize_image

    with open(path, "rb") as f:
        return resize_image(decode_image(f.read(), draft_size=size), size, resize)  # type: ignore[arg-type]


def plain_loop(paths: list[str], batch_size: int, threads: int, device: str, draft: bool,
               max_seconds: float = 0.0) -> dict:
    """A single-process loop: read, decode, resize, embed in float32 NCHW, batch after batch (until
    `max_seconds` have passed, when given: the rate is then over the images done)."""
    import torch

    from raysearch.models import ModelConfig, build_model, resolve_model

    torch.set_num_threads(threads)
    start = time.perf_counter()
    spec = resolve_model(ModelConfig())
    model = build_model(spec, device)
    out, done = [], 0
    with torch.no_grad():
        for i in range(0, len(paths), batch_size):
            chunk = paths[i:i + batch_size]
            if draft:
                pixels = [_raysearch_pixels(p, spec.input_size, spec.resize) for p in chunk]
            else:
                pixels = [_user_pixels(p, spec.input_size) for p in chunk]
            # What torchvision's ToTensor gives: one contiguous CHW float tensor per image.
            x = torch.stack([torch.from_numpy(p).permute(2, 0, 1).contiguous().float().div_(255.0) for p in pixels])
            out.append(model(x.to(device)).float().cpu().numpy())
            done += len(chunk)
            if max_seconds and time.perf_counter() - start > max_seconds:
                break
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "n": done, "vectors": np.concatenate(out), "paths": paths[:done]}


def decode_only(paths: list[str], max_seconds: float = 0.0) -> dict:
    """raysearch's read + decode + resize in this process, image after image."""
    from raysearch.models import ModelConfig, resolve_model

    spec = resolve_model(ModelConfig())
    _raysearch_pixels(paths[0], spec.input_size, spec.resize)   # PIL's plugins load on first use
    start, cpu, done = time.perf_counter(), time.process_time(), 0
    for p in paths:
        _raysearch_pixels(p, spec.input_size, spec.resize)
        done += 1
        if max_seconds and time.perf_counter() - start > max_seconds:
            break
    return {"seconds": time.perf_counter() - start, "n": done,
            "cpu_ms_per_image": 1e3 * (time.process_time() - cpu) / done}


def _model_child(pixels_path: str, threads: int, batch_sizes: list[int], device: str, seconds: float,
                 fast: bool) -> None:
    """Child process of `model_only`: for each batch size, warm up, say ready, wait for "go",
    embed for `seconds`, print the count."""
    import torch

    from raysearch.models import ModelConfig, resolve_model
    from raysearch.models.embedder import Embedder

    torch.set_num_threads(threads)
    base = np.load(pixels_path)
    embedder = Embedder(resolve_model(ModelConfig()).to_dict(), device=device, fast=fast)
    for batch_size in batch_sizes:
        embedder.forward_batch = batch_size   # one forward pass of exactly this many images
        pixels = np.concatenate([base] * max(1, -(-batch_size // len(base))))[:batch_size]
        embedder.embed_pixels(pixels)
        embedder.embed_pixels(pixels)
        print("ready", flush=True)
        sys.stdin.readline()
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            embedder.embed_pixels(pixels)
            n += len(pixels)
        print(json.dumps({"n": n, "seconds": time.perf_counter() - start}), flush=True)


def model_only(pixels_path: str, processes: int, threads: int, batch_sizes: list[int], device: str,
               seconds: float, fast: bool = True, env: dict | None = None) -> list[dict]:
    """Aggregate images/s of `processes` model processes of `threads` threads, started together,
    for each batch size in turn (the processes load the model once)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child-model", pixels_path, "--threads", str(threads),
           "--model-batch-sizes", ",".join(map(str, batch_sizes)), "--device", device, "--seconds", str(seconds),
           "--fast", str(int(fast))]
    children = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 env={**os.environ, **(env or {})}) for _ in range(processes)]
    out = []
    for _ in batch_sizes:
        for c in children:
            if c.stdout.readline().strip() != "ready":  # type: ignore[union-attr]
                raise RuntimeError("a model-only process failed to start")
        for c in children:
            c.stdin.write("go\n")  # type: ignore[union-attr]
            c.stdin.flush()  # type: ignore[union-attr]
        results = [json.loads(c.stdout.readline()) for c in children]  # type: ignore[union-attr]
        out.append({"seconds": max(r["seconds"] for r in results), "n": sum(r["n"] for r in results),
                    "rate": sum(r["n"] / r["seconds"] for r in results)})
    for c in children:
        c.communicate()
    return out


_COLD = """
import json, sys, time
start = time.perf_counter()
from raysearch.embed import EmbedConfig, embed_source
from raysearch.runtime import ensure_ray
ensure_ray(num_cpus=int(sys.argv[4]))
s = embed_source(sys.argv[1], sys.argv[2], EmbedConfig(batch_size=int(sys.argv[3]) or None, progress=False))
print(json.dumps({"seconds": time.perf_counter() - start, "n": s.n_embedded}))
"""


class CpuShares:
    """CPU seconds each part of the pipeline used while the `with` block ran, from every process's
    CPU time (psutil) sampled every `interval` s: a sample's growth is charged to the role its
    process title then names (Ray titles a worker by the stage it runs), this process is the
    driver, and every other process (Ray's own, other programs) is "other". What the CPUs had left
    is "idle". A process that ends loses its last interval at most."""

    ROLES = (("model actors", "MapBatches(EmbedStage)"), ("decode tasks", "MapBatches(load_and_decode)"),
             ("part writer", "MapBatches(PartWriter)"))

    def __init__(self, cpus: int, interval: float = 0.5):
        import psutil

        self.psutil, self.cpus, self.interval = psutil, cpus, interval
        self.seconds: dict[str, float] = {}
        self.wall = 0.0

    def _sample(self) -> dict[int, tuple[str, float]]:
        out = {}
        for proc in self.psutil.process_iter(["cmdline", "cpu_times"]):
            times, cmd = proc.info["cpu_times"], " ".join(proc.info["cmdline"] or [])
            if times is None:
                continue
            role = "driver" if proc.pid == os.getpid() else next((r for r, key in self.ROLES if key in cmd), "other")
            out[proc.pid] = (role, times.user + times.system)
        return out

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._charge(self._sample())

    def _charge(self, now: dict[int, tuple[str, float]]) -> None:
        for pid, (role, cpu) in now.items():
            self.seconds[role] = self.seconds.get(role, 0.0) + cpu - self._last.get(pid, 0.0)
            self._last[pid] = cpu

    def __enter__(self) -> "CpuShares":
        import threading

        self._last = {pid: cpu for pid, (_, cpu) in self._sample().items()}
        self._stop, self._start = threading.Event(), time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._charge(self._sample())
        self.wall = time.perf_counter() - self._start
        self.seconds["idle"] = max(0.0, self.cpus * self.wall - sum(self.seconds.values()))


def pipeline(folder: str, work: str, batch_size: int | None, fast: bool, cpus: int) -> dict:
    from contextlib import nullcontext

    from raysearch.embed import EmbedConfig, embed_source

    shutil.rmtree(work, ignore_errors=True)
    try:
        shares = CpuShares(cpus)
    except ImportError:   # psutil is optional: the rates are measured without it
        shares = None
    start = time.perf_counter()
    with shares or nullcontext():
        s = embed_source(folder, work, EmbedConfig(batch_size=batch_size, progress=False, fast=fast))
    out = {"seconds": time.perf_counter() - start, "n": s.n_embedded}
    if shares:
        out["cpu_seconds"] = shares.seconds
    return out


def cold(folder: str, work: str, batch_size: int | None, cpus: int) -> dict:
    shutil.rmtree(work, ignore_errors=True)
    out = subprocess.run(
        [sys.executable, "-c", _COLD, folder, work, str(batch_size or 0), str(cpus)],
        check=True, capture_output=True, text=True, cwd=os.path.dirname(HERE),
    ).stdout.strip().splitlines()[-1]
    return json.loads(out)


def flops_per_image(input_size: int = 224) -> float:
    """Floating-point operations of one forward pass (convolutions and matrix products, 2 per
    multiply-add), counted by torch's FlopCounterMode."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from raysearch.models import ModelConfig, build_model, resolve_model

    model = build_model(resolve_model(ModelConfig()))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, input_size, input_size))
    return float(counter.get_total_flops())


def bf16_peak(name: str) -> float | None:
    """The GPU's dense bf16 peak in FLOP/s (BF16_PEAK_TFLOPS, or $BF16_PEAK_TFLOPS), None if unknown."""
    if os.environ.get("BF16_PEAK_TFLOPS"):
        return float(os.environ["BF16_PEAK_TFLOPS"]) * 1e12
    for key, tflops in BF16_PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def min_cosine_to(reference: dict[str, np.ndarray], embeddings_dir: str) -> float:
    """Smallest cosine between the pipeline's vectors and the reference's, matched by image_id."""
    import pyarrow as pa

    from raysearch.formats.embeddings import embeddings_matrix, list_parts, read_part

    tbl = pa.concat_tables(read_part(p) for p in list_parts(embeddings_dir))
    got = embeddings_matrix(tbl)
    names = [i.rsplit("/", 1)[-1] for i in tbl.column("image_id").to_pylist()]
    keep = [j for j, name in enumerate(names) if name in reference]
    ref = np.stack([reference[names[j]] for j in keep])
    return float((got[keep] * ref).sum(axis=1).min())


BF16_EDITS = ("crop", "rotate", "color_jitter", "blur", "jpeg", "text", "combo")


def bf16_recall(paths: list[str], n_queries: int, device: str, batch_size: int = 32) -> dict:
    """What bf16 autocast (the GPU's setting) does to copy detection: recall@1 of edited copies of
    the first `n_queries` of `paths` among all of `paths`, exact inner-product search, with float32
    NCHW vectors, bf16 vectors (on the CPU, its bf16 autocast stands in for the GPU's), and float32
    references searched with bf16 queries (an index built on CPUs, queried from a GPU)."""
    import torch
    from PIL import Image

    from raysearch.edits import apply_edit
    from raysearch.images import resize_image
    from raysearch.models import ModelConfig, build_model, resolve_model

    spec = resolve_model(ModelConfig())
    refs = np.stack([_raysearch_pixels(p, spec.input_size, spec.resize) for p in paths])
    queries, truth = [], []
    for i, p in enumerate(paths[:n_queries]):
        with Image.open(p) as img:
            img = img.convert("RGB")
            for e, name in enumerate(BF16_EDITS):
                edited = np.asarray(apply_edit(name, img, seed=1000 * i + e))
                queries.append(resize_image(edited, spec.input_size, spec.resize))  # type: ignore[arg-type]
                truth.append(i)
    qs = np.stack(queries)
    plain = build_model(spec, device)
    fast = build_model(spec, device, for_inference=True)

    def embed(model, pixels: np.ndarray, bf16: bool) -> np.ndarray:
        out = []
        kind = torch.device(device).type
        with torch.no_grad(), torch.autocast(kind, dtype=torch.bfloat16, enabled=bf16):
            for k in range(0, len(pixels), batch_size):
                x = torch.from_numpy(pixels[k:k + batch_size]).to(device).permute(0, 3, 1, 2).float().div_(255.0)
                x = x.contiguous(memory_format=torch.channels_last) if bf16 else x.contiguous()
                out.append(model(x).float().cpu().numpy())
        return np.concatenate(out)

    xb32, xq32 = embed(plain, refs, False), embed(plain, qs, False)
    xb16, xq16 = embed(fast, refs, True), embed(fast, qs, True)
    truth_a = np.asarray(truth)

    def recall(xb: np.ndarray, xq: np.ndarray) -> tuple[float, np.ndarray]:
        top = (xq @ xb.T).argmax(axis=1)
        return float((top == truth_a).mean()), top

    r32, top32 = recall(xb32, xq32)
    r16, top16 = recall(xb16, xq16)
    rmix, _ = recall(xb32, xq16)
    cos = np.concatenate([(xb32 * xb16).sum(1), (xq32 * xq16).sum(1)])
    return {"references": len(refs), "queries": len(qs), "recall_fp32": r32, "recall_bf16": r16,
            "recall_fp32_refs_bf16_queries": rmix, "same_top1": float((top32 == top16).mean()),
            "cosine_min": float(cos.min()), "cosine_median": float(np.median(cos)),
            "cosine_p01": float(np.percentile(cos, 1))}


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", type=int, default=2000, help="small photographs (0 to skip the set)")
    ap.add_argument("--large", type=int, default=300, help="12 MP photographs (0 to skip the set)")
    ap.add_argument("--plain-seconds", type=float, default=0.0,
                    help="stop the plain loops and decode-only after this long (0: all images); rates are over the images done")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=None,
                    help="images per forward pass (default: raysearch's, 4 on CPU; the plain loop uses 32)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="torch threads (plain) = CPUs given to Ray")
    ap.add_argument("--device", default="cpu", help="cpu or cuda: where the plain loops and the model-only runs embed")
    ap.add_argument("--model-batch-sizes", default=None,
                    help="comma-separated batch sizes for the model-only runs (default: 2,4,8,16,32 on CPU, the pipeline's on GPU)")
    ap.add_argument("--seconds", type=float, default=8.0, help="length of each model-only run")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--photos", default=None, help="folder of photographs to cut from (default: photos.py's train group)")
    ap.add_argument("--workdir", default=None, help="keeps the generated JPEGs between runs")
    ap.add_argument("--json", default=None)
    ap.add_argument("--bf16-check", type=int, default=0, metavar="N",
                    help="only measure bf16's effect on recall@1: edited copies of N small photographs")
    ap.add_argument("--save-photos", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--count", type=int, default=16, help=argparse.SUPPRESS)
    ap.add_argument("--child-model", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--fast", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_model:
        _model_child(args.child_model, args.threads, [int(b) for b in args.model_batch_sizes.split(",")],
                     args.device, args.seconds, bool(args.fast))
        return
    if args.save_photos:
        save_photos(args.save_photos, args.count)
        return
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"error: unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    if "steady" in variants and "pipeline" not in variants:
        raise SystemExit("error: --variants steady needs pipeline too (its rate is the difference of the two runs)")

    from raysearch.embed import CPU_BATCH_SIZE, gpu_batch_size
    from raysearch.runtime import ensure_ray

    work = args.workdir or tempfile.mkdtemp(prefix="rs-bench-embed-")
    if args.bf16_check:
        import torch

        torch.set_num_threads(args.threads)
        paths = make_set(os.path.join(work, "small"), "small", args.small, args.photos)
        res = bf16_recall(paths, args.bf16_check, args.device)
        print(f"bf16 vs float32 on {args.device}: {res['references']} references, {res['queries']} edited queries "
              f"({', '.join(BF16_EDITS)})")
        print(f"  recall@1 float32 {res['recall_fp32']:.4f}, bf16 {res['recall_bf16']:.4f}, float32 references "
              f"with bf16 queries {res['recall_fp32_refs_bf16_queries']:.4f}; same top-1 {res['same_top1']:.4f}")
        print(f"  cosine bf16 vs float32: min {res['cosine_min']:.5f}, 1st percentile {res['cosine_p01']:.5f}, "
              f"median {res['cosine_median']:.5f}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"machine": platform.processor(), "date": time.strftime("%Y-%m-%d"),
                           "command": " ".join(sys.argv), **res}, f, indent=2)
        return
    sets = {k: make_set(os.path.join(work, k), k, n, args.photos) for k, n in (("small", args.small), ("large", args.large)) if n}
    lists, quarters = {}, {}   # the pipeline's SOURCEs: list files of the set, and of its first quarter
    for kind, paths in sets.items():
        for out, chosen in ((lists, paths), (quarters, paths[:max(1, len(paths) // 4)])):
            out[kind] = os.path.join(work, f"{kind}-{len(chosen)}.txt")
            with open(out[kind], "w") as f:
                f.write("\n".join(chosen) + "\n")
    on_gpu = args.device.startswith("cuda")
    pipe_batch = args.batch_size or (gpu_batch_size(224) if on_gpu else CPU_BATCH_SIZE)
    if args.model_batch_sizes:
        model_batches = [int(b) for b in args.model_batch_sizes.split(",")]
    else:
        model_batches = [pipe_batch] if on_gpu else sorted(set(CPU_MODEL_BATCHES) | {pipe_batch})
    pixels_path = os.path.join(work, "pixels.npy")
    first = next(iter(sets.values()))
    np.save(pixels_path, np.stack([_raysearch_pixels(p, 224, "squash") for p in first[:64]]))

    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    if on_gpu:
        import torch

        machine += f", {torch.cuda.get_device_name(0)}"
    print(f"machine: {machine}; python {platform.python_version()}; {time.strftime('%Y-%m-%d %H:%M')}")
    for k, paths in sets.items():
        mb = sum(os.path.getsize(p) for p in paths) / len(paths) / 1e6
        print(f"{k}: {len(paths)} JPEGs, {mb:.2f} MB each on average")
    print(f"batch {pipe_batch}, {args.threads} threads / CPUs for Ray, model-only batches {model_batches}, "
          f"variants {variants}, {args.repeats} repeats", flush=True)

    ensure_ray(num_cpus=args.threads)
    runs: dict[str, dict[str, list[dict]]] = {k: {} for k in sets}
    runs["model"] = {}
    loads: list[float] = []
    cosines: dict[str, list[float]] = {k: [] for k in sets}
    references: dict[str, dict[str, np.ndarray]] = {}

    def record(where: str, name: str, result: dict) -> None:
        result.pop("vectors", None)
        result["load"] = os.getloadavg()[0]
        loads.append(result["load"])
        rate = result.get("rate") or result["n"] / result["seconds"]
        result["rate"] = rate
        runs[where].setdefault(name, []).append(result)
        print(f"  {where:5s} {name:28s} {rate:8.1f} img/s  (load {result['load']:.1f})", flush=True)

    for r in range(args.repeats):
        print(f"repeat {r + 1}", flush=True)
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for v in order:
            if v == "model":
                configs = [(1, args.threads, True, {}, "")]
                if not on_gpu and args.threads > 1:
                    configs += [(1, args.threads, True, {"OMP_WAIT_POLICY": "PASSIVE"}, ", OMP passive"),
                                (args.threads, 1, True, {}, "")]
                if on_gpu:   # the GPU's rate before: float32, batch norms unfolded
                    configs.append((1, args.threads, False, {}, ", float32 before"))
                for procs, threads, fast, env, label in configs:
                    results = model_only(pixels_path, procs, threads, model_batches, args.device, args.seconds,
                                         fast, env)
                    for b, res in zip(model_batches, results):
                        record("model", f"{procs}x{threads} threads, batch {b}{label}", res)
                continue
            for kind, paths in sets.items():
                folder = lists[kind]
                if v in ("plain", "plain_draft"):
                    res = plain_loop(paths, 32, args.threads, args.device, v == "plain_draft", args.plain_seconds)
                    if v == "plain_draft" and kind not in references:
                        references[kind] = {os.path.splitext(os.path.basename(p))[0]: vec
                                            for p, vec in zip(res["paths"], res["vectors"])}
                    res.pop("paths")
                    record(kind, v, res)
                elif v == "decode":
                    record(kind, v, decode_only(paths, args.plain_seconds))
                elif v in ("pipeline", "before"):
                    out = os.path.join(work, f"emb-{kind}-{v}")
                    record(kind, v, pipeline(folder, out, args.batch_size, v == "pipeline", args.threads))
                    if v == "pipeline" and kind in references:
                        cosines[kind].append(min_cosine_to(references[kind], out))
                elif v == "steady":
                    # The first quarter; its rate is combined with this repeat's pipeline run below.
                    out = os.path.join(work, f"emb-{kind}-quarter")
                    record(kind, "quarter", pipeline(quarters[kind], out, args.batch_size, True, args.threads))
                elif v == "cold":
                    record(kind, v, cold(folder, os.path.join(work, f"emb-{kind}-cold"), args.batch_size, args.threads))

    summary: dict = {"machine": machine, "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
                     "load_median": statistics.median(loads), "load_max": max(loads), "sets": {}}
    print(f"\nmedians of {args.repeats} (1-minute load average during the runs: median {summary['load_median']:.1f}, "
          f"max {summary['load_max']:.1f}, on {os.cpu_count()} CPUs)")
    model_rates = {name: statistics.median(x["rate"] for x in rs) for name, rs in runs["model"].items()}
    fast_rates = {k: v for k, v in model_rates.items() if "float32" not in k}
    ceiling = max(fast_rates.values()) if fast_rates else None
    flops = flops_per_image() if on_gpu and model_rates else None
    peak = bf16_peak(machine) if on_gpu else None
    for name, rate in model_rates.items():
        extra = ""
        if flops:
            extra = f"  {rate * flops / 1e12:.1f} TFLOP/s" + (f" = {rate * flops / peak:.1%} of the bf16 peak" if peak else "")
        print(f"  model only {name:28s} {rate:8.1f} img/s{extra}")
    if ceiling:
        print(f"  the ceiling: {max(fast_rates, key=fast_rates.get)}, {ceiling:.1f} img/s")
    if flops:
        summary["flops_per_image"] = flops
        summary["bf16_peak_flops"] = peak
    for kind in sets:
        full, quarter = runs[kind].get("pipeline", []), runs[kind].pop("quarter", [])
        if full and quarter:
            # Fixed costs (probe, actor start, model load, the last write) are in both runs: the
            # difference of the two is the images/s of the pipeline once running.
            # A repeat where the quarter took as long as the whole (a disturbed machine) gives none.
            runs[kind]["steady"] = [
                {"n": a["n"] - b["n"], "seconds": a["seconds"] - b["seconds"], "load": max(a["load"], b["load"]),
                 "rate": (a["n"] - b["n"]) / (a["seconds"] - b["seconds"]),
                 "fixed_seconds": a["seconds"] - a["n"] * (a["seconds"] - b["seconds"]) / (a["n"] - b["n"])}
                for a, b in zip(full, quarter) if a["n"] > b["n"] and a["seconds"] > b["seconds"]]
        med = {name: statistics.median(x["rate"] for x in rs) for name, rs in runs[kind].items() if rs}
        print(f"{kind}:")
        for name, rate in med.items():
            ratios = []
            for base in ("plain", "plain_draft"):
                if base in med and name != base:
                    ratios.append(f"{rate / med[base]:.2f}x {base}")
            if ceiling and name in ("pipeline", "steady", "cold", "before"):
                ratios.append(f"{rate / ceiling:.2f}x model-only")
            extra = ""
            if name == "decode":
                extra = f"  ({statistics.median(x['cpu_ms_per_image'] for x in runs[kind][name]):.1f} CPU ms/image)"
            if name == "steady":
                extra = f"  (fixed costs {statistics.median(x['fixed_seconds'] for x in runs[kind][name]):.1f} s a run)"
            print(f"  {name:12s} {rate:8.1f} img/s  {', '.join(ratios)}{extra}")
        cpu_runs = [x for x in runs[kind].get("pipeline", []) if "cpu_seconds" in x]
        if cpu_runs:
            # Where the pipeline's CPU time went (medians over the repeats): each role's share of
            # one core over the run, and CPU ms per image for the two stages.
            roles = sorted({r for x in cpu_runs for r in x["cpu_seconds"]}, key=lambda r: -cpu_runs[0]["cpu_seconds"].get(r, 0))
            parts = []
            for role in roles:
                share = statistics.median(x["cpu_seconds"].get(role, 0.0) / x["seconds"] for x in cpu_runs)
                per_image = statistics.median(1e3 * x["cpu_seconds"].get(role, 0.0) / x["n"] for x in cpu_runs)
                parts.append(f"{role} {share:.0%} of a core" + (f" ({per_image:.1f} ms/image)" if role in
                                                                  ("model actors", "decode tasks") else ""))
            print(f"  pipeline CPU: {', '.join(parts)}")
            if ceiling and not on_gpu:
                print(f"  model-only ceiling: {1e3 * args.threads / ceiling:.1f} CPU ms/image over {args.threads} CPUs")
        if ceiling and not on_gpu and "decode" in med:
            # Decoding and the model on the same CPUs: every cycle busy with one or the other.
            decode_ms = statistics.median(x["cpu_ms_per_image"] for x in runs[kind]["decode"])
            bound = 1e3 * args.threads / (decode_ms + 1e3 * args.threads / ceiling)
            print(f"  decode + model sharing {args.threads} CPUs: at most {bound:.1f} img/s ({bound / ceiling:.2f}x model-only)")
            summary.setdefault("shared_cpu_bound", {})[kind] = bound
        if cosines[kind]:
            print(f"  pipeline vs float32 NCHW reference: min cosine {min(cosines[kind]):.7f}")
        summary["sets"][kind] = {"medians": med, "min_cosine": min(cosines[kind]) if cosines[kind] else None}
    summary["model_only"] = model_rates
    summary["runs"] = runs
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
