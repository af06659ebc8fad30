"""Choosing a FAISS index for a collection: the factory string, and how many vectors train it.

`choose_factory` follows the usual progression: exact search while it is cheap, then an inverted
file over full vectors, then product-quantised codes when the full vectors no longer fit the memory
budget. nlist is a power of two near 4*sqrt(N), bounded so that every centroid gets enough training
points.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import faiss

# Exact (Flat) search stays fast enough on one CPU up to about this many vectors.
FLAT_MAX_VECTORS = 100_000
# IVF-Flat is preferred to PQ up to this many vectors when the vectors fit in memory.
IVF_FLAT_MAX_VECTORS = 2_000_000
# FAISS k-means warns below 39 points per centroid; we ask for more for stable centroids.
MIN_POINTS_PER_CENTROID = 39
TRAIN_POINTS_PER_CENTROID = 64
PQ_CODEBOOK_TRAIN = 256 * 64   # 64 points per PQ centroid (256 centroids per sub-quantiser)
MAX_TRAIN = 1_000_000
ID_BYTES = 8                    # int64 id stored with each vector in inverted lists

_MEMORY_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_memory(text: str | int) -> int:
    """'4G', '512M', '1.5G', '1000000' -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"--max-index-memory must look like 4G, 512M or 1000000, got {text!r}")
    return int(float(m.group(1)) * _MEMORY_UNITS[m.group(2).upper()])


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def nlist_for(n: int) -> int:
    """A power of two near 4*sqrt(n), with at least MIN_POINTS_PER_CENTROID points per list."""
    if n < 2 * MIN_POINTS_PER_CENTROID:
        return 1
    target = 4 * math.sqrt(n)
    nlist = 2 ** max(0, round(math.log2(target)))
    while nlist > 1 and n < nlist * MIN_POINTS_PER_CENTROID:
        nlist //= 2
    return nlist


def _pq_m_choices(d: int) -> list[int]:
    """Sub-quantiser counts that divide d (codes of m bytes at 8 bits), largest first."""
    return [m for m in (64, 48, 32, 24, 16, 12, 8, 4) if 2 * m <= d and d % m == 0]


@dataclass(frozen=True)
class IndexChoice:
    factory: str
    reason: str
    estimated_bytes: int


def choose_factory(n: int, d: int, max_memory: int | str = "4G") -> IndexChoice:
    """Pick a factory string for `n` vectors of dimension `d` within `max_memory` bytes."""
    if n < 1:
        raise ValueError(f"cannot build an index over {n} vectors")
    budget = parse_memory(max_memory)
    flat_bytes = n * d * 4
    if n <= FLAT_MAX_VECTORS and flat_bytes <= budget:
        return IndexChoice(
            "Flat",
            f"{n} vectors: exact search is fast enough and needs {format_bytes(flat_bytes)} "
            f"(budget {format_bytes(budget)})",
            flat_bytes,
        )
    nlist = nlist_for(n)
    ivf_flat_bytes = n * (d * 4 + ID_BYTES) + nlist * d * 4
    if n <= IVF_FLAT_MAX_VECTORS and ivf_flat_bytes <= budget:
        return IndexChoice(
            f"IVF{nlist},Flat",
            f"{n} vectors: inverted file with nlist={nlist} (~4*sqrt(N)) over full vectors, "
            f"{format_bytes(ivf_flat_bytes)} within budget {format_bytes(budget)}",
            ivf_flat_bytes,
        )
    why_not_flat = (
        f"full vectors need {format_bytes(ivf_flat_bytes)} > budget {format_bytes(budget)}"
        if ivf_flat_bytes > budget
        else f"more than {IVF_FLAT_MAX_VECTORS} vectors make full-vector scans slow"
    )
    for m in _pq_m_choices(d):
        code_bytes = n * (m + ID_BYTES) + nlist * d * 4
        if code_bytes <= budget:
            return IndexChoice(
                f"IVF{nlist},PQ{m}",
                f"{n} vectors of dim {d}: {why_not_flat}; nlist={nlist} (~4*sqrt(N)), PQ codes of "
                f"{m} bytes per vector need {format_bytes(code_bytes)}",
                code_bytes,
            )
    m = _pq_m_choices(d)[-1] if _pq_m_choices(d) else 4
    raise ValueError(
        f"{n} vectors of dim {d} do not fit in --max-index-memory {format_bytes(budget)} even with "
        f"PQ{m} codes ({format_bytes(n * (m + ID_BYTES))}); raise the budget or use more shards"
    )


def parse_nlist(factory: str) -> int | None:
    m = re.search(r"IVF(\d+)", factory)
    return int(m.group(1)) if m else None


def training_size(index: faiss.Index, n: int) -> int:
    """How many vectors to train `index` on (all of them if there are fewer)."""
    ivf = _find_ivf(index)
    want = 0
    if ivf is not None:
        want = max(want, ivf.nlist * TRAIN_POINTS_PER_CENTROID)
    if _has_pq(index):
        want = max(want, PQ_CODEBOOK_TRAIN)
    if not index.is_trained and want == 0:
        want = 65_536
    return int(min(n, max(want, 1), MAX_TRAIN))


def min_training_vectors(index: faiss.Index) -> int:
    """Fewer training vectors than this and FAISS fails (k-means needs one point per centroid)."""
    need = 0
    ivf = _find_ivf(index)
    if ivf is not None:
        need = max(need, ivf.nlist)
    pq = _find_pq(index)
    if pq is not None:
        need = max(need, 1 << pq.nbits)
    return need


def _find_ivf(index: faiss.Index) -> faiss.IndexIVF | None:
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def _find_pq(index: faiss.Index):
    ivf = _find_ivf(index)
    base = faiss.downcast_index(ivf) if ivf is not None else faiss.downcast_index(index)
    if isinstance(base, faiss.IndexPreTransform):
        base = faiss.downcast_index(base.index)
    return getattr(base, "pq", None)


def _has_pq(index: faiss.Index) -> bool:
    return _find_pq(index) is not None


def set_training_seed(index: faiss.Index, seed: int) -> None:
    """Seed every k-means that training `index` runs (coarse quantiser, PQ codebooks)."""
    ivf = _find_ivf(index)
    if ivf is not None:
        ivf.cp.seed = seed
    pq = _find_pq(index)
    if pq is not None:
        pq.cp.seed = seed + 1
