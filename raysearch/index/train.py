"""Training the index once: coarse quantiser (k-means), codebooks, pre-transforms.

Three ways to train, picked by `--train-on`:

- ``cpu``: FAISS on the CPU (all cores of the process that trains).
- ``faiss-gpu``: FAISS with its k-means on every visible GPU (needs a faiss build with GPU support).
- ``torch`` / ``torch:DEVICE``: k-means for the coarse quantiser and the PQ codebooks in PyTorch on
  DEVICE (default: CUDA when available), so a GPU speeds up training even with faiss-cpu installed.
  The centroids and codebooks are then put into the FAISS index; pre-transforms (OPQ, PCA) and
  scalar quantisers, which are cheap, are still trained by FAISS on the CPU.

``auto`` takes FAISS GPU when the installed faiss has GPUs, else torch on CUDA when torch sees one,
else the CPU. Every path is seeded: the same sample and seed give the same quantiser.

The coarse k-means, picked by `--kmeans`:

- ``flat``: Lloyd's k-means over all nlist centroids at once (FAISS's own IVF training). Its cost
  grows with nlist squared (the sample grows with nlist too), which on CPUs dominates the build of
  a large IVF.
- ``two-level``: FAISS's two-level clustering (sqrt(nlist) coarse clusters, then each split into
  sub-clusters in proportion to its size), followed by a few Lloyd iterations over all centroids.
  Runs on the CPU. On 1M x 256 vectors (2 cores) it trained 4x faster than ``flat`` with 8192 and
  16384 lists, for lists as good (the same or a smaller tuned nprobe); with 4096 lists, 2.5-3.5x
  faster, but the tuned nprobe rose from 3 to 5 (benchmarks/RESULTS.md).
- ``auto``: ``two-level`` when training on the CPU with nlist >= 8192, else ``flat``.
"""

from __future__ import annotations

import glob
import logging
import sys
import time
from dataclasses import dataclass

import faiss
import numpy as np

from raysearch.index import factory as fac

log = logging.getLogger("raysearch")

TRAIN_ON_CHOICES = ("auto", "cpu", "faiss-gpu", "torch")
# FAISS's own defaults, kept so that both trainers do the same amount of work.
IVF_KMEANS_ITER = 10
PQ_KMEANS_ITER = 25
MAX_POINTS_PER_CENTROID = 256

KMEANS_CHOICES = ("auto", "flat", "two-level")
TWO_LEVEL_MIN_NLIST = 8192     # --kmeans auto: two-level from this nlist on, on the CPU
TWO_LEVEL_REFINE_ITER = 2      # Lloyd iterations over all centroids after the two levels


@dataclass(frozen=True)
class TrainReport:
    backend: str        # "faiss-cpu", "faiss-gpu" or "torch"
    device: str         # "cpu", "cuda", "cuda:1", ...
    n_train: int
    seconds: float
    kmeans: str | None = None   # the coarse k-means that ran: "flat" or "two-level" (None: no IVF)

    def to_dict(self) -> dict:
        return {"backend": self.backend, "device": self.device, "n_train": self.n_train,
                "seconds": round(self.seconds, 3), "kmeans": self.kmeans}


def check_train_on(train_on: str) -> str:
    """Validate a --train-on value (auto, cpu, faiss-gpu, torch or torch:DEVICE)."""
    if train_on in TRAIN_ON_CHOICES or (train_on.startswith("torch:") and len(train_on) > len("torch:")):
        return train_on
    raise ValueError(f"--train-on must be one of {', '.join(TRAIN_ON_CHOICES)} or torch:DEVICE, got {train_on!r}")


def check_kmeans(kmeans: str, train_on: str = "auto") -> str:
    """Validate a --kmeans value (and its pairing with --train-on)."""
    if kmeans not in KMEANS_CHOICES:
        raise ValueError(f"--kmeans must be one of {', '.join(KMEANS_CHOICES)}, got {kmeans!r}")
    if kmeans == "two-level" and train_on not in ("auto", "cpu"):
        raise ValueError(f"--kmeans two-level trains on the CPU; it does not go with --train-on {train_on} "
                         "(use --train-on cpu or auto, or --kmeans flat)")
    return kmeans


def resolve_kmeans(kmeans: str, backend: str, nlist: int) -> str:
    """The coarse k-means to run ("flat" or "two-level") for an IVF of `nlist` lists trained on `backend`."""
    if kmeans == "auto":
        return "two-level" if backend == "faiss-cpu" and nlist >= TWO_LEVEL_MIN_NLIST else "flat"
    return kmeans


def faiss_gpus() -> int:
    """GPUs the installed faiss can use (0 for faiss-cpu)."""
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


def torch_cuda_available() -> bool:
    # On Linux a machine without /dev/nvidia* has no CUDA device: skip importing torch (seconds).
    if sys.platform.startswith("linux") and "torch" not in sys.modules and not glob.glob("/dev/nvidia[0-9]*"):
        return False
    import torch

    return bool(torch.cuda.is_available())


def resolve_train_on(train_on: str) -> tuple[str, str]:
    """--train-on -> (backend, device) for this process."""
    check_train_on(train_on)
    if train_on == "auto":
        if faiss_gpus() > 0:
            return "faiss-gpu", "cuda"
        if torch_cuda_available():
            return "torch", "cuda"
        return "faiss-cpu", "cpu"
    if train_on == "cpu":
        return "faiss-cpu", "cpu"
    if train_on == "faiss-gpu":
        if faiss_gpus() == 0:
            raise ValueError("--train-on faiss-gpu: the installed faiss sees no GPU (install faiss-gpu, or use torch)")
        return "faiss-gpu", "cuda"
    if train_on == "torch":
        return "torch", "cuda" if torch_cuda_available() else "cpu"
    return "torch", train_on.split(":", 1)[1]


def check_training_vectors(index: faiss.Index, xt: np.ndarray) -> None:
    """Raise ValueError before any training if `xt` cannot train `index`."""
    if xt.ndim != 2 or xt.shape[1] != index.d:
        raise ValueError(f"training vectors have shape {tuple(xt.shape)}, the index is {index.d}-d")
    need = fac.min_training_vectors(index)
    if xt.shape[0] < need:
        raise ValueError(
            f"the index needs at least {need} training vectors, only {xt.shape[0]} are available; "
            "choose a smaller nlist/PQ (or --index auto)"
        )
    if not np.isfinite(xt).all():
        bad = int(np.flatnonzero(~np.isfinite(xt).all(axis=1))[0])
        raise ValueError(f"training vector {bad} holds NaN or inf")


def train_index(index: faiss.Index, xt: np.ndarray, seed: int = 1234, train_on: str = "cpu",
                kmeans: str = "flat") -> TrainReport:
    """Train `index` in place on `xt` (n, d) float32. Returns which backend and k-means ran and how long."""
    start = time.perf_counter()
    xt = np.ascontiguousarray(xt, dtype=np.float32)
    if index.is_trained:
        return TrainReport("none", "cpu", 0, 0.0)
    check_kmeans(kmeans, train_on)
    check_training_vectors(index, xt)
    backend, device = ("faiss-cpu", "cpu") if kmeans == "two-level" else resolve_train_on(train_on)
    fac.set_training_seed(index, seed)
    ivf = fac.find_ivf(index)
    if ivf is not None and hasattr(faiss.downcast_index(ivf), "do_polysemous_training"):
        # The factory turns on polysemous training (a slow reordering of PQ codes for Hamming
        # pre-filtering), which raysearch's searches never use.
        faiss.downcast_index(ivf).do_polysemous_training = False
    ran = None if ivf is None else resolve_kmeans(kmeans, backend, faiss.downcast_index(ivf).nlist)
    if ran == "two-level":
        ran = _train_two_level(index, xt, seed)
    elif backend == "faiss-gpu":
        _train_faiss_gpu(index, xt)
    elif backend == "torch":
        _train_torch(index, xt, seed, device)
    else:
        index.train(xt)
    report = TrainReport(backend, device, int(xt.shape[0]), time.perf_counter() - start, ran)
    log.info("trained on %d vectors with %s (%s%s) in %.1f s", xt.shape[0], backend, device,
             f", {ran} k-means" if ran else "", report.seconds)
    return report


def train_serialized(trained_or_empty: bytes, xt: np.ndarray, seed: int, train_on: str,
                     kmeans: str = "flat") -> tuple[bytes, dict]:
    """`train_index` on a serialized index, for running as a Ray task on a GPU node."""
    index = faiss.deserialize_index(np.frombuffer(trained_or_empty, dtype=np.uint8))
    report = train_index(index, xt, seed, train_on, kmeans)
    return faiss.serialize_index(index).tobytes(), report.to_dict()


def _spherical(ivf: faiss.IndexIVF) -> bool:
    """Whether the coarse k-means of `ivf` keeps its centroids on the unit sphere (inner product)."""
    return bool(ivf.cp.spherical) or ivf.metric_type == faiss.METRIC_INNER_PRODUCT


def _train_pretransforms(index: faiss.Index, xt: np.ndarray):
    """Train the pre-transforms (OPQ, PCA: small matrices, FAISS on the CPU) of `index` if it has
    any, and return (pretransform or None, the index behind it, xt in the space that index sees)."""
    pre = fac.pretransform(index)
    if pre is None:
        return None, index, xt
    for i in range(pre.chain.size()):
        vt = pre.chain.at(i)
        if not vt.is_trained:
            vt.train(xt)
        xt = vt.apply(xt)
    return pre, faiss.downcast_index(pre.index), np.ascontiguousarray(xt, dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# Two-level coarse k-means (CPU)
# ---------------------------------------------------------------------------------------------


def two_level_centroids(xt: np.ndarray, nlist: int, seed: int, spherical: bool = False) -> np.ndarray:
    """nlist centroids of xt: FAISS's two-level clustering (sqrt(nlist) clusters, each split into
    sub-clusters in proportion to its size), then TWO_LEVEL_REFINE_ITER Lloyd iterations over all
    nlist centroids together, which mend the borders the two levels drew independently."""
    from faiss.contrib.clustering import two_level_clustering

    nc1 = max(1, int(round(np.sqrt(nlist))))
    centroids, _ = two_level_clustering(xt, nc1, nlist, clustering_niter=IVF_KMEANS_ITER, seed=seed,
                                        spherical=spherical)
    km = faiss.Kmeans(xt.shape[1], nlist, niter=TWO_LEVEL_REFINE_ITER, seed=seed + 1, spherical=spherical,
                      max_points_per_centroid=MAX_POINTS_PER_CENTROID)
    km.train(xt, init_centroids=np.ascontiguousarray(centroids, dtype=np.float32))
    return np.ascontiguousarray(km.centroids, dtype=np.float32)


def _train_two_level(index: faiss.Index, xt: np.ndarray, seed: int) -> str:
    """Coarse quantiser from `two_level_centroids`; FAISS trains the rest (codes, pre-transforms).
    Returns the k-means that ran: "flat" when the two levels could not split the sample (a first-
    level cluster too small for its share of centroids: heavily duplicated vectors)."""
    pre, inner, xs = _train_pretransforms(index, xt)
    ivf = faiss.downcast_index(fac.find_ivf(inner))
    spherical = _spherical(ivf)
    try:
        centroids = two_level_centroids(xs, ivf.nlist, seed, spherical)
    except RuntimeError as e:
        log.warning("two-level k-means failed on this sample (%s); training the flat k-means instead",
                    str(e).splitlines()[0][:200])
        inner.train(xs)
        ran = "flat"
    else:
        ivf.quantizer.reset()
        ivf.quantizer.add(centroids)
        # The quantiser now holds nlist centroids, so FAISS skips its own k-means and trains the
        # codes (PQ codebooks on the residuals, scalar quantisers) only.
        inner.train(xs)
        ran = "two-level"
    if pre is not None:
        pre.is_trained = True
    index.is_trained = True
    return ran


# ---------------------------------------------------------------------------------------------
# FAISS GPU
# ---------------------------------------------------------------------------------------------


def _train_faiss_gpu(index: faiss.Index, xt: np.ndarray) -> None:
    """Coarse k-means on all GPUs through IndexIVF.clustering_index; the rest as on the CPU."""
    ivf = fac.find_ivf(index)
    if ivf is None:
        index.train(xt)
        return
    flat = faiss.IndexFlatIP(ivf.d) if ivf.metric_type == faiss.METRIC_INNER_PRODUCT else faiss.IndexFlatL2(ivf.d)
    gpu_flat = faiss.index_cpu_to_all_gpus(flat)  # type: ignore[attr-defined]
    ivf.clustering_index = gpu_flat
    try:
        index.train(xt)
    finally:
        ivf.clustering_index = None


# ---------------------------------------------------------------------------------------------
# torch
# ---------------------------------------------------------------------------------------------


def kmeans_torch(
    x: np.ndarray,
    k: int,
    niter: int,
    seed: int,
    device: str = "cpu",
    spherical: bool = False,
    batch_rows: int = 65_536,
) -> np.ndarray:
    """Lloyd's k-means on `device` for G independent problems at once.

    x: (n, d) or (G, n, d) float32 (G = PQ sub-quantisers sharing one pass). Returns (k, d) or
    (G, k, d) float32 centroids. Initialised on k distinct random points (seeded); a centroid that
    loses all its points takes half of the largest cluster (the centroid is split in two, as FAISS
    does). Points beyond `k * MAX_POINTS_PER_CENTROID` are subsampled away, as in FAISS.
    """
    import torch

    single = x.ndim == 2
    xs = x[None] if single else x
    groups, n, d = xs.shape
    if n < k:
        raise ValueError(f"k-means needs at least k={k} points, got {n}")
    rng = np.random.default_rng(seed)
    if n > k * MAX_POINTS_PER_CENTROID:
        keep = np.sort(rng.choice(n, size=k * MAX_POINTS_PER_CENTROID, replace=False))
        xs = xs[:, keep]
        n = xs.shape[1]
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    xt = torch.from_numpy(np.ascontiguousarray(xs, dtype=np.float32)).to(device)
    init = torch.from_numpy(rng.choice(n, size=k, replace=False))
    centroids = xt[:, init.to(device)].clone()                    # (G, k, d)
    x_norms = (xt * xt).sum(-1)                                   # (G, n)
    for _ in range(niter):
        assign = _assign(xt, x_norms, centroids, batch_rows, spherical)   # (G, n) int64
        sums = torch.zeros_like(centroids)
        sums.scatter_add_(1, assign[..., None].expand(-1, -1, d), xt)
        counts = torch.zeros(groups, k, device=xt.device, dtype=torch.float32)
        counts.scatter_add_(1, assign, torch.ones_like(assign, dtype=torch.float32))
        nonempty = counts > 0
        centroids = torch.where(nonempty[..., None], sums / counts.clamp(min=1)[..., None], centroids)
        if not bool(nonempty.all()):
            _split_largest(centroids, counts, gen)
        if spherical:
            centroids = centroids / centroids.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    out = centroids.cpu().numpy().astype(np.float32)
    return out[0] if single else out


def _assign(x, x_norms, centroids, batch_rows: int, spherical: bool):
    """Nearest centroid of every point: (G, n) int64 (inner product when spherical)."""
    import torch

    c_norms = (centroids * centroids).sum(-1)                   # (G, k)
    out = []
    for lo in range(0, x.shape[1], batch_rows):
        xb = x[:, lo:lo + batch_rows]
        dots = torch.bmm(xb, centroids.transpose(1, 2))         # (G, b, k)
        if spherical:
            out.append(dots.argmax(-1))
        else:
            dist = x_norms[:, lo:lo + batch_rows, None] - 2 * dots + c_norms[:, None, :]
            out.append(dist.argmin(-1))
    return torch.cat(out, dim=1)


def _split_largest(centroids, counts, gen) -> None:
    """Give every empty cluster half of a large one: the large centroid and the empty one move a
    little apart along a random direction (in place)."""
    import torch

    eps = 1.0 / 1024
    for g in range(centroids.shape[0]):
        for j in torch.nonzero(counts[g] == 0).flatten().tolist():
            big = int(torch.argmax(counts[g]))
            noise = torch.randn(centroids.shape[-1], generator=gen).to(centroids.device)
            scale = centroids[g, big].abs().clamp(min=1e-6) * eps
            centroids[g, j] = centroids[g, big] + scale * noise
            centroids[g, big] = centroids[g, big] - scale * noise
            counts[g, j] = counts[g, big] / 2
            counts[g, big] -= counts[g, j]


def _train_torch(index: faiss.Index, xt: np.ndarray, seed: int, device: str) -> None:
    """Train with k-means in torch; the results are installed into the FAISS index."""
    pre, inner, xt = _train_pretransforms(index, xt)
    ivf = fac.find_ivf(inner)
    if ivf is None:
        log.info("torch training covers IVF indexes; training %s with FAISS on the CPU", type(inner).__name__)
        inner.train(xt)
    else:
        ivf = faiss.downcast_index(ivf)
        _train_ivf_torch(ivf, np.ascontiguousarray(xt, dtype=np.float32), seed, device)
    if pre is not None:
        pre.is_trained = True
    index.is_trained = True


def _train_ivf_torch(ivf: faiss.IndexIVF, xt: np.ndarray, seed: int, device: str) -> None:
    spherical = _spherical(ivf)
    centroids = kmeans_torch(xt, ivf.nlist, IVF_KMEANS_ITER, seed, device, spherical=spherical)
    quantizer = ivf.quantizer
    quantizer.reset()
    quantizer.add(centroids)
    ivf.is_trained = True
    if isinstance(ivf, (faiss.IndexIVFPQ, faiss.IndexIVFPQFastScan)):
        pq = ivf.pq
        if ivf.by_residual:
            _, assign = quantizer.search(xt, 1)
            xt = xt - centroids[assign[:, 0]]
        if pq.nbits > 8:
            raise ValueError(f"torch training supports PQ codes of up to 8 bits, got {pq.nbits}")
        sub = np.ascontiguousarray(xt.reshape(xt.shape[0], pq.M, pq.dsub).transpose(1, 0, 2))
        codebooks = kmeans_torch(sub, pq.ksub, PQ_KMEANS_ITER, seed + 1, device)   # (M, ksub, dsub)
        faiss.copy_array_to_vector(codebooks.ravel(), pq.centroids)
        # What FAISS does at the end of training: the per-list distance tables follow the codebooks.
        if ivf.by_residual and hasattr(ivf, "precompute_table"):
            ivf.precompute_table()
    elif isinstance(ivf, faiss.IndexIVFFlat):
        pass
    else:
        # Scalar quantisers and other encoders train cheaply on the CPU from the residuals.
        residuals = xt
        if ivf.by_residual:
            _, assign = quantizer.search(xt, 1)
            residuals = xt - centroids[assign[:, 0]]
        ivf.train_encoder(residuals.shape[0], faiss.swig_ptr(np.ascontiguousarray(residuals)), None)
