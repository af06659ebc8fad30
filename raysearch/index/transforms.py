"""Vector transforms of an index: PCA-whitening learned once and stored inside the FAISS index,
splitting any index into its transforms and the index they feed, and id wrappers.

Whitening centres the vectors, rotates them onto their principal axes and divides each axis by the
square root of its variance (optionally keeping fewer axes), then L2-normalises again. Frequent,
"bursty" visual patterns that dominate raw CNN descriptors are down-weighted, which usually raises
retrieval quality (Jegou & Chum, ECCV 2012; Radenovic et al., TPAMI 2018).

Where it lives: the build wraps the index in a `faiss.IndexPreTransform` whose chain is
[PCAMatrix (eigen_power -0.5), NormalizationTransform (L2)]. `trained.index` and every shard carry
the chain, so every shard whitens the queries it is given, with nothing to configure at search
time. `read_whitening(index)` returns the transform as a matrix and a bias (y = normalise(A x + b)),
and `WhiteningTransform.torch_module()` gives the same map as a differentiable torch module (image
activation optimises images through model + whitening).

Regularisation: a sample of n vectors has at most n - 1 non-zero variances, and tiny variances
blown up by 1/sqrt(variance) amplify noise. The output keeps at most n - 1 axes, and a shrinkage
term (shrinkage * the mean variance over all input axes) is added to every variance before the
power.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from raysearch.formats.embeddings import (
    check_embeddings_model,
    load_embeddings_manifest,
    resolve_embeddings_folder,
    sample_embeddings,
)

log = logging.getLogger("raysearch")

EIGEN_POWER = -0.5
DEFAULT_SHRINKAGE = 0.1
DEFAULT_MAX_TRAIN = 100_000


@dataclass(frozen=True)
class WhiteningConfig:
    """How to learn PCA-whitening at build time.

    source: None learns it on the indexed embeddings themselves; otherwise an embeddings folder or
    an index directory (its embeddings) made with the index's model. The build orchestration
    (`raysearch.builder`) embeds an image SOURCE first and passes its folder here, with the SOURCE as
    `trained_on` (the name the manifest records).
    dim: axes kept (default: all, at most the number of training vectors - 1).
    shrinkage: added to every variance as a multiple of the mean variance (0 = plain PCA-whitening).
    """

    source: str | None = None
    dim: int | None = None
    shrinkage: float = DEFAULT_SHRINKAGE
    max_train: int = DEFAULT_MAX_TRAIN
    trained_on: str | None = None

    def __post_init__(self) -> None:
        if self.dim is not None and self.dim < 1:
            raise ValueError(f"--whiten-dim must be >= 1, got {self.dim}")
        if not np.isfinite(self.shrinkage) or self.shrinkage < 0:
            raise ValueError(f"--whiten-shrinkage must be >= 0, got {self.shrinkage}")
        if self.max_train < 2:
            raise ValueError(f"whitening needs at least 2 training vectors, max_train is {self.max_train}")


@dataclass
class WhiteningTransform:
    """y = normalise(A x + b): A (dim_out, dim_in) float32, b (dim_out,) float32."""

    A: np.ndarray
    b: np.ndarray
    normalize: bool = True

    @property
    def dim_in(self) -> int:
        """Dimension of the vectors the transform takes."""
        return int(self.A.shape[1])

    @property
    def dim_out(self) -> int:
        """Dimension of the vectors it returns."""
        return int(self.A.shape[0])

    def apply(self, x: np.ndarray) -> np.ndarray:
        """(n, dim_in) -> (n, dim_out) float32."""
        y = np.asarray(x, dtype=np.float32) @ self.A.T + self.b
        if self.normalize:
            y /= np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
        return y.astype(np.float32)

    def torch_module(self):
        """The same map as a torch module (differentiable), for use after EmbeddingModel."""
        import torch
        import torch.nn.functional as F

        A = torch.from_numpy(np.ascontiguousarray(self.A))
        b = torch.from_numpy(np.ascontiguousarray(self.b))
        normalize = self.normalize

        class _Whiten(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.register_buffer("A", A)
                self.register_buffer("b", b)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                y = x @ self.A.T + self.b
                return F.normalize(y, dim=-1) if normalize else y

        return _Whiten()


def learn_pca_whitening(xt: np.ndarray, dim: int | None = None, shrinkage: float = DEFAULT_SHRINKAGE):
    """Learn PCA-whitening on training vectors xt (n, d) float32; returns a trained faiss.PCAMatrix.

    The output keeps min(dim or d, n - 1) axes; epsilon = shrinkage * mean variance regularises
    the smallest variances.
    """
    xt = np.ascontiguousarray(xt, dtype=np.float32)
    n, d = xt.shape
    if n < 2:
        raise ValueError(f"whitening needs at least 2 training vectors, got {n}")
    dim_out = min(dim or d, d, n - 1)
    if dim is not None and dim > dim_out:
        log.warning("whitening: keeping %d axes instead of %d (only %d training vectors of dim %d)", dim_out, dim, n, d)
    pca = faiss.PCAMatrix(d, dim_out, EIGEN_POWER, False)
    # FAISS's eigenvalues are those of the scatter matrix (n times the variances); a tiny floor keeps
    # an exactly zero variance (duplicated training vectors) from dividing by zero.
    scatter_mean = float(((xt - xt.mean(axis=0)) ** 2).sum()) / d
    floor = 1e-9 * max(scatter_mean, 1e-30)
    pca.epsilon = floor
    pca.train(xt)
    eigenvalues = faiss.vector_to_array(pca.eigenvalues)
    pca.epsilon = float(shrinkage * eigenvalues.mean()) + floor
    pca.prepare_Ab()  # recompute A and b with the shrinkage
    return pca


def ensure_ids(index: faiss.Index) -> faiss.Index:
    """Indexes that cannot store ids themselves (Flat, HNSW, PQ, ...) get an IDMap wrapper; IVF
    indexes (with or without a pre-transform) keep ids in their inverted lists."""
    try:
        faiss.extract_index_ivf(index)
        return index
    except RuntimeError:
        pass
    if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        return index
    if isinstance(index, faiss.IndexPreTransform) and isinstance(
        faiss.downcast_index(index.index), (faiss.IndexIDMap, faiss.IndexIDMap2)
    ):
        return index  # whitening in front of an IDMap: ids stay on the inner index
    return faiss.IndexIDMap(index)


def wrap_index(pca, index):
    """Put [pca, L2 normalisation] in front of `index` (which must be untrained or trained on
    whitened vectors). Ids stay on the inner index (an IDMap is added where it cannot store them),
    so the inner index can also be searched directly with whitened vectors (query expansion)."""
    if index.d != pca.d_out:
        raise ValueError(f"the index has dimension {index.d}, the whitening outputs {pca.d_out}")
    inner = ensure_ids(index)
    wrapped = faiss.IndexPreTransform(inner)
    wrapped.prepend_transform(faiss.NormalizationTransform(pca.d_out, 2.0))
    wrapped.prepend_transform(pca)
    # The Python objects above do not own each other; a serialise round trip gives one index that
    # owns its whole chain.
    return faiss.deserialize_index(faiss.serialize_index(wrapped))


@dataclass
class PreTransformParts:
    """An index split into its vector transforms and the index they feed. `parent` keeps the
    FAISS objects alive (the transforms and inner index are views into it)."""

    parent: Any
    transforms: list
    inner: Any

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Map raw vectors (n, d_in) into the inner index's space (n, d_out)."""
        y = np.ascontiguousarray(x, dtype=np.float32)
        for vt in self.transforms:
            y = vt.apply(y)
        return y

    @property
    def quantiser(self) -> faiss.Index:
        """The inner index without id wrappers: the index whose codes represent the vectors."""
        inner = faiss.downcast_index(self.inner)
        while isinstance(inner, (faiss.IndexIDMap, faiss.IndexIDMap2)):
            inner = faiss.downcast_index(inner.index)
        return inner


def split_pretransform(index: faiss.Index) -> PreTransformParts:
    """(transforms, inner index) of an IndexPreTransform (also behind an outer id map); ([], index)
    for any other index."""
    parent = index
    index = faiss.downcast_index(index) if type(index) is faiss.Index else index
    if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        wrapped = faiss.downcast_index(index.index)
        if isinstance(wrapped, faiss.IndexPreTransform):
            index = wrapped
    if isinstance(index, faiss.IndexPreTransform):
        transforms = [faiss.downcast_VectorTransform(index.chain.at(i)) for i in range(index.chain.size())]
        return PreTransformParts(parent, transforms, faiss.downcast_index(index.index))
    return PreTransformParts(parent, [], index)


def read_whitening(index) -> WhiteningTransform | None:
    """The whitening an index applies (from `trained.index` or any shard), or None.

    Returns y = normalise(A x + b) for a [PCAMatrix (or any linear transform), L2 norm] chain.
    """
    parts = split_pretransform(index)
    if not parts.transforms:
        return None
    linear = [t for t in parts.transforms if isinstance(t, faiss.LinearTransform)]
    if len(linear) != 1:
        raise ValueError(f"unsupported pre-transform chain: {[type(t).__name__ for t in parts.transforms]}")
    lt = linear[0]
    A = faiss.vector_to_array(lt.A).astype(np.float32).reshape(lt.d_out, lt.d_in)
    b = faiss.vector_to_array(lt.b).astype(np.float32) if lt.have_bias else np.zeros(lt.d_out, np.float32)
    normalize = isinstance(parts.transforms[-1], faiss.NormalizationTransform)
    return WhiteningTransform(A=A, b=b, normalize=normalize)


# ---------------------------------------------------------------------------------------------
# Learning the whitening of a build
# ---------------------------------------------------------------------------------------------


def learn_whitening(config: WhiteningConfig, embeddings_dir: str, seed: int) -> tuple[Any, dict[str, Any]]:
    """Learn the whitening a build asked for on a sample of an embeddings folder: `config.source`
    (an embeddings folder made with the index's model) or, when None, the indexed `embeddings_dir`.
    Returns (trained faiss.PCAMatrix, manifest record)."""
    if config.source is None:
        train_dir, trained_on = embeddings_dir, "the indexed embeddings"
    else:
        train_dir = resolve_embeddings_folder(config.source)
        if train_dir is None:
            raise ValueError(
                f"whitening source {config.source!r} holds no embeddings: embed it first "
                "(raysearch build and raysearch index do so for an image SOURCE)"
            )
        check_embeddings_model(train_dir, load_embeddings_manifest(embeddings_dir)["model"], config.source)
        trained_on = config.trained_on or config.source
    xt = sample_embeddings(train_dir, config.max_train, seed)
    pca = learn_pca_whitening(xt, config.dim, config.shrinkage)
    record = {
        "method": "pca-whitening",
        "trained_on": trained_on,
        "n_train": int(xt.shape[0]),
        "dim_in": int(pca.d_in),
        "dim_out": int(pca.d_out),
        "eigen_power": EIGEN_POWER,
        "shrinkage": float(config.shrinkage),
        "epsilon": float(pca.epsilon),
        "stored_in": "IndexPreTransform chain [PCAMatrix, NormalizationTransform] of trained.index and "
                     "every shard; raysearch.index.transforms.read_whitening(index) -> A, b",
    }
    return pca, record
