"""Choosing a FAISS index for a collection: the factory string, and how many vectors train it.

`choose_factory` follows the usual progression, driven by the memory budget:

    Flat                       few vectors: exact search is cheap
    IVF{nlist},Flat            full vectors in an inverted file
    IVF{nlist},SQ8             1 byte per dimension (accuracy close to full vectors)
    OPQ{m}_{d'},IVF{nlist},PQ{m}            m-byte product-quantised codes, OPQ-rotated (and
                                             reduced to d' = 4 dims per sub-quantiser when d is larger)
    OPQ{2m}_{d'},IVF{nlist},PQ{2m}x4fsr     the same m bytes as 4-bit codes scanned with SIMD
                                             ("fast-scan"), once collections are large enough for list
                                             scanning to dominate search time

nlist is a power of two near 4*sqrt(N), bounded so that every centroid gets enough training points
from a training sample that is itself bounded (in vectors and bytes).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import faiss

# Exact (Flat) search stays fast enough on one CPU up to about this many vectors.
FLAT_MAX_VECTORS = 100_000
# FAISS k-means warns below 39 points per centroid; we ask for more for stable centroids.
MIN_POINTS_PER_CENTROID = 39
TRAIN_POINTS_PER_CENTROID = 64
PQ_CODEBOOK_TRAIN = 256 * 64      # 64 points per PQ centroid (256 centroids per 8-bit sub-quantiser)
MAX_TRAIN = 1_000_000             # k-means on more points barely moves the centroids
MAX_TRAIN_BYTES = 2 << 30         # the training sample must fit in the trainer's (GPU) memory
ID_BYTES = 8                      # int64 id stored with each vector in inverted lists
# From here on, scanning inverted lists dominates query time and 4-bit fast-scan codes (SIMD
# lookups in registers) answer several times faster than 8-bit codes of the same size, at a small
# cost in recall that the tuned nprobe absorbs. Below it, 8-bit codes are the more accurate choice.
FASTSCAN_MIN_VECTORS = 5_000_000
# FAISS keeps IVF-PQ's per-list distance tables in memory when they fit in this many bytes.
PRECOMPUTED_TABLE_MAX_BYTES = 2 << 30
PQ_CODE_BYTES = (128, 96, 64, 48, 32, 24, 16, 8)

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


def max_train_vectors(d: int) -> int:
    """The most vectors a training sample of dimension `d` may hold."""
    return int(max(1, min(MAX_TRAIN, MAX_TRAIN_BYTES // (4 * d))))


def nlist_for(n: int, max_train: int | None = None) -> int:
    """A power of two near 4*sqrt(n), with at least MIN_POINTS_PER_CENTROID points per list among
    the `n` vectors and among the `max_train` training vectors."""
    usable = min(n, max_train) if max_train else n
    if usable < 2 * MIN_POINTS_PER_CENTROID:
        return 1
    target = 4 * math.sqrt(n)
    nlist = 2 ** max(0, round(math.log2(target)))
    while nlist > 1 and usable < nlist * MIN_POINTS_PER_CENTROID:
        nlist //= 2
    return nlist


def pq_layout(d: int, code_bytes: int, fastscan: bool) -> tuple[int, int, int] | None:
    """(sub-quantisers M, bits per code, OPQ output dimension d') for `code_bytes` bytes per vector.

    8-bit codes get 4 dims per sub-quantiser and fast-scan 4-bit codes 2 (the usual operating
    points); when `d` is larger the OPQ transform also reduces the dimension, which speeds up the
    coarse quantiser too. None when `d` is too small for that many sub-quantisers.
    """
    nbits = 4 if fastscan else 8
    m = code_bytes * 8 // nbits
    dims_per_sub = 2 if fastscan else 4
    if m > d:
        return None
    d_out = min(m * dims_per_sub, d - d % m)
    return m, nbits, d_out


def pq_factory(nlist: int, d: int, code_bytes: int, fastscan: bool) -> str | None:
    layout = pq_layout(d, code_bytes, fastscan)
    if layout is None:
        return None
    m, _, d_out = layout
    code = f"PQ{m}x4fsr" if fastscan else f"PQ{m}"
    return f"OPQ{m}_{d_out},IVF{nlist},{code}"


def estimate_pq_bytes(n: int, d: int, nlist: int, code_bytes: int, fastscan: bool) -> int:
    """Memory of an OPQ + IVF-PQ index: codes + ids + centroids (+ FAISS's precomputed tables)."""
    m, nbits, d_out = pq_layout(d, code_bytes, fastscan) or (code_bytes, 8, d)
    total = n * (code_bytes + ID_BYTES) + nlist * d_out * 4 + d * d_out * 4
    table = nlist * m * (1 << nbits) * 4
    if not fastscan and table <= PRECOMPUTED_TABLE_MAX_BYTES:
        total += table
    return total


@dataclass(frozen=True)
class IndexChoice:
    factory: str
    reason: str
    estimated_bytes: int


def choose_factory(n: int, d: int, max_memory: int | str = "4G") -> IndexChoice:
    """Pick a factory string for `n` vectors of dimension `d` within `max_memory` bytes.

    Raises ValueError when even the smallest codes do not fit.
    """
    if n < 1:
        raise ValueError(f"cannot build an index over {n} vectors")
    if d < 1:
        raise ValueError(f"vector dimension must be >= 1, got {d}")
    budget = parse_memory(max_memory)
    fb = format_bytes
    flat_bytes = n * d * 4
    if n <= FLAT_MAX_VECTORS and flat_bytes <= budget:
        return IndexChoice(
            "Flat",
            f"{n} vectors: exact search is fast enough and needs {fb(flat_bytes)} (budget {fb(budget)})",
            flat_bytes,
        )
    nlist = nlist_for(n, max_train_vectors(d))
    centroid_bytes = nlist * d * 4
    ivf = f"nlist={nlist} (~4*sqrt(N))"
    ivf_flat_bytes = n * (d * 4 + ID_BYTES) + centroid_bytes
    if ivf_flat_bytes <= budget:
        return IndexChoice(
            f"IVF{nlist},Flat",
            f"{n} vectors: inverted file with {ivf} over full vectors, {fb(ivf_flat_bytes)} within budget {fb(budget)}",
            ivf_flat_bytes,
        )
    sq8_bytes = n * (d + ID_BYTES) + centroid_bytes
    if sq8_bytes <= budget:
        return IndexChoice(
            f"IVF{nlist},SQ8",
            f"{n} x {d}-d full vectors need {fb(ivf_flat_bytes)} > budget {fb(budget)}; {ivf}, "
            f"8-bit scalar codes need {fb(sq8_bytes)}",
            sq8_bytes,
        )
    fastscan = n >= FASTSCAN_MIN_VECTORS
    kind = "4-bit fast-scan" if fastscan else "8-bit"
    for code_bytes in PQ_CODE_BYTES:
        factory = pq_factory(nlist, d, code_bytes, fastscan)
        if factory is None:
            continue
        need = estimate_pq_bytes(n, d, nlist, code_bytes, fastscan)
        if need <= budget:
            m, _, d_out = pq_layout(d, code_bytes, fastscan)  # type: ignore[misc]
            return IndexChoice(
                factory,
                f"{n} x {d}-d: 8-bit scalar codes need {fb(sq8_bytes)} > budget {fb(budget)}; {ivf}, "
                f"OPQ rotation to {d_out} dims, {kind} PQ codes of {code_bytes} bytes per vector "
                f"({m} sub-quantisers), {fb(need)}",
                need,
            )
    smallest = PQ_CODE_BYTES[-1]
    raise ValueError(
        f"{n} vectors of dim {d} do not fit in --max-index-memory {fb(budget)} even with {smallest}-byte "
        f"PQ codes ({fb(estimate_pq_bytes(n, d, nlist, smallest, fastscan))}); raise the budget"
    )


def parse_nlist(factory: str) -> int | None:
    m = re.search(r"IVF(\d+)", factory)
    return int(m.group(1)) if m else None


def training_size(index: faiss.Index, n: int) -> int:
    """How many vectors to train `index` on (all of them if there are fewer)."""
    want = 0
    ivf = find_ivf(index)
    if ivf is not None:
        want = max(want, ivf.nlist * TRAIN_POINTS_PER_CENTROID)
    pq = find_pq(index)
    if pq is not None:
        want = max(want, (1 << pq.nbits) * TRAIN_POINTS_PER_CENTROID)
    if not index.is_trained and want == 0:
        want = 65_536   # scalar quantisers, pre-transforms: ranges and covariances settle quickly
    return int(min(n, max(want, 1), max_train_vectors(index.d)))


def min_training_vectors(index: faiss.Index) -> int:
    """Fewer training vectors than this and FAISS fails (k-means needs one point per centroid)."""
    need = 0
    ivf = find_ivf(index)
    if ivf is not None:
        need = max(need, ivf.nlist)
    pq = find_pq(index)
    if pq is not None:
        need = max(need, 1 << pq.nbits)
    pre = pretransform(index)
    if pre is not None:
        for i in range(pre.chain.size()):
            vt = pre.chain.at(i)
            need = max(need, vt.d_out)  # PCA/OPQ need at least as many points as output dims
    return need


def find_ivf(index: faiss.Index) -> faiss.IndexIVF | None:
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def pretransform(index: faiss.Index) -> faiss.IndexPreTransform | None:
    base = faiss.downcast_index(index)
    return base if isinstance(base, faiss.IndexPreTransform) else None


def find_pq(index: faiss.Index):
    """The ProductQuantizer of an (IVF-)PQ index, fast-scan included; None for other indexes."""
    ivf = find_ivf(index)
    base = faiss.downcast_index(ivf) if ivf is not None else faiss.downcast_index(index)
    if isinstance(base, faiss.IndexPreTransform):
        base = faiss.downcast_index(base.index)
    return getattr(base, "pq", None)


def set_training_seed(index: faiss.Index, seed: int) -> None:
    """Seed every k-means that training `index` runs (coarse quantiser, PQ codebooks)."""
    ivf = find_ivf(index)
    if ivf is not None:
        ivf.cp.seed = seed
    pq = find_pq(index)
    if pq is not None:
        pq.cp.seed = seed + 1
    # OPQ and PCA training are deterministic in FAISS (fixed internal seeds).
