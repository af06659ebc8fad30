"""A closed-form start for the projection: learned whitening fitted on edited views of the training
images (`raysearch train --init-projection whitening`).

The starting network's descriptors of a copy and of its original differ along a few directions (the
ones crops, colour changes and overlays move), while what tells two images apart spreads over
others. Learned whitening from matching pairs (Radenovic, Tolias and Chum, ECCV 2016) finds both
from examples; here the matching pairs are views of one training image drawn from the edit suite, so
no labels are needed:

1. f: the starting network's L2-normalised descriptors of `views` views of each of n images.
2. Cw: the covariance of each view's offset from its image's mean view. Multiplying by Cw^-1/2
   (eigenvalues shrunk by `shrinkage` x their mean) flattens the directions the edits move.
3. In that space, PCA of all the views; the `dim` axes of largest variance are kept.

The projection is y = W f + b; the network L2-normalises y. Training then starts from it
(benchmarks/RESULTS.md, "Training a copy descriptor", measures both).
"""

from __future__ import annotations

import dataclasses
import io
import time
from dataclasses import dataclass

import numpy as np

# Views of each sampled image. Each image gives views - 1 independent offsets from its mean view.
WHITEN_VIEWS = 4
# Shrinkage of Cw's eigenvalues, as a share of their mean: keeps directions that the sampled edits
# happened not to move from being scaled up without bound.
WHITEN_SHRINKAGE = 0.1
PROJECTION_FILE = "projection_init.npz"


@dataclass(frozen=True)
class ProjectionInit:
    """y = weight @ f + bias for L2-normalised features f; what `fit_projection` learned from."""

    weight: np.ndarray   # (dim, d) float32
    bias: np.ndarray     # (dim,) float32
    images: int          # images whose views were used
    views: int
    shrinkage: float
    seconds: float

    def record(self) -> dict:
        """What model.json records of the fit."""
        return {"method": "learned whitening from views", "images": self.images, "views": self.views,
                "shrinkage": self.shrinkage, "dim": int(self.weight.shape[0]), "seconds": round(self.seconds, 3)}

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, weight=self.weight, bias=self.bias, images=self.images, views=self.views,
                 shrinkage=self.shrinkage, seconds=self.seconds)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "ProjectionInit":
        with np.load(io.BytesIO(data)) as z:
            return cls(z["weight"].astype(np.float32), z["bias"].astype(np.float32), int(z["images"]),
                       int(z["views"]), float(z["shrinkage"]), float(z["seconds"]))


def learned_whitening(views: np.ndarray, dim: int | None = None,
                      shrinkage: float = WHITEN_SHRINKAGE) -> tuple[np.ndarray, np.ndarray]:
    """(weight (dim, d), bias (dim,)) of the whitening learned from `views` (n, V, d): V >= 2 views
    of each of n images. `dim` None keeps every axis; it must be at most d."""
    views = np.asarray(views, dtype=np.float64)
    if views.ndim != 3 or views.shape[0] < 2 or views.shape[1] < 2:
        raise ValueError(f"learned whitening needs (images >= 2, views >= 2, d) features, got shape {views.shape}")
    n, v, d = views.shape
    dim = d if dim is None else int(dim)
    if not 1 <= dim <= d:
        raise ValueError(f"the whitened projection keeps 1 to {d} dimensions, got {dim}")
    if shrinkage < 0:
        raise ValueError(f"shrinkage must be >= 0, got {shrinkage}")
    offsets = (views - views.mean(axis=1, keepdims=True)).reshape(-1, d)
    # Each image's V offsets sum to zero: n (V - 1) degrees of freedom.
    cw = offsets.T @ offsets / max(1, n * (v - 1))
    w, u = np.linalg.eigh(cw)
    w = np.maximum(w, 0.0) + shrinkage * max(float(w.mean()), 1e-12) + 1e-12
    inv_sqrt = (u / np.sqrt(w)) @ u.T
    flat = views.reshape(-1, d)
    mean = flat.mean(axis=0)
    y = (flat - mean) @ inv_sqrt
    wb, ub = np.linalg.eigh(y.T @ y / max(1, len(y) - 1))
    order = np.argsort(wb)[::-1][:dim]
    ub = ub[:, order]
    # A deterministic sign per axis (eigh's is arbitrary): the largest coefficient is positive.
    ub *= np.where(ub[np.abs(ub).argmax(axis=0), np.arange(dim)] < 0, -1.0, 1.0)
    weight = (inv_sqrt @ ub).T
    bias = -weight @ mean
    return weight.astype(np.float32), bias.astype(np.float32)


def view_features(batches, net, mean: tuple, std: tuple, view_config, views: int, seed: int, max_images: int,
                  device: str = "cpu", batch: int = 32) -> np.ndarray:
    """(n, views, d) L2-normalised descriptors by `net` (the starting network without a projection)
    of `views` views of each usable image of `batches` (rows with pixels and error, as the training
    dataset yields), at most `max_images` images, normalised with `mean` and `std`. Views are made
    as for training, unmixed."""
    import torch

    from raysearch.train.model import InputNormalizer
    from raysearch.train.views import make_views

    config = dataclasses.replace(view_config, n_views=views, mixup_prob=0.0, cutmix_prob=0.0)
    normalise = InputNormalizer(mean, std, device)
    out: list[np.ndarray] = []
    n = 0
    net = net.to(device).eval()
    for rows in batches:
        good = [i for i, e in enumerate(rows["error"]) if not e][: max_images - n]
        if not good:
            continue
        v = make_views([np.asarray(rows["pixels"][i], dtype=np.uint8) for i in good],
                       [str(rows["image_id"][i]) for i in good], config, seed, 0)
        with torch.no_grad():
            for start in range(0, len(v.pixels), batch):
                out.append(net(normalise(v.pixels[start:start + batch])).float().cpu().numpy())
        n += len(good)
        if n >= max_images:
            break
    if n < 2:
        raise ValueError(f"--init-projection whitening needs at least 2 usable training images, got {n}")
    return np.concatenate(out).reshape(n, views, -1)


def fit_projection(sample, init, gem_p: float, view_config, dim: int | None, max_images: int, seed: int,
                   use_gpu: bool, cpus: float, threads: int | None = None) -> ProjectionInit:
    """Fit the projection on views of the images of `sample` (a Ray Data dataset of decoded rows),
    in a Ray task that reserves what one training worker does (a GPU when training on GPUs). On
    CPUs it runs torch on `threads` (default: every core of its node, which nothing else uses
    before training starts), as a training worker does."""
    import ray

    def fit(sample) -> ProjectionInit:
        import torch

        from raysearch.runtime import configure_data_context
        from raysearch.train.loop import node_cpus
        from raysearch.train.model import build_descriptor_net

        start = time.monotonic()
        print(f"fitting the whitened projection on {WHITEN_VIEWS} views of up to {max_images} images", flush=True)
        configure_data_context(False)  # the driver's quiet Ray Data, in this task too
        if not use_gpu:
            torch.set_num_threads(threads or node_cpus())
        net = build_descriptor_net(init, None, gem_p, "all")
        feats = view_features(sample.iter_batches(batch_size=16, batch_format="numpy"), net, init.mean, init.std, view_config,
                              WHITEN_VIEWS, seed, max_images, "cuda" if use_gpu else "cpu")
        weight, bias = learned_whitening(feats, dim, WHITEN_SHRINKAGE)
        fitted = ProjectionInit(weight, bias, feats.shape[0], WHITEN_VIEWS, WHITEN_SHRINKAGE, time.monotonic() - start)
        # Printed like the training workers' lines: the fit can take minutes on CPUs.
        print(f"fitted the whitened projection ({weight.shape[1]} -> {weight.shape[0]}) on {WHITEN_VIEWS} views "
              f"of {fitted.images} images in {fitted.seconds:.1f} s", flush=True)
        return fitted

    task = ray.remote(num_cpus=cpus, num_gpus=1 if use_gpu else 0)(fit)
    try:
        return ray.get(task.remote(sample))
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, ValueError):  # too few usable images: the message, not the task's traceback
            raise ValueError(str(e.cause)) from None
        raise


__all__ = ["PROJECTION_FILE", "ProjectionInit", "WHITEN_SHRINKAGE", "WHITEN_VIEWS", "fit_projection",
           "learned_whitening", "view_features"]
