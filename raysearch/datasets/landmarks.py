"""A landmark-retrieval set in the Revisited Oxford / Paris format, cut from ordinary photographs.

A "landmark" is a region of one photograph. Around it the photograph's surroundings are kept as
its *site* (the landmark's box grown by `context` of its side on every side); the sites of all
landmarks are disjoint boxes (`raysearch.datasets.copyset.separate_crops` with no overlap allowed),
so no image of one landmark holds a single pixel of another.

Each database view is what another photographer would take of the landmark: a quadrilateral of
the site (a window whose corners are jittered: a perspective change) warped onto a rectangle with
`cv2.getPerspectiveTransform` + `cv2.warpPerspective`, scaled, and re-lit (gamma, gain, contrast,
colour temperature; strongly distorted views may also be blurred or get sensor noise); some get an
occluder (a textured rectangle of no photograph). The window may show only part of the landmark and
some of its surroundings. Every view records what it shows, and is labelled from that alone, with
revisitop's meanings:

- visible: the share of the landmark's area inside the view and not occluded, measured exactly on
  the photograph (`cv2.intersectConvexConvex` of the landmark box, the view's quadrilateral and the
  occluder mapped back through the homography);
- warp: the largest corner displacement of the window, as a share of the window's shorter side;
- light: the relighting strength, max(|ln gamma|, |ln gain|, |ln contrast|, |temperature|).

    junk   visible < junk_below (0.25): a sliver of the landmark
    easy   visible >= easy_from (0.7), warp <= mild_warp[1] and light <= mild_light[1]
    hard   every other view: a clearly smaller part, or a strong warp or relighting

Views whose visible share falls within `band` of either threshold are drawn again, so that a label
never hangs on a rounding. Each landmark gets `views_per_landmark` views in the proportions of
`view_mix` (easy, hard, junk).

Queries (`queries_per_landmark` per landmark): the whole site under a mild perspective change and
relighting, the landmark entirely visible; `bbx` is the bounding rectangle of the landmark's four
corners in the query image, so the query holds surroundings that cropping to `bbx` removes.

Distractors: views drawn the same way from photographs no landmark comes from (the photographs are
split by a seeded permutation of their names: the first `distractor_photos` give distractors).

Layout written to `folder`:

    jpg/<name>.jpg        database images (imlist: views and distractors, shuffled) and queries (qimlist)
    gnd_<config.name>.pkl revisitop ground truth: {'imlist', 'qimlist', 'gnd': [{'bbx', 'easy', 'hard', 'junk'}]}
    database.txt          list file of the imlist images (a SOURCE: `raysearch build database.txt ...`)
    queries.txt           list file of the qimlist images
    landmarks.json        config, photo split, landmarks and every image's record (see `ViewRecord`)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import re
from dataclasses import dataclass, field

import cv2
import numpy as np
from PIL import Image

from raysearch.datasets.copyset import separate_crops

LABELS = ("easy", "hard", "junk")
_MIN_VIEW_SIDE = 64      # pixels: smaller views are scaled up (the embedder would upsample them anyway)
_TRIES = 60              # draws per view before settling for any draw that is clear of the thresholds
_FULL = 1.0 - 1e-4       # "the whole landmark is visible", up to float32 polygon clipping


@dataclass(frozen=True)
class LandmarkSetConfig:
    """What `write_landmark_set` writes (see the module docstring).

    Counts: n_landmarks (fewer if the photographs fill up), views_per_landmark,
    queries_per_landmark, n_distractors, distractor_photos (photographs held out for distractors).
    Landmarks: landmark_fraction (the range of a landmark's side as a share of its photograph's),
    context (surroundings kept around it, a share of its side on each side), min_side (pixels),
    min_contrast (grey-level std of its site; flatter ones are not used).
    Labels: junk_below, easy_from, band (see the module docstring); view_mix (easy, hard, junk
    shares of each landmark's views).
    Draw ranges: visible_easy / visible_hard / visible_junk (the share of the landmark a view of
    that kind aims at), mild_warp / strong_warp (corner jitter, share of the window's shorter
    side), mild_light / strong_light (relighting strength), scale (output pixels per photograph
    pixel), max_side (pixels), occluded_share (share of views with an occluder), occlusion (share
    of the view's area it covers). Files: name (of the gnd pickle), seed, quality (JPEG)."""

    n_landmarks: int = 30
    views_per_landmark: int = 6
    queries_per_landmark: int = 1
    n_distractors: int = 120
    distractor_photos: int = 4
    landmark_fraction: tuple[float, float] = (0.2, 0.4)
    context: float = 0.25
    min_side: int = 80
    min_contrast: float = 8.0
    junk_below: float = 0.25
    easy_from: float = 0.7
    band: float = 0.03
    view_mix: tuple[float, float, float] = (0.5, 0.35, 0.15)
    visible_easy: tuple[float, float] = (0.8, 1.0)
    visible_hard: tuple[float, float] = (0.32, 0.6)
    visible_junk: tuple[float, float] = (0.06, 0.2)
    mild_warp: tuple[float, float] = (0.0, 0.04)
    strong_warp: tuple[float, float] = (0.1, 0.2)
    mild_light: tuple[float, float] = (0.0, 0.12)
    strong_light: tuple[float, float] = (0.3, 0.55)
    scale: tuple[float, float] = (0.6, 1.3)
    max_side: int = 800
    occluded_share: float = 0.25
    occlusion: tuple[float, float] = (0.08, 0.25)
    name: str = "synthlandmarks"
    seed: int = 0
    quality: int = 90

    def __post_init__(self) -> None:
        for key in ("n_landmarks", "views_per_landmark", "queries_per_landmark"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        for key in ("n_distractors", "distractor_photos"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.n_distractors > 0 and self.distractor_photos < 1:
            raise ValueError(f"n_distractors={self.n_distractors} needs distractor_photos >= 1, got 0")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be in 1..100, got {self.quality}")
        if self.min_side < 16:
            raise ValueError(f"min_side must be >= 16 pixels, got {self.min_side}")
        if self.max_side < _MIN_VIEW_SIDE:
            raise ValueError(f"max_side must be >= {_MIN_VIEW_SIDE} pixels, got {self.max_side}")
        if not re.fullmatch(r"[A-Za-z0-9_-]+", self.name):
            raise ValueError(f"name must be letters, digits, '_' or '-', got {self.name!r}")
        for key in ("landmark_fraction", "visible_easy", "visible_hard", "visible_junk", "mild_warp",
                    "strong_warp", "mild_light", "strong_light", "scale", "occlusion"):
            lo, hi = getattr(self, key)
            if not 0.0 <= lo <= hi:
                raise ValueError(f"{key} must be a range 0 <= low <= high, got {getattr(self, key)}")
        for key in ("landmark_fraction", "visible_easy", "visible_hard", "visible_junk", "occlusion"):
            if getattr(self, key)[1] > 1.0:
                raise ValueError(f"{key} must lie in [0, 1], got {getattr(self, key)}")
        if self.scale[0] <= 0 or self.landmark_fraction[0] <= 0:
            raise ValueError(f"scale and landmark_fraction must be positive, got {self.scale}, {self.landmark_fraction}")
        if not 0.0 < self.junk_below < self.easy_from <= 1.0:
            raise ValueError(f"need 0 < junk_below < easy_from <= 1, got junk_below={self.junk_below}, "
                             f"easy_from={self.easy_from}")
        if not 0.0 <= self.band < (self.easy_from - self.junk_below) / 2:
            raise ValueError(f"band must be in [0, (easy_from - junk_below) / 2), got {self.band}")
        if self.visible_junk[1] > self.junk_below - self.band:
            raise ValueError(f"visible_junk must end below junk_below - band, got {self.visible_junk}")
        if not self.junk_below + self.band <= self.visible_hard[0]:
            raise ValueError(f"visible_hard must start above junk_below + band, got {self.visible_hard}")
        if self.visible_easy[0] < self.easy_from + self.band:
            raise ValueError(f"visible_easy must start at easy_from + band or above, got {self.visible_easy}")
        if self.strong_warp[0] <= self.mild_warp[1] or self.strong_light[0] <= self.mild_light[1]:
            raise ValueError(f"strong ranges must start above the mild ones, got warp {self.mild_warp} / "
                             f"{self.strong_warp}, light {self.mild_light} / {self.strong_light}")
        if self.strong_warp[1] >= 0.3:
            raise ValueError(f"strong_warp must stay below 0.3 (a window must stay convex), got {self.strong_warp}")
        if self.context <= 0 or self.mild_warp[1] * (1 + 2 * self.context) >= self.context:
            # A query's window is the site jittered inwards: the jitter must not reach the landmark.
            raise ValueError(f"context must be > 0 and exceed mild_warp[1] * (1 + 2 * context), got "
                             f"context={self.context}, mild_warp={self.mild_warp}")
        if len(self.view_mix) != 3 or min(self.view_mix) < 0 or sum(self.view_mix) <= 0:
            raise ValueError(f"view_mix must be three shares (easy, hard, junk) >= 0, not all 0, got {self.view_mix}")
        if not 0.0 <= self.occluded_share <= 1.0:
            raise ValueError(f"occluded_share must be in [0, 1], got {self.occluded_share}")


def view_label(visible: float, warp: float, light: float, config: LandmarkSetConfig = LandmarkSetConfig()) -> str:
    """The label of a database view of a landmark: 'junk', 'easy' or 'hard' (module docstring)."""
    if visible < config.junk_below:
        return "junk"
    if visible >= config.easy_from and warp <= config.mild_warp[1] and light <= config.mild_light[1]:
        return "easy"
    return "hard"


def light_strength(light: dict[str, float]) -> float:
    """max(|ln gamma|, |ln gain|, |ln contrast|, |temperature|) of a relighting's parameters."""
    return float(max(abs(math.log(light["gamma"])), abs(math.log(light["gain"])),
                     abs(math.log(light["contrast"])), abs(light["temperature"])))


@dataclass
class ViewRecord:
    """One image of the set. role: 'easy' | 'hard' | 'junk' (a database view of `landmark`),
    'distractor' (a database image of no landmark) or 'query'. window: [x1, y1, x2, y2], the
    photograph rectangle the view was aimed at before its corners were jittered; quad: (4, 2) photograph points
    (x, y) mapped onto the image's corners (0, 0), (w, 0), (w, h), (0, h); homography: the 3x3
    photograph -> image map; size: (w, h); occluder: [x1, y1, x2, y2] in the image or None;
    visible / warp / light_strength: as in the module docstring; light: gamma, gain, contrast,
    temperature; blur (Gaussian sigma, pixels), noise (std, grey levels); bbx: a query's box
    around its landmark [x1, y1, x2, y2] in the image (None for database images)."""

    name: str
    role: str
    landmark: int                  # -1 for distractors
    photo: str
    window: list[float]
    quad: list[list[float]]
    homography: list[list[float]]
    size: tuple[int, int]
    occluder: list[float] | None
    visible: float
    warp: float
    light: dict[str, float]
    light_strength: float
    blur: float
    noise: float
    bbx: list[float] | None = None


@dataclass
class Landmark:
    """A landmark: its photograph, its box (left, top, right, bottom) and its site (the box with
    the surroundings its views may show)."""

    index: int
    photo: str
    box: tuple[int, int, int, int]
    site: tuple[int, int, int, int]


@dataclass
class LandmarkSet:
    """A written landmark set: the paths (module docstring), imlist and qimlist (names without
    '.jpg'), the landmarks, every image's record by name, and the photo split (role -> names)."""

    folder: str
    jpg: str
    gnd: str
    database_list: str
    query_list: str
    metadata: str
    imlist: list[str]
    qimlist: list[str]
    landmarks: list[Landmark]
    records: dict[str, ViewRecord]
    photos: dict[str, list[str]] = field(default_factory=dict)

    @property
    def n_landmarks(self) -> int:
        return len(self.landmarks)

    @property
    def n_database(self) -> int:
        return len(self.imlist)

    @property
    def n_queries(self) -> int:
        return len(self.qimlist)

    def count(self, role: str) -> int:
        """How many images have `role` ('easy', 'hard', 'junk', 'distractor', 'query')."""
        return sum(r.role == role for r in self.records.values())


# ---------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------

def _box_polygon(box) -> np.ndarray:
    x0, y0, x1, y1 = (float(v) for v in box)
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float32)


def _intersection(a: np.ndarray, b: np.ndarray) -> tuple[float, np.ndarray | None]:
    area, poly = cv2.intersectConvexConvex(a.astype(np.float32), b.astype(np.float32))
    if area <= 0 or poly is None or len(poly) < 3:
        return 0.0, None
    return float(area), poly.reshape(-1, 2)


def visible_share(box, quad: np.ndarray, occluder_quad: np.ndarray | None) -> float:
    """Share of `box`'s (left, top, right, bottom) area inside the convex (4, 2) `quad` and outside
    the convex `occluder_quad` (photograph coordinates)."""
    landmark = _box_polygon(box)
    area, inside = _intersection(landmark, quad)
    if inside is not None and occluder_quad is not None:
        area -= _intersection(inside, occluder_quad)[0]
    return max(0.0, area) / float(cv2.contourArea(landmark))


def _axis_window(rng: np.random.Generator, l0: float, l1: float, s0: float, s1: float, share: float) -> tuple[float, float]:
    """An interval that overlaps [l0, l1] (the landmark) by `share` of its length and stays in
    [s0, s1] (the site): inside the landmark, or running off one side into the surroundings."""
    side = l1 - l0
    overlap = share * side
    if share >= 0.999:
        return l0 - rng.uniform() * (l0 - s0), l1 + rng.uniform() * (s1 - l1)
    mode = int(rng.integers(3))
    if mode == 0:
        start = rng.uniform(l0, l1 - overlap)
        return start, start + overlap
    if mode == 1:
        return l0 - rng.uniform() * (l0 - s0), l0 + overlap
    return l1 - overlap, l1 + rng.uniform() * (s1 - l1)


def _jitter(rng: np.random.Generator, window, site, warp: float) -> tuple[np.ndarray, float]:
    """The window's corners (tl, tr, br, bl) each moved up to `warp` of its shorter side (one by
    exactly that much) and kept in the site; returns the quad and the largest displacement as a
    share of the shorter side."""
    corners = _box_polygon(window).astype(np.float64)
    short = min(window[2] - window[0], window[3] - window[1])
    while True:
        radius = warp * short * rng.uniform(0.3, 1.0, size=4)
        radius[int(rng.integers(4))] = warp * short
        angle = rng.uniform(0, 2 * np.pi, size=4)
        quad = corners + np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)
        quad[:, 0] = np.clip(quad[:, 0], site[0], site[2])
        quad[:, 1] = np.clip(quad[:, 1], site[1], site[3])
        quad32 = quad.astype(np.float32)
        # The visible share is measured by clipping convex polygons: a quad must stay convex (it
        # does for jitters under 0.3 of the side but for rare draws, which are drawn again).
        if cv2.isContourConvex(quad32.reshape(-1, 1, 2)):
            break
    moved = float(np.linalg.norm(quad32.astype(np.float64) - corners, axis=1).max()) / short
    return quad32, moved


def _output_size(window, scale: float, max_side: int) -> tuple[int, int]:
    ww, wh = window[2] - window[0], window[3] - window[1]
    scale = min(scale, max_side / max(ww, wh))
    scale = max(scale, _MIN_VIEW_SIDE / min(ww, wh))
    return max(1, int(round(ww * scale))), max(1, int(round(wh * scale)))


def _homography(quad: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    w, h = size
    dst = np.array([[0, 0], [w, 0], [w, h], [0, h]], dtype=np.float32)
    return cv2.getPerspectiveTransform(quad.astype(np.float32), dst)


def _occluder(rng: np.random.Generator, size: tuple[int, int], share: float) -> list[float]:
    w, h = size
    aspect = rng.uniform(0.5, 2.0)
    ow = min(float(w), math.sqrt(share * w * h * aspect))
    oh = min(float(h), share * w * h / ow)
    x0, y0 = rng.uniform(0, w - ow), rng.uniform(0, h - oh)
    return [float(x0), float(y0), float(x0 + ow), float(y0 + oh)]


def _back(points: np.ndarray, homography: np.ndarray) -> np.ndarray:
    """Image points -> photograph points."""
    return cv2.perspectiveTransform(points.reshape(-1, 1, 2).astype(np.float64), np.linalg.inv(homography)).reshape(-1, 2)


# ---------------------------------------------------------------------------------------------
# Drawing and rendering views
# ---------------------------------------------------------------------------------------------

@dataclass
class _Draw:
    window: tuple[float, float, float, float]
    quad: np.ndarray
    size: tuple[int, int]
    homography: np.ndarray
    occluder: list[float] | None
    visible: float
    warp: float
    light_strength: float


def _draw_relighting(rng: np.random.Generator, strength: float) -> dict[str, float]:
    """Relighting parameters whose strength (`light_strength`) is exactly `strength`: one
    component at full strength, the others up to half of it."""
    comps = rng.uniform(-0.5, 0.5, size=4) * strength
    comps[int(rng.integers(4))] = strength * (1.0 if rng.uniform() < 0.5 else -1.0)
    return {"gamma": float(math.exp(comps[0])), "gain": float(math.exp(comps[1])),
            "contrast": float(math.exp(comps[2])), "temperature": float(comps[3])}


def _draw_geometry(rng: np.random.Generator, config: LandmarkSetConfig, landmark, site, window,
                   warp: float, occluded: bool) -> _Draw:
    quad, moved = _jitter(rng, window, site, warp)
    size = _output_size(window, float(rng.uniform(*config.scale)), config.max_side)
    homography = _homography(quad, size)
    occ = _occluder(rng, size, float(rng.uniform(*config.occlusion))) if occluded else None
    occ_quad = _back(_box_polygon(occ), homography).astype(np.float32) if occ is not None else None
    visible = visible_share(landmark, quad, occ_quad) if landmark is not None else 0.0
    return _Draw(tuple(float(v) for v in window), quad, size, homography, occ, visible, moved, 0.0)


def _view_plan(rng: np.random.Generator, config: LandmarkSetConfig, kind: str) -> tuple[float, float, float]:
    """(visible share aimed at, warp, light strength) of a view meant to be `kind`."""
    def pick(r):
        return float(rng.uniform(*r))

    if kind == "easy":
        return pick(config.visible_easy), pick(config.mild_warp), pick(config.mild_light)
    if kind == "junk":
        strong = rng.uniform() < 0.5
        return (pick(config.visible_junk), pick(config.strong_warp if strong else config.mild_warp),
                pick(config.strong_light if rng.uniform() < 0.5 else config.mild_light))
    if kind == "hard":
        if rng.uniform() < 0.5:   # a clearly smaller part of the landmark
            return pick(config.visible_hard), pick(config.mild_warp), pick(config.mild_light)
        which = int(rng.integers(3))  # most of it, strongly warped, re-lit or both
        return (pick(config.visible_easy), pick(config.strong_warp if which != 1 else config.mild_warp),
                pick(config.strong_light if which != 0 else config.mild_light))
    raise AssertionError(kind)


def _clear_of_thresholds(visible: float, config: LandmarkSetConfig) -> bool:
    return abs(visible - config.junk_below) >= config.band and abs(visible - config.easy_from) >= config.band


def _draw_landmark_view(rng: np.random.Generator, config: LandmarkSetConfig, lm: Landmark,
                        kind: str) -> tuple[_Draw, str] | None:
    """A view aimed at `kind`; its label is what `view_label` says of what it shows. Redrawn until
    it is that kind (or, after `_TRIES`, any draw clear of the thresholds); None if none is."""
    fallback = None
    for _ in range(_TRIES):
        target, warp, light = _view_plan(rng, config, kind)
        a = rng.uniform(0.25, 0.75)    # how the visible share splits between width and height
        (lx0, ly0, lx1, ly1), (sx0, sy0, sx1, sy1) = lm.box, lm.site
        x0, x1 = _axis_window(rng, lx0, lx1, sx0, sx1, target ** a)
        y0, y1 = _axis_window(rng, ly0, ly1, sy0, sy1, target ** (1 - a))
        draw = _draw_geometry(rng, config, lm.box, lm.site, (x0, y0, x1, y1), warp,
                              occluded=rng.uniform() < config.occluded_share)
        draw.light_strength = light
        if not _clear_of_thresholds(draw.visible, config):
            continue
        label = view_label(draw.visible, draw.warp, light, config)
        if label == kind:
            return draw, label
        fallback = fallback or (draw, label)
    return fallback


def _draw_query(rng: np.random.Generator, config: LandmarkSetConfig, lm: Landmark) -> _Draw:
    for _ in range(_TRIES):
        draw = _draw_geometry(rng, config, lm.box, lm.site, lm.site, float(rng.uniform(*config.mild_warp)), False)
        if draw.visible >= _FULL:
            draw.light_strength = float(rng.uniform(*config.mild_light))
            return draw
    raise AssertionError("the configuration check keeps a query's jitter off its landmark")


def _draw_distractor(rng: np.random.Generator, config: LandmarkSetConfig, photo: np.ndarray) -> _Draw:
    h, w = photo.shape[:2]
    fw, fh = rng.uniform(0.2, 0.6, size=2)
    cw, ch = max(min(w, config.min_side), int(w * fw)), max(min(h, config.min_side), int(h * fh))
    left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    strong = rng.uniform() < 0.5
    draw = _draw_geometry(rng, config, None, (0, 0, w, h), (left, top, left + cw, top + ch),
                          float(rng.uniform(*(config.strong_warp if strong else config.mild_warp))),
                          occluded=rng.uniform() < config.occluded_share)
    draw.light_strength = float(rng.uniform(*(config.strong_light if rng.uniform() < 0.5 else config.mild_light)))
    return draw


def _render(rng: np.random.Generator, photo: np.ndarray, site, draw: _Draw, config: LandmarkSetConfig) -> tuple[np.ndarray, dict, float, float]:
    """The view's pixels (h, w, 3) uint8, its relighting, blur sigma and noise std."""
    w, h = draw.size
    # Only the site is read (a neighbouring landmark's pixels never leak in by interpolation),
    # and it is shrunk first with INTER_AREA when the view is smaller: warpPerspective alone
    # would alias.
    qx0, qy0 = np.floor(draw.quad.min(axis=0)).astype(int) - 2
    qx1, qy1 = np.ceil(draw.quad.max(axis=0)).astype(int) + 2
    x0, y0 = max(int(site[0]), int(qx0)), max(int(site[1]), int(qy0))
    x1, y1 = min(int(site[2]), int(qx1)), min(int(site[3]), int(qy1))
    crop = photo[y0:y1, x0:x1]
    scale = min(1.0, max(w, h) / max(1.0, float(np.ptp(draw.quad, axis=0).max())))
    if scale < 1.0:
        crop = cv2.resize(crop, (max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale))),
                          interpolation=cv2.INTER_AREA)
    sx, sy = crop.shape[1] / (x1 - x0), crop.shape[0] / (y1 - y0)
    to_crop = np.array([[sx, 0, -x0 * sx], [0, sy, -y0 * sy], [0, 0, 1]], dtype=np.float64)
    out = cv2.warpPerspective(crop, draw.homography @ np.linalg.inv(to_crop), (w, h),
                              flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    light = _draw_relighting(rng, draw.light_strength)
    strong = draw.warp > config.mild_warp[1] or draw.light_strength > config.mild_light[1]
    blur = float(rng.uniform(0.6, 1.6)) if strong and rng.uniform() < 0.5 else 0.0
    noise = float(rng.uniform(2.0, 6.0)) if strong and rng.uniform() < 0.3 else 0.0
    # Relighting is a function of each channel's value once the mean is known: one lookup table
    # per channel (temperature gains, contrast about the mean, gain, then gamma).
    gains = np.array([1.0 + light["temperature"], 1.0, 1.0 - light["temperature"]])
    mean = float((out.reshape(-1, 3).mean(axis=0) / 255.0 * gains).mean())
    levels = np.arange(256, dtype=np.float64)[:, None] / 255.0 * gains[None, :]
    table = np.clip(((levels - mean) * light["contrast"] + mean) * light["gain"], 0.0, 1.0) ** light["gamma"]
    table = (table * 255.0 + 0.5).astype(np.uint8)
    out = np.stack([table[out[..., c], c] for c in range(3)], axis=-1)
    if blur > 0:
        out = cv2.GaussianBlur(out, (0, 0), blur)
    if noise > 0:
        out = np.clip(out + rng.normal(0.0, noise, size=out.shape), 0, 255).round().astype(np.uint8)
    if draw.occluder is not None:
        # A textured blob of no photograph (a tree, a passer-by): a colour with low-frequency shading.
        ox0, oy0, ox1, oy1 = (int(round(v)) for v in draw.occluder)
        if ox1 > ox0 and oy1 > oy0:
            shade = cv2.resize(rng.uniform(-0.15, 0.15, size=(4, 4)).astype(np.float32), (ox1 - ox0, oy1 - oy0),
                               interpolation=cv2.INTER_CUBIC)
            colour = rng.uniform(0.1, 0.9, size=3).astype(np.float32)
            out[oy0:oy1, ox0:ox1] = (np.clip(colour + shade[..., None], 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return np.ascontiguousarray(out), light, blur, noise


def _record(name: str, role: str, landmark: int, photo: str, draw: _Draw, light: dict, blur: float,
            noise: float, bbx: list[float] | None = None) -> ViewRecord:
    return ViewRecord(
        name=name, role=role, landmark=landmark, photo=photo, window=list(draw.window),
        quad=[[float(x), float(y)] for x, y in draw.quad], homography=[[float(v) for v in row] for row in draw.homography],
        size=draw.size, occluder=draw.occluder, visible=float(draw.visible), warp=float(draw.warp),
        light=light, light_strength=light_strength(light), blur=blur, noise=noise, bbx=bbx,
    )


def _kinds(config: LandmarkSetConfig) -> list[str]:
    """The labels one landmark's views aim at: view_mix shares of views_per_landmark, by largest remainder."""
    shares = np.asarray(config.view_mix, dtype=np.float64) / sum(config.view_mix) * config.views_per_landmark
    counts = np.floor(shares).astype(int)
    for i in np.argsort(-(shares - counts), kind="stable")[: config.views_per_landmark - counts.sum()]:
        counts[i] += 1
    return [kind for kind, c in zip(LABELS, counts) for _ in range(c)]


# ---------------------------------------------------------------------------------------------
# The set
# ---------------------------------------------------------------------------------------------

def _separate_sites(photo: np.ndarray, n: int, rng: np.random.Generator, min_side: int,
                    fraction: tuple[float, float], min_contrast: float, work_side: int = 512) -> list[tuple[int, int, int, int]]:
    """Up to `n` disjoint boxes of `photo` (copyset's `separate_crops`), drawn on a copy at most
    `work_side` pixels on its longer side: the contrast test of each candidate then reads 16x fewer
    pixels of a 2048-pixel photograph. Scaling back is monotonic, so the boxes stay disjoint."""
    h, w = photo.shape[:2]
    f = max(1.0, max(h, w) / work_side)
    small = photo if f == 1.0 else cv2.resize(photo, (max(1, round(w / f)), max(1, round(h / f))),
                                              interpolation=cv2.INTER_AREA)
    boxes = separate_crops(small, n, rng, 0.0, max(1, math.ceil(min_side / f)), fraction, min_contrast)
    return [(min(w, round(l * f)), min(h, round(t * f)), min(w, round(r * f)), min(h, round(b * f)))
            for l, t, r, b in boxes]


def _place_landmarks(photos: dict[str, np.ndarray], names: list[str], config: LandmarkSetConfig,
                     rng: np.random.Generator) -> list[Landmark]:
    grow = 1.0 + 2.0 * config.context
    per_photo = math.ceil(config.n_landmarks / len(names))
    fraction = (min(1.0, config.landmark_fraction[0] * grow), min(1.0, config.landmark_fraction[1] * grow))
    # One site more than an even share per photograph: where a small or flat photograph gives
    # fewer, the round robin takes the spare ones of the others.
    sites = {name: _separate_sites(photos[name], per_photo + 1, rng, math.ceil(config.min_side * grow), fraction,
                                   config.min_contrast) for name in names}
    landmarks: list[Landmark] = []
    for i in range(per_photo + 1):   # round robin, so that every photograph gives landmarks
        for name in names:
            if i < len(sites[name]) and len(landmarks) < config.n_landmarks:
                sx0, sy0, sx1, sy1 = sites[name][i]
                mx, my = (sx1 - sx0) * config.context / grow, (sy1 - sy0) * config.context / grow
                box = (int(math.ceil(sx0 + mx)), int(math.ceil(sy0 + my)), int(sx1 - mx), int(sy1 - my))
                landmarks.append(Landmark(len(landmarks), name, box, (sx0, sy0, sx1, sy1)))
    return landmarks


def _check_photos(photos: dict[str, np.ndarray]) -> None:
    for name, arr in photos.items():
        if not isinstance(arr, np.ndarray) or arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"photos[{name!r}] must be an (h, w, 3) uint8 array, got "
                             f"{getattr(arr, 'dtype', type(arr))} {getattr(arr, 'shape', '')}")


def write_landmark_set(folder: str, config: LandmarkSetConfig = LandmarkSetConfig(),
                       photos: dict[str, np.ndarray] | None = None) -> LandmarkSet:
    """Write the set described in the module docstring; returns its paths, lists and records.

    `photos`: name -> RGB uint8 (h, w, 3) photographs (default: scikit-image's,
    `raysearch.samples.sample_photographs`). The same photographs and config give the same files.
    """
    if photos is None:
        from raysearch.samples import sample_photographs

        photos = sample_photographs()
    _check_photos(photos)
    rng = np.random.default_rng(config.seed)
    names = [str(x) for x in rng.permutation(sorted(photos))]
    n_held = config.distractor_photos if config.n_distractors > 0 else 0
    if len(names) - n_held < 1:
        raise ValueError(f"only {len(names)} photographs: distractor_photos={config.distractor_photos} leaves none "
                         "for landmarks")
    distractor_names, landmark_names = names[:n_held], names[n_held:]
    landmarks = _place_landmarks(photos, landmark_names, config, rng)
    if not landmarks:
        raise ValueError(f"no landmark of min_side={config.min_side} and min_contrast={config.min_contrast} fits in "
                         f"the {len(landmark_names)} landmark photographs")

    jpg = os.path.join(folder, "jpg")
    os.makedirs(jpg, exist_ok=True)

    # Database images are drawn first and named afterwards in a shuffled order, so that neither a
    # name nor an imlist position tells a landmark's views (or the distractors) apart.
    database: list[tuple[str, int, str, _Draw, tuple]] = []   # role, landmark, photo, draw, site
    for lm in landmarks:
        for kind in _kinds(config):
            got = _draw_landmark_view(rng, config, lm, kind)
            if got is not None:
                database.append((got[1], lm.index, lm.photo, got[0], lm.site))
    for i in range(config.n_distractors):
        name = distractor_names[i % len(distractor_names)]
        h, w = photos[name].shape[:2]
        database.append(("distractor", -1, name, _draw_distractor(rng, config, photos[name]), (0, 0, w, h)))
    order = rng.permutation(len(database))

    records: dict[str, ViewRecord] = {}
    imlist: list[str] = []
    for position, index in enumerate(order):
        role, lm_index, photo, draw, site = database[int(index)]
        name = f"db{position:06d}"
        pixels, light, blur, noise = _render(rng, photos[photo], site, draw, config)
        Image.fromarray(pixels).save(os.path.join(jpg, name + ".jpg"), quality=config.quality)
        records[name] = _record(name, role, lm_index, photo, draw, light, blur, noise)
        imlist.append(name)

    index_of = {name: i for i, name in enumerate(imlist)}
    qimlist: list[str] = []
    gnd: list[dict] = []
    for lm in landmarks:
        own = {label: sorted(index_of[r.name] for r in records.values() if r.landmark == lm.index and r.role == label)
               for label in LABELS}
        for _ in range(config.queries_per_landmark):
            name = f"q{len(qimlist):05d}"
            draw = _draw_query(rng, config, lm)
            corners = cv2.perspectiveTransform(_box_polygon(lm.box).reshape(-1, 1, 2).astype(np.float64),
                                               draw.homography).reshape(-1, 2)
            w, h = draw.size
            bbx = [float(np.clip(corners[:, 0].min(), 0, w)), float(np.clip(corners[:, 1].min(), 0, h)),
                   float(np.clip(corners[:, 0].max(), 0, w)), float(np.clip(corners[:, 1].max(), 0, h))]
            pixels, light, blur, noise = _render(rng, photos[lm.photo], lm.site, draw, config)
            Image.fromarray(pixels).save(os.path.join(jpg, name + ".jpg"), quality=config.quality)
            records[name] = _record(name, "query", lm.index, lm.photo, draw, light, blur, noise, bbx)
            qimlist.append(name)
            gnd.append({"bbx": bbx, "easy": list(own["easy"]), "hard": list(own["hard"]), "junk": list(own["junk"])})

    gnd_path = os.path.join(folder, f"gnd_{config.name}.pkl")
    with open(gnd_path, "wb") as f:
        # Protocol 2 and plain lists, ints and floats: what revisitop's own loader reads.
        pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}, f, protocol=2)
    database_list = os.path.join(folder, "database.txt")
    query_list = os.path.join(folder, "queries.txt")
    for path, listed in ((database_list, imlist), (query_list, qimlist)):
        with open(path, "w") as f:
            f.write("".join(f"jpg/{name}.jpg\n" for name in listed))
    roles = {"landmarks": landmark_names, "distractors": distractor_names}
    metadata = os.path.join(folder, "landmarks.json")
    with open(metadata, "w") as f:
        json.dump({"config": dataclasses.asdict(config), "photos": roles,
                   "landmarks": [dataclasses.asdict(lm) for lm in landmarks],
                   "images": {name: dataclasses.asdict(r) for name, r in records.items()}}, f, indent=1)
    return LandmarkSet(folder, jpg, gnd_path, database_list, query_list, metadata, imlist, qimlist, landmarks,
                       records, roles)
