"""Activating one batch of images (Active Image Indexing, Fernandez et al., ICLR 2023).

Each image x is replaced by

    x' = x + H(x) * a * tanh(delta)

where H is the image's JND heatmap (times `scaling`), a a per-channel scale (inversely proportional to
the channel's weight in luminance, so each channel changes brightness alike), and delta is optimised
with Adam to minimise

    lambda_f * (1 - cos(f(x'), target)) + lambda_i * mean((x' - x)^2)

f is the index's own model applied after a differentiable resize to its input size (and after the
index's own pre-transform, if it has one). The target is where the index quantises the image's
indexed feature: its PQ reconstruction (default) or its IVF centroid. Pulling the feature there makes
the image sit at the centre of its own quantisation cell, so edited copies still land in it.

`loss="rank"` replaces the cosine term by a ranking loss: with r_0 the image's own PQ reconstruction
and r_1..r_M the reconstructions of its M nearest *other* indexed vectors (its competitors),

    -log softmax_j(-||f(x') - r_j||^2 / tau)[0]

i.e. the feature is pushed to where its own code outscores its neighbours' codes, which is what
decides whether an edited copy is found first, rather than toward the reconstruction itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import faiss
import numpy as np
import torch
import torch.nn.functional as F

from raysearch.activate.jnd import LUMA, jnd_heatmap
from raysearch.index.transforms import split_pretransform

TARGETS = ("pq", "ivf")
LOSSES = ("cosine", "rank")


@dataclass(frozen=True)
class ActivateConfig:
    """Options of one activation (see module docstring for the meaning of each term)."""

    iterations: int = 10
    lr: float = 1.0
    lambda_f: float = 1.0
    lambda_i: float = 0.2
    scaling: float = 3.0
    strength: float = 0.0165     # channel scale a_c = strength / luma_c
    target: str = "pq"
    psnr: float | None = None    # floor in dB: perturbations are scaled down until every image meets it
    augment: int = 0             # random edited views per image and step (0: the original method)
    seed: int = 0
    loss: str = "cosine"         # "cosine": toward the target; "rank": own code over its neighbours'
    competitors: int = 10        # "rank": neighbouring codes the own code must outscore
    tau: float = 0.05            # "rank": softmax temperature on squared L2 distances

    def __post_init__(self) -> None:
        if self.iterations < 0:
            raise ValueError(f"--iterations must be >= 0, got {self.iterations}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.target not in TARGETS:
            raise ValueError(f"--target must be one of {TARGETS}, got {self.target!r}")
        if self.psnr is not None and not 10.0 <= self.psnr <= 80.0:
            raise ValueError(f"--psnr must be between 10 and 80 dB, got {self.psnr}")
        if self.scaling <= 0 or self.strength <= 0:
            raise ValueError("--scaling and --strength must be > 0")
        if self.augment < 0:
            raise ValueError(f"--augment must be >= 0, got {self.augment}")
        if self.loss not in LOSSES:
            raise ValueError(f"--loss must be one of {LOSSES}, got {self.loss!r}")
        if self.competitors < 1:
            raise ValueError(f"--competitors must be >= 1, got {self.competitors}")
        if not (math.isfinite(self.tau) and self.tau > 0):
            raise ValueError(f"--tau must be a positive number, got {self.tau}")
        if self.loss == "rank" and self.target != "pq":
            raise ValueError(
                "--loss rank ranks the image's own PQ code against its neighbours' codes: it needs "
                f"--target pq, got --target {self.target}"
            )


# ---------------------------------------------------------------------------------------------
# Where the index quantises a vector, and the index's own feature transform in torch
# ---------------------------------------------------------------------------------------------


def check_quantising(index: faiss.Index, target: str) -> None:
    """Activation needs a lossy index: PQ codes for the 'pq' target, an IVF for 'ivf'."""
    inner = split_pretransform(index).quantiser
    try:
        faiss.extract_index_ivf(inner)
        has_ivf = True
    except RuntimeError:
        has_ivf = False
    has_pq = hasattr(inner, "pq")
    if target == "pq" and not has_pq:
        raise ValueError(
            "--target pq needs an index that stores product-quantised codes (e.g. IVF4096,PQ16); "
            f"this index ({type(inner).__name__}) stores vectors exactly: activation cannot help it"
            + (" (try --target ivf)" if has_ivf else "")
        )
    if target == "ivf" and not has_ivf:
        raise ValueError(f"--target ivf needs an IVF index, this one is {type(inner).__name__}")


def quantised_targets(index: faiss.Index, x: np.ndarray, target: str = "pq") -> np.ndarray:
    """Where `index` (trained) quantises the vectors x (n, d): their PQ reconstruction or their IVF
    centroid, in the index's own space (after its pre-transform). Returns (n, d') float32."""
    parts = split_pretransform(index)  # views into `index`, which the caller keeps alive
    inner = parts.quantiser
    xt = parts.apply(x)
    if target == "pq":
        return inner.sa_decode(inner.sa_encode(xt)).astype(np.float32)
    ivf = faiss.extract_index_ivf(inner)
    _, assign = ivf.quantizer.search(xt, 1)
    return ivf.quantizer.reconstruct_batch(assign.ravel()).astype(np.float32)


class TorchTransform(torch.nn.Module):
    """The index's pre-transform chain (linear maps such as PCA/whitening/OPQ, L2 normalisation) in
    torch, so the activation loss is computed where the index quantises."""

    def __init__(self, chain: list):
        super().__init__()
        self.steps: list[tuple[str, torch.Tensor | None, torch.Tensor | None]] = []
        for i, vt in enumerate(chain):
            if isinstance(vt, faiss.NormalizationTransform):
                self.steps.append(("l2", None, None))
            elif isinstance(vt, faiss.LinearTransform):
                A = torch.from_numpy(faiss.vector_to_array(vt.A).reshape(vt.d_out, vt.d_in).astype(np.float32))
                b = faiss.vector_to_array(vt.b)
                bias = torch.from_numpy(b.astype(np.float32)) if b.size else torch.zeros(vt.d_out)
                self.register_buffer(f"A{i}", A)
                self.register_buffer(f"b{i}", bias)
                self.steps.append(("linear", f"A{i}", f"b{i}"))  # type: ignore[arg-type]
            else:
                raise ValueError(f"activation cannot differentiate through the index transform {type(vt).__name__}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for kind, a, b in self.steps:
            if kind == "l2":
                x = F.normalize(x, dim=-1)
            else:
                x = x @ getattr(self, a).t() + getattr(self, b)  # type: ignore[arg-type]
        return x


# ---------------------------------------------------------------------------------------------
# Image helpers
# ---------------------------------------------------------------------------------------------


def differentiable_resize(x: torch.Tensor, size: int, policy: str) -> torch.Tensor:
    """(1, 3, H, W) -> (1, 3, size, size) with the model's resize policy, differentiably."""
    h, w = x.shape[-2:]
    if policy == "squash":
        return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    if policy == "crop":
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
        top, left = (nh - size) // 2, (nw - size) // 2
        return x[..., top : top + size, left : left + size]
    if policy == "pad":
        scale = size / max(h, w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
        fill = torch.tensor([124, 116, 104], dtype=x.dtype, device=x.device).view(1, 3, 1, 1) / 255.0
        out = fill.expand(1, 3, size, size).clone()
        top, left = (size - nh) // 2, (size - nw) // 2
        out[..., top : top + nh, left : left + nw] = x
        return out
    raise ValueError(f"unknown resize policy {policy!r}")


def random_view(x: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """A random edited copy of x (1, 3, H, W), differentiable, resized to (1, 3, size, size): a crop of
    40-100% of the area, a small rotation, a brightness/contrast change and a blur, each drawn at
    random. Optimising through such views makes the perturbation survive the edits copies undergo."""
    import torchvision.transforms.v2.functional as TF

    def u(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=gen))

    h, w = x.shape[-2:]
    area, aspect = u(0.4, 1.0), u(0.75, 1.333)
    ch = max(8, min(h, int(round((area * h * w / aspect) ** 0.5))))
    cw = max(8, min(w, int(round((area * h * w * aspect) ** 0.5))))
    top, left = int(u(0, h - ch + 1)), int(u(0, w - cw + 1))
    v = x[..., top : top + ch, left : left + cw]
    if float(torch.rand((), generator=gen)) < 0.5:
        v = TF.rotate(v, u(-15.0, 15.0), interpolation=TF.InterpolationMode.BILINEAR)
    v = F.interpolate(v, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    v = (v - 0.5) * u(0.7, 1.3) + 0.5 + u(-0.15, 0.15)
    if float(torch.rand((), generator=gen)) < 0.5:
        sigma = u(0.3, 1.5)
        v = TF.gaussian_blur(v, kernel_size=[5, 5], sigma=[sigma, sigma])
    return v.clamp(0.0, 1.0)


def psnr(x: np.ndarray, y: np.ndarray) -> float:
    """PSNR in dB between two uint8 images (inf when identical)."""
    mse = float(np.mean((x.astype(np.float64) - y.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0 ** 2 / mse)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(3, H, W) float in [0, 1] -> (H, W, 3) uint8 (rounded, as a saved PNG holds it)."""
    return (x.detach().clamp(0, 1) * 255.0).round().byte().permute(1, 2, 0).cpu().numpy()


@dataclass
class ActivatedImage:
    pixels: np.ndarray           # (H, W, 3) uint8
    psnr: float
    linf: int                    # largest change of any pixel channel, in grey levels
    cos_before: float            # cosine(f(x), target), features as the optimiser sees them
    cos_after: float
    scale: float                 # factor applied to meet the PSNR floor (1.0 when not needed)


def pixel_groups(sizes: list[int], max_pixels: int | None) -> list[list[int]]:
    """Positions 0..n-1 in order, grouped so that each group's pixel count (sizes) stays within
    max_pixels; an image larger than max_pixels forms a group of its own. None: one group."""
    if max_pixels is None:
        return [list(range(len(sizes)))] if sizes else []
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
    groups: list[list[int]] = []
    total = 0
    for i, size in enumerate(sizes):
        if groups and total + size <= max_pixels:
            groups[-1].append(i)
            total += size
        else:
            groups.append([i])
            total = size
    return groups


def model_runner(model: torch.nn.Module, device: str | torch.device, fast: bool | None = None):
    """The model as activation runs it, forward and backward: a function (B, 3, S, S) float images
    -> (B, d) float32 features.

    With the fast settings (`fast`, None: on unless RAYSEARCH_EMBED_FAST=0) the batch goes in
    channels_last, the layout of a model built for inference (`Embedder`: 1.65x faster on CPU than
    NCHW), and on CUDA under bfloat16 autocast, the loss and the perturbation staying float32.
    """
    from raysearch.models.embedder import fast_default, use_bf16

    fast = fast_default() if fast is None else fast
    kind = torch.device(device).type
    bf16 = use_bf16(kind, fast)

    def run(x: torch.Tensor) -> torch.Tensor:
        if not fast:
            return model(x)
        with torch.autocast(kind, dtype=torch.bfloat16, enabled=bf16):
            return model(x.contiguous(memory_format=torch.channels_last)).float()

    return run


def activate_batch(
    images: list[np.ndarray],
    targets: np.ndarray,
    model: torch.nn.Module,
    input_size: int,
    resize: str,
    config: ActivateConfig = ActivateConfig(),
    transform: torch.nn.Module | None = None,
    device: str | torch.device = "cpu",
    competitors: np.ndarray | None = None,
    max_pixels: int | None = None,
) -> list[ActivatedImage]:
    """Activate a batch of full-resolution images.

    Parameters
    ----------
    images : list of (H_i, W_i, 3) uint8 arrays (sizes may differ).
    targets : (n, d') float32, where the index quantises each image's indexed feature.
    model : maps (B, 3, S, S) float images in [0, 1] to (B, d) features (the index's model).
    input_size, resize : the model's preprocessing (ModelSpec.input_size, ModelSpec.resize).
    transform : the index's pre-transform in torch (TorchTransform), or None.
    competitors : (n, M, d') float32, required by config.loss == "rank" (ignored by "cosine"): the
        reconstructions of each image's M nearest other indexed vectors, in the space of `targets`.
    max_pixels : optimise the images in groups of at most this many pixels, each group as a batch of
        its own, so that a batch of large photographs fits in memory (None: all at once).

    Returns one ActivatedImage per input (cos_before / cos_after: cosine to its own target), in order.
    """
    if len(images) != len(targets):
        raise ValueError(f"{len(images)} images but {len(targets)} targets")
    rank = config.loss == "rank"
    if rank:
        if competitors is None:
            raise ValueError(
                "loss 'rank' needs competitors: an (n, M, d') array of the reconstructions of each "
                "image's nearest other indexed vectors"
            )
        competitors = np.asarray(competitors, dtype=np.float32)
        d = np.shape(targets)[1] if len(targets) else None
        if competitors.ndim != 3 or len(competitors) != len(images) or competitors.shape[1] < 1 or (
            d is not None and competitors.shape[2] != d
        ):
            raise ValueError(f"competitors must be (n={len(images)}, M >= 1, d'={d}), got {competitors.shape}")
    if not images:
        return []
    groups = pixel_groups([int(im.shape[0]) * int(im.shape[1]) for im in images], max_pixels)
    if len(groups) > 1:
        return [r for g in groups for r in activate_batch(
            [images[i] for i in g], np.asarray(targets)[g], model, input_size, resize, config, transform,
            device, None if competitors is None else np.asarray(competitors)[g],
        )]
    device = torch.device(device)
    torch.manual_seed(config.seed)
    for p in model.parameters():
        p.requires_grad_(False)
    transform = transform or torch.nn.Identity()
    xs = [torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1).float().div(255.0).unsqueeze(0).to(device) for im in images]
    raw_targets = torch.from_numpy(np.asarray(targets, dtype=np.float32)).to(device)
    tgt = F.normalize(raw_targets, dim=-1)
    if rank:
        # Own code first, then the competitors': (n, 1 + M, d'), as stored (the index scores these).
        candidates = torch.cat([raw_targets[:, None], torch.from_numpy(competitors).to(device)], dim=1)
    channel = torch.tensor([config.strength / w for w in LUMA], device=device).view(1, 3, 1, 1)
    with torch.no_grad():
        heat = [config.scaling * jnd_heatmap(x) * channel for x in xs]
    deltas = [(1e-6 * torch.randn_like(x)).requires_grad_(True) for x in xs]
    opt = torch.optim.Adam(deltas, lr=config.lr)

    run_model = model_runner(model, device)

    def features(batch: list[torch.Tensor]) -> torch.Tensor:
        resized = torch.cat([differentiable_resize(b, input_size, resize) for b in batch])
        return F.normalize(transform(run_model(resized)), dim=-1)

    def feature_loss(f: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Feature term for normalised features f (B, d') of the images rows (B,): (B,)."""
        if rank:
            dist = ((f[:, None, :] - candidates[rows]) ** 2).sum(dim=-1)
            return -torch.log_softmax(-dist / config.tau, dim=1)[:, 0]
        return 1.0 - (f * tgt[rows]).sum(dim=-1)

    # Weight of the original's term against its edited views' (--augment): the cosine loss weighs the
    # original as much as all its views together, so --augment does not change the loss scale; the
    # rank loss averages the original and its views alike.
    own_weight = 1.0 / (1 + config.augment) if rank else 0.5
    rows = torch.arange(len(xs), device=device)

    with torch.no_grad():
        cos_before = (features(xs) * tgt).sum(dim=-1)
    gen = torch.Generator().manual_seed(config.seed)
    # Adam on the tanh variable takes steps of about `lr` per pixel and can overshoot: each image
    # keeps the iterate with its lowest loss (the last step is evaluated too, without stepping).
    best = [d.detach().clone() for d in deltas]
    best_loss = torch.full((len(xs),), float("inf"), device=device)
    for step in range(config.iterations + 1):
        perturbed = [x + h * torch.tanh(d) for x, h, d in zip(xs, heat, deltas)]
        per_image_f = feature_loss(features(perturbed), rows)
        if config.augment:
            views = torch.cat([random_view(p, input_size, gen) for p in perturbed for _ in range(config.augment)])
            view_f = feature_loss(F.normalize(transform(run_model(views)), dim=-1), rows.repeat_interleave(config.augment))
            per_image_f = own_weight * per_image_f + (1.0 - own_weight) * view_f.view(len(xs), config.augment).mean(dim=1)
        per_image_i = torch.stack([((p - x) ** 2).mean() for p, x in zip(perturbed, xs)])
        per_image = config.lambda_f * per_image_f + config.lambda_i * per_image_i
        with torch.no_grad():
            better = per_image < best_loss
            for i in torch.nonzero(better).flatten().tolist():
                best[i] = deltas[i].detach().clone()
            best_loss = torch.where(better, per_image.detach(), best_loss)
        if step == config.iterations:
            break
        opt.zero_grad()
        per_image.sum().backward()
        opt.step()
    deltas = best

    out: list[ActivatedImage] = []
    with torch.no_grad():
        finals = []
        scales = []
        for x, h, d, original in zip(xs, heat, deltas, images):
            perturbation = h * torch.tanh(d)
            scale = 1.0
            pixels = to_uint8((x + perturbation)[0])
            if config.psnr is not None:
                # PSNR grows by 20*log10(1/s) when the perturbation is scaled by s; rounding to 8 bits
                # can cost a little, so shrink until the saved pixels meet the floor.
                value = psnr(pixels, original)
                while value < config.psnr and scale > 1e-3:
                    scale *= min(0.95, 10 ** ((value - config.psnr) / 20.0))
                    pixels = to_uint8((x + scale * perturbation)[0])
                    value = psnr(pixels, original)
                if value < config.psnr:
                    pixels, scale = original.copy(), 0.0
            finals.append(torch.from_numpy(pixels).permute(2, 0, 1).float().div(255.0).unsqueeze(0).to(device))
            scales.append(scale)
        cos_after = (features(finals) * tgt).sum(dim=-1)
        for i, (pixels_t, original) in enumerate(zip(finals, images)):
            pixels = to_uint8(pixels_t[0])
            diff = np.abs(pixels.astype(np.int16) - original.astype(np.int16))
            out.append(ActivatedImage(
                pixels=pixels, psnr=psnr(pixels, original), linf=int(diff.max()),
                cos_before=float(cos_before[i]), cos_after=float(cos_after[i]), scale=scales[i],
            ))
    return out
