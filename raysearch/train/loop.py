"""`train_loop_per_worker`: what each Ray Train worker runs.

Every worker builds the same network (seeded), resumes from `ray.train.get_checkpoint()` when the
run has one, wraps the network with `ray.train.torch.prepare_model` (DDP: gradients are averaged
across workers in backward), reads its own shard with `ray.train.get_dataset_shard("train")`, makes
views, and steps. Workers agree on every decision that changes how many steps they take (a shard ran
dry, the time budget is spent) through one tiny all-reduce per step, because a DDP worker that stops
alone leaves the others waiting forever. Rank 0 writes the checkpoints; all workers call
`ray.train.report`, which is a barrier.

A checkpoint folder holds state.pt (model, optimiser, scheduler, progress), loss.csv (one row per
step so far) and epochs.json (one record per finished epoch).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import queue
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from raysearch.train.config import TrainConfig
from raysearch.train.model import InitModel, InputNormalizer, build_descriptor_net, set_projection
from raysearch.train.objectives import TERMS, objective_loss
from raysearch.train.views import ViewConfig, make_views, mix_views

STATE_FILE = "state.pt"
LOSS_FILE = "loss.csv"
EPOCHS_FILE = "epochs.json"
_DIGEST_MOD = 1 << 62


@dataclass(frozen=True)
class LoopSettings:
    """What the driver resolved for the workers (train_loop_config["loop"])."""

    config: TrainConfig
    init: InitModel
    input_size: int
    train_blocks: str
    steps_per_epoch: int
    use_gpu: bool
    # The fitted start of a whitened projection (raysearch.train.whitening.ProjectionInit), loaded
    # unless a checkpoint holds later weights.
    projection: object | None = None


@dataclass
class Progress:
    step: int = 0               # optimiser steps taken, over all epochs and invocations
    epoch: int = 0              # the epoch in progress (0-based)
    step_in_epoch: int = 0
    loss_rows: list[dict] = field(default_factory=list)
    epochs: list[dict] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)   # the step each invocation started from


def id_digest(image_ids: list[str]) -> int:
    """Order-independent digest of a multiset of ids: the sum of their 62-bit hashes mod 2^62.
    Shards that partition a set of images have digests that add up to the set's digest."""
    total = 0
    for image_id in image_ids:
        h = hashlib.blake2b(str(image_id).encode(), digest_size=8).digest()
        total = (total + (int.from_bytes(h, "little") >> 2)) % _DIGEST_MOD
    return total


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up from 0, then cosine decay to 0 at `total_steps`."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup_steps) / span)))


def loss_columns(objective: str) -> tuple[str, ...]:
    return ("step", "epoch", "loss", *TERMS[objective], "lr", "images", "seconds")


def write_loss_csv(rows: list[dict], objective: str) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=loss_columns(objective), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().encode("utf-8")


def read_loss_csv(data: bytes) -> list[dict]:
    rows = []
    for row in csv.DictReader(io.StringIO(data.decode("utf-8"))):
        rows.append({k: (int(v) if k in ("step", "epoch", "images") else float(v)) for k, v in row.items()})
    return rows


def load_checkpoint_dir(folder: str) -> tuple[dict, Progress]:
    """(torch state: model/optimizer/scheduler, progress) from a checkpoint folder."""
    state = torch.load(os.path.join(folder, STATE_FILE), map_location="cpu", weights_only=True)
    with open(os.path.join(folder, LOSS_FILE), "rb") as f:
        rows = read_loss_csv(f.read())
    with open(os.path.join(folder, EPOCHS_FILE)) as f:
        epochs = json.load(f)
    p = state["progress"]
    return state, Progress(p["step"], p["epoch"], p["step_in_epoch"], rows, epochs, list(p["starts"]))


@dataclass
class _Prepared:
    pixels: np.ndarray | None    # (N, S, S, 3) uint8 views, None when no row of the batch was usable
    membership: np.ndarray       # (N, K) float32
    labels: np.ndarray           # (N,) int64
    image_ids: list[str]         # every row of the batch, usable or not
    n_images: int
    n_bad: int


def _prepare(batch: dict, views: ViewConfig, seed: int, epoch: int, rng: np.random.Generator) -> _Prepared:
    errors = batch["error"]
    ids = [str(i) for i in batch["image_id"]]
    good = [i for i, e in enumerate(errors) if not e]
    if not good:
        return _Prepared(None, np.zeros((0, 0), np.float32), np.zeros(0, np.int64), ids, 0, len(ids))
    images = [np.asarray(batch["pixels"][i], dtype=np.uint8) for i in good]
    good_ids = [ids[i] for i in good]
    v = make_views(images, good_ids, views, seed, epoch)
    pixels, membership = mix_views(v, len(good), views, rng)
    labels = np.asarray(batch["label"], dtype=np.int64)[good][v.instance]
    return _Prepared(pixels, membership, labels, ids, len(good), len(ids) - len(good))


class _Background:
    """Runs an iterator in a thread, `depth` items ahead, so that views are made (PIL releases the
    GIL) while the network steps. `close()` stops it and waits for the thread."""

    _END = object()

    def __init__(self, items: Iterator, depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(items,), daemon=True)
        self._thread.start()

    def _run(self, items: Iterator) -> None:
        try:
            for item in items:
                if self._stop.is_set():
                    return
                self._put(item)
        except BaseException as e:  # re-raised in the consumer
            self._error = e
        self._put(self._END)

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def next(self):
        """The next item, or None at the end."""
        item = self._queue.get()
        if item is self._END:
            if self._error is not None:
                raise self._error
            return None
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def _all_reduce(values: list[float], device: torch.device) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.cpu().tolist()


def _all_gather(values: list[float], device: torch.device, dtype: torch.dtype = torch.float64) -> list[list]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=dtype, device=device)
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return [t.cpu().tolist()]
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [o.cpu().tolist() for o in out]


def _parameter_fingerprint(params: list[torch.nn.Parameter]) -> list[float]:
    # Two sums per tensor: replicas that drifted apart differ in them (bitwise, for DDP replicas).
    with torch.no_grad():
        return [v for p in params for v in (float(p.double().sum()), float(p.double().abs().sum()))]


def node_cpus() -> int:
    """The CPUs Ray counts on this worker's node (cgroup limits included), or the process's."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node.get("NodeID") == node_id:
            return max(1, int(node.get("Resources", {}).get("CPU", 0)) or 1)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def train_loop_per_worker(loop_config: dict) -> None:
    """The Ray Train worker function; loop_config = {"loop": LoopSettings}."""
    import ray.train
    import ray.train.torch

    s: LoopSettings = loop_config["loop"]
    cfg = s.config
    start_time = time.monotonic()
    deadline = start_time + cfg.max_time if cfg.max_time else None
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    views = cfg.view_config(s.input_size)
    threads = cfg.worker_threads(s.use_gpu, node_cpus(), ctx.get_local_world_size())
    if threads:
        torch.set_num_threads(threads)

    torch.manual_seed(cfg.seed)  # the same projection initialisation on every worker
    net = build_descriptor_net(s.init, cfg.dim, cfg.gem_p, s.train_blocks, cfg.projection_init)
    if s.projection is not None:
        set_projection(net, s.projection.weight, s.projection.bias)
    progress = Progress()
    state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state, progress = load_checkpoint_dir(folder)
        net.load_state_dict(state["model"])
    progress.starts.append(progress.step)
    if cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(net)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total_steps = s.steps_per_epoch * cfg.epochs
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(0.05 * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: lr_factor(k, warmup, total_steps))
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])

    use_cuda = device.type == "cuda"
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and use_cuda)
    normalise = InputNormalizer(s.init.mean, s.init.std, device)
    shard = ray.train.get_dataset_shard("train")
    buffer = cfg.shuffle_buffer if cfg.shuffle_buffer is not None else 4 * cfg.batch_size
    log_every = max(1, s.steps_per_epoch // 10)
    last_saved_step = progress.step
    stopped = ""
    if rank == 0:
        print(f"training on {world} worker(s), {device}, {torch.get_num_threads()} torch threads each; "
              f"{s.steps_per_epoch} steps per epoch; starting at step {progress.step}", flush=True)

    def save(metrics: dict) -> None:
        nonlocal last_saved_step
        with tempfile.TemporaryDirectory() as folder:
            ckpt = None
            if rank == 0:
                torch.save({
                    "model": net.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "progress": {"step": progress.step, "epoch": progress.epoch, "step_in_epoch": progress.step_in_epoch,
                                 "starts": progress.starts},
                }, os.path.join(folder, STATE_FILE))
                with open(os.path.join(folder, LOSS_FILE), "wb") as f:
                    f.write(write_loss_csv(progress.loss_rows, cfg.objective))
                with open(os.path.join(folder, EPOCHS_FILE), "w") as f:
                    json.dump(progress.epochs, f)
                ckpt = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"checkpoint_{progress.step:08d}")
        last_saved_step = progress.step

    while progress.epoch < cfg.epochs and not stopped:
        epoch = progress.epoch
        remaining = s.steps_per_epoch - progress.step_in_epoch
        batches = shard.iter_batches(
            batch_size=cfg.batch_size, batch_format="numpy", drop_last=True, prefetch_batches=1,
            local_shuffle_buffer_size=buffer or None,
            local_shuffle_seed=(cfg.seed * 1_000_003 + epoch * 1_009 + progress.step_in_epoch * 31 + rank) % (2**31),
        )
        mix_rng = np.random.default_rng([cfg.seed, epoch, progress.step_in_epoch, rank])
        prepared = _Background(_prepare(b, views, cfg.seed, epoch, mix_rng) for b in batches)
        epoch_start = time.monotonic()
        rows = bad = images = 0
        digest = 0
        try:
            for _ in range(remaining):
                item = prepared.next()
                over_time = deadline is not None and time.monotonic() >= deadline
                have, late = _all_reduce([1.0 if item is not None else 0.0, 1.0 if over_time else 0.0], device)
                if late > 0:
                    stopped = "max_time"
                    break
                if have < world:
                    break  # a shard ran dry (it should not: shards are equal); all stop together
                t0 = time.monotonic()
                model.train()
                if item.pixels is None:
                    # No usable image in this batch: take part in DDP's all-reduce with zero gradients.
                    x = torch.zeros(2, 3, s.input_size, s.input_size, device=device)
                else:
                    x = normalise(item.pixels)
                if cfg.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
                    z = model(x)
                z = z.float()
                if item.pixels is None:
                    loss = z.sum() * 0.0
                    terms = {name: loss for name in TERMS[cfg.objective]}
                else:
                    loss, terms = objective_loss(
                        cfg, z, torch.from_numpy(item.membership).to(device), torch.from_numpy(item.labels).to(device)
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                lr = scheduler.get_last_lr()[0]
                scheduler.step()
                stats = _all_reduce([float(loss.detach()), *(float(terms[t].detach()) for t in TERMS[cfg.objective]),
                                     float(item.n_images)], device)
                progress.step += 1
                progress.step_in_epoch += 1
                rows += len(item.image_ids)
                bad += item.n_bad
                images += item.n_images
                digest = (digest + id_digest(item.image_ids)) % _DIGEST_MOD
                row = {"step": progress.step, "epoch": epoch + 1, "loss": stats[0] / world}
                row.update({t: stats[1 + k] / world for k, t in enumerate(TERMS[cfg.objective])})
                row.update({"lr": lr, "images": int(stats[-1]), "seconds": round(time.monotonic() - t0, 4)})
                progress.loss_rows.append(row)
                if rank == 0 and progress.step % log_every == 0:
                    print(f"epoch {epoch + 1}/{cfg.epochs} step {progress.step}: loss {row['loss']:.4f}", flush=True)
                if cfg.checkpoint_every and progress.step % cfg.checkpoint_every == 0 and progress.step_in_epoch < s.steps_per_epoch:
                    save({"step": progress.step, "epoch": epoch + 1, "loss": row["loss"], "finished": False})
        finally:
            prepared.close()

        # Per-epoch diagnostics: what each worker read (count and id digest) and whether the
        # replicas still hold the same weights (they must, if DDP averaged every gradient).
        seconds = time.monotonic() - epoch_start
        shards = _all_gather([float(rows), float(bad), float(images)], device)
        digests = _all_gather([digest], device, dtype=torch.int64)
        prints = _all_gather(_parameter_fingerprint(params), device)
        spread = max(abs(a - b) for other in prints for a, b in zip(other, prints[0])) if prints[0] else 0.0
        epoch_done = progress.step_in_epoch >= s.steps_per_epoch
        n_images = int(sum(r[2] for r in shards))
        progress.epochs.append({
            "epoch": epoch + 1, "complete": epoch_done, "step": progress.step,
            "rows": int(sum(r[0] for r in shards)), "errors": int(sum(r[1] for r in shards)), "images": n_images,
            "seconds": round(seconds, 3), "images_per_second": round(n_images / seconds, 3) if seconds > 0 else None,
            "shard_rows": [int(r[0]) for r in shards], "shard_digests": [int(d[0]) for d in digests],
            "replica_spread": spread,
            "loss": progress.loss_rows[-1]["loss"] if progress.loss_rows else None,
        })
        if epoch_done:
            progress.epoch += 1
            progress.step_in_epoch = 0
        elif not stopped:
            stopped = "data"  # a shard ran dry before the epoch's steps were done
        if rank == 0:
            e = progress.epochs[-1]
            print(f"epoch {epoch + 1}/{cfg.epochs}{'' if epoch_done else ' (stopped)'}: {e['images']} images in "
                  f"{seconds:.1f} s ({e['images_per_second']} images/s), loss {e['loss']}", flush=True)
        if progress.step > last_saved_step:
            finished = progress.epoch >= cfg.epochs
            save({"step": progress.step, "epoch": progress.epoch, "loss": progress.epochs[-1]["loss"],
                  "finished": finished, "stopped": stopped or ("epochs" if finished else "")})
