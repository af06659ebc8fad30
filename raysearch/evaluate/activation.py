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
from raysearch.activate.pipeline import read_report, stored_embeddings
from raysearch.edits import EDITS, apply_edit
from raysearch.images import decode_image, resize_image
from raysearch.index.exact import exact_knn
from raysearch.index.transforms import split_pretransform
from raysearch.search import Searcher

DEFAULT_EDITS = (
    "none", "crop", "center_crop", "rotate", "hflip", "color_jitter", "grayscale", "blur", "jpeg",
    "text", "shapes", "pad", "resize", "meme", "overlay", "combo",
)


@dataclass(frozen=True)
class ActivationEvalConfig:
    """Settings of `evaluate_activation`: the edits to apply ("none": the image as it is), nprobe
    (None: the index's tuned value), the seed of the edits, images embedded per batch, and
    max_images (None: every image of the activation run)."""

    edits: tuple[str, ...] = DEFAULT_EDITS
    nprobe: int | None = None
    seed: int = 0
    batch_size: int = 32
    max_images: int | None = None
    # Also search the index's stored (unquantised) vectors exactly: recall@1 without the index's
    # compression, for passive and activated copies. It separates what the codes lose (which
    # activation can win back) from what the model itself loses under the edits. Holds every
    # stored vector in memory: meant for benchmark-sized indexes.
    exact: bool = False

    def __post_init__(self) -> None:
        unknown = [e for e in self.edits if e != "none" and e not in EDITS]
        if unknown:
            raise ValueError(f"unknown edits {unknown}; choose from none, {', '.join(sorted(EDITS))}")
        if not self.edits:
            raise ValueError("--edits must name at least one edit")


@dataclass
class ActivationEvalReport:
    """What `evaluate_activation` measured: recall@1 per edit of the passive and the activated
    copies; mean_psnr / mean_ssim over the activation run's report rows (non-finite values
    skipped); seconds of wall time; the nprobe searched with; per_image: "image_id" and one
    hit-or-miss list per "passive_<edit>" and "activated_<edit>"."""

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
    # With config.exact: recall@1 of exact search over the stored vectors, edit -> value.
    exact_passive: dict[str, float] | None = None
    exact_activated: dict[str, float] | None = None
    # With config.exact: how many evaluated images share their index code with another indexed
    # vector. The index cannot rank such an image above its twin, activated or not.
    shared_codes: int | None = None

    @property
    def mean_exact_passive(self) -> float | None:
        """Mean of exact_passive over the edits other than "none"; None without config.exact."""
        return _mean_edited(self.exact_passive)

    @property
    def mean_exact_activated(self) -> float | None:
        """Mean of exact_activated over the edits other than "none"; None without config.exact."""
        return _mean_edited(self.exact_activated)

    @property
    def ratio(self) -> float:
        """mean_activated / mean_passive; inf when mean_passive is 0."""
        return self.mean_activated / self.mean_passive if self.mean_passive > 0 else float("inf")

    def to_dict(self) -> dict:
        """The report as a JSON-ready dict, without per_image; the exact-search fields only with
        config.exact."""
        return {
            "n_images": self.n_images, "nprobe": self.nprobe, "recall_at_1": {"passive": self.passive, "activated": self.activated},
            "mean_passive": self.mean_passive, "mean_activated": self.mean_activated, "ratio": self.ratio,
            "mean_psnr": self.mean_psnr, "mean_ssim": self.mean_ssim, "seconds": self.seconds,
            **({"exact_recall_at_1": {"passive": self.exact_passive, "activated": self.exact_activated},
                "mean_exact_passive": self.mean_exact_passive, "mean_exact_activated": self.mean_exact_activated,
                "shared_codes": self.shared_codes} if self.exact_passive is not None else {}),
        }


def _mean_edited(recall: dict[str, float] | None) -> float | None:
    """Mean recall@1 over the edits other than "none" (over "none" alone if it is the only one)."""
    if recall is None:
        return None
    edited = [e for e in recall if e != "none"] or list(recall)
    return float(np.mean([recall[e] for e in edited]))


class ExactSearch:
    """Exact top-1 over an index's stored vectors, in the space its codes live in."""

    def __init__(self, searcher: Searcher):
        vectors, self.image_ids = stored_embeddings(searcher.store)
        self.searcher = searcher
        self.xb = searcher.to_index_space(vectors)
        self.shared = _shares_code(searcher.store.load_trained(), self.xb)

    def top1(self, xq: np.ndarray) -> np.ndarray:
        """Raw query vectors xq (n, dim) -> (n,) object array: the image_id of each one's nearest
        stored vector."""
        blocks = [(self.xb, np.arange(len(self.xb), dtype=np.int64))]
        _, ids = exact_knn(self.searcher.to_index_space(xq), blocks, 1, self.searcher.store.metric)
        return self.image_ids[ids[:, 0]]


def _shares_code(trained, xb: np.ndarray) -> np.ndarray | None:
    """(n,) bool: vector i's code (list and PQ code) equals another vector's; None for an index
    whose codes cannot be read back (no standalone encoder)."""
    inner = split_pretransform(trained).quantiser
    try:
        codes = inner.sa_encode(np.ascontiguousarray(xb, dtype=np.float32))
    except RuntimeError:
        return None
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    return counts[inverse.ravel()] > 1


def _recall_at_1(searcher: Searcher, images: list[np.ndarray], expected: np.ndarray, edit: str,
                 seeds: np.ndarray, nprobe: int | None, batch_size: int,
                 exact: ExactSearch | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Per image: found at rank 1 by the index, and (with `exact`) by exact search."""
    spec = searcher.store.model_spec
    hits = np.zeros(len(images), dtype=bool)
    exact_hits = np.zeros(len(images), dtype=bool) if exact is not None else None
    for start in range(0, len(images), batch_size):
        chunk = range(start, min(start + batch_size, len(images)))
        pixels = np.stack([
            resize_image(np.asarray(apply_edit(edit, Image.fromarray(images[i]), int(seeds[i]))), spec.input_size, spec.resize)  # type: ignore[arg-type]
            for i in chunk
        ])
        features = searcher.embedder().embed_pixels(pixels)
        image_ids, _ = searcher.lookup(searcher.search(features, k=1, nprobe=nprobe))
        hits[list(chunk)] = image_ids[:, 0] == expected[list(chunk)]
        if exact is not None:
            exact_hits[list(chunk)] = exact.top1(features) == expected[list(chunk)]  # type: ignore[index]
    return hits, exact_hits


def evaluate_activation(
    index_dir: str, activated_dir: str, config: ActivationEvalConfig = ActivationEvalConfig()
) -> ActivationEvalReport:
    """Recall@1 under edits of the passive vs activated images of an activation run."""

    start = time.perf_counter()
    report = read_report(activated_dir)
    if report.num_rows == 0:
        raise ValueError(f"{activated_dir} holds no activated images (no report rows)")
    rows = report.to_pylist()
    if config.max_images is not None:
        rows = rows[: config.max_images]
    searcher = Searcher(index_dir)
    exact = ExactSearch(searcher) if config.exact else None
    passive = [decode_image(storage.read_bytes(r["uri"])) for r in rows]
    activated = [decode_image(storage.read_bytes(r["output"])) for r in rows]
    expected = np.asarray([r["image_id"] for r in rows], dtype=object)
    out_p: dict[str, float] = {}
    out_a: dict[str, float] = {}
    exact_p: dict[str, float] = {}
    exact_a: dict[str, float] = {}
    per_image: dict[str, list] = {"image_id": list(expected)}
    for k, edit in enumerate(config.edits):
        # One seed per (image, edit), shared by the passive and the activated copy.
        seeds = config.seed * 1_000_003 + np.asarray([int(r["row"]) for r in rows]) * 101 + k
        hp, ep = _recall_at_1(searcher, passive, expected, edit, seeds, config.nprobe, config.batch_size, exact)
        ha, ea = _recall_at_1(searcher, activated, expected, edit, seeds, config.nprobe, config.batch_size, exact)
        out_p[edit], out_a[edit] = float(hp.mean()), float(ha.mean())
        if exact is not None:
            exact_p[edit], exact_a[edit] = float(ep.mean()), float(ea.mean())  # type: ignore[union-attr]
        per_image[f"passive_{edit}"] = hp.tolist()
        per_image[f"activated_{edit}"] = ha.tolist()
    shared = None
    if exact is not None and exact.shared is not None:
        where = {image_id: i for i, image_id in enumerate(exact.image_ids)}
        shared = int(sum(bool(exact.shared[where[e]]) for e in expected if e in where))

    def finite_mean(key: str) -> float:
        values = np.asarray([r[key] for r in rows], dtype=float)
        values = values[np.isfinite(values)]
        return float(values.mean()) if values.size else float("nan")

    return ActivationEvalReport(
        n_images=len(rows), passive=out_p, activated=out_a,
        mean_passive=_mean_edited(out_p), mean_activated=_mean_edited(out_a),  # type: ignore[arg-type]
        mean_psnr=finite_mean("psnr"), mean_ssim=finite_mean("ssim"),
        seconds=time.perf_counter() - start, nprobe=config.nprobe or searcher.store.nprobe, per_image=per_image,
        exact_passive=exact_p if exact is not None else None,
        exact_activated=exact_a if exact is not None else None, shared_codes=shared,
    )
