"""Measuring what activation gains: edited copies of passive (original) and activated images are
searched in the index; recall@1 per edit and overall, with the images' PSNR/SSIM.

The same seeded edit is applied to an image's passive and activated version, so the two columns
differ only by the activation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from raysearch import storage
from raysearch.evaluate.attacks import apply_edit
from raysearch.images import decode_image, resize_image
from raysearch.search import Searcher

DEFAULT_EDITS = (
    "none", "crop", "center_crop", "rotate", "hflip", "color_jitter", "grayscale", "blur", "jpeg",
    "text", "shapes", "pad", "resize", "meme", "overlay", "combo",
)


@dataclass(frozen=True)
class ActivationEvalConfig:
    edits: tuple[str, ...] = DEFAULT_EDITS
    nprobe: int | None = None
    seed: int = 0
    batch_size: int = 32
    max_images: int | None = None

    def __post_init__(self) -> None:
        from raysearch.evaluate.attacks import EDITS

        unknown = [e for e in self.edits if e != "none" and e not in EDITS]
        if unknown:
            raise ValueError(f"unknown edits {unknown}; choose from none, {', '.join(sorted(EDITS))}")
        if not self.edits:
            raise ValueError("--edits must name at least one edit")


@dataclass
class ActivationEvalReport:
    n_images: int
    passive: dict[str, float]        # edit -> recall@1
    activated: dict[str, float]
    mean_passive: float              # over the edits other than "none"
    mean_activated: float
    mean_psnr: float
    mean_ssim: float
    seconds: float
    nprobe: int | None = None
    per_image: dict[str, list] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.mean_activated / self.mean_passive if self.mean_passive > 0 else float("inf")

    def to_dict(self) -> dict:
        return {
            "n_images": self.n_images, "nprobe": self.nprobe, "recall_at_1": {"passive": self.passive, "activated": self.activated},
            "mean_passive": self.mean_passive, "mean_activated": self.mean_activated, "ratio": self.ratio,
            "mean_psnr": self.mean_psnr, "mean_ssim": self.mean_ssim, "seconds": self.seconds,
        }


def _recall_at_1(searcher: Searcher, images: list[np.ndarray], expected: np.ndarray, edit: str,
                 seeds: np.ndarray, nprobe: int | None, batch_size: int) -> np.ndarray:
    spec = searcher.store.model_spec
    hits = np.zeros(len(images), dtype=bool)
    for start in range(0, len(images), batch_size):
        chunk = range(start, min(start + batch_size, len(images)))
        pixels = np.stack([
            resize_image(np.asarray(apply_edit(edit, Image.fromarray(images[i]), int(seeds[i]))), spec.input_size, spec.resize)  # type: ignore[arg-type]
            for i in chunk
        ])
        result = searcher.search(searcher.embedder().embed_pixels(pixels), k=1, nprobe=nprobe)
        image_ids, _ = searcher.lookup(result)
        hits[list(chunk)] = image_ids[:, 0] == expected[list(chunk)]
    return hits


def evaluate_activation(
    index_dir: str, activated_dir: str, config: ActivationEvalConfig = ActivationEvalConfig()
) -> ActivationEvalReport:
    """Recall@1 under edits of the passive vs activated images of an activation run."""
    from raysearch.activate.pipeline import read_report

    start = time.perf_counter()
    report = read_report(activated_dir)
    if report.num_rows == 0:
        raise ValueError(f"{activated_dir} holds no activated images (no report rows)")
    rows = report.to_pylist()
    if config.max_images is not None:
        rows = rows[: config.max_images]
    searcher = Searcher(index_dir)
    passive = [decode_image(storage.read_bytes(r["uri"])) for r in rows]
    activated = [decode_image(storage.read_bytes(r["output"])) for r in rows]
    expected = np.asarray([r["image_id"] for r in rows], dtype=object)
    out_p: dict[str, float] = {}
    out_a: dict[str, float] = {}
    per_image: dict[str, list] = {"image_id": list(expected)}
    for k, edit in enumerate(config.edits):
        # One seed per (image, edit), shared by the passive and the activated copy.
        seeds = config.seed * 1_000_003 + np.asarray([int(r["row"]) for r in rows]) * 101 + k
        hp = _recall_at_1(searcher, passive, expected, edit, seeds, config.nprobe, config.batch_size)
        ha = _recall_at_1(searcher, activated, expected, edit, seeds, config.nprobe, config.batch_size)
        out_p[edit], out_a[edit] = float(hp.mean()), float(ha.mean())
        per_image[f"passive_{edit}"] = hp.tolist()
        per_image[f"activated_{edit}"] = ha.tolist()
    edited = [e for e in config.edits if e != "none"] or list(config.edits)

    def finite_mean(key: str) -> float:
        values = np.asarray([r[key] for r in rows], dtype=float)
        values = values[np.isfinite(values)]
        return float(values.mean()) if values.size else float("nan")

    return ActivationEvalReport(
        n_images=len(rows), passive=out_p, activated=out_a,
        mean_passive=float(np.mean([out_p[e] for e in edited])),
        mean_activated=float(np.mean([out_a[e] for e in edited])),
        mean_psnr=finite_mean("psnr"), mean_ssim=finite_mean("ssim"),
        seconds=time.perf_counter() - start, nprobe=config.nprobe or searcher.store.nprobe, per_image=per_image,
    )
