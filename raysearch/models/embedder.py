"""The Embedder: the index's model loaded once, mapping pixels to L2-normalised vectors, and the
preprocessing every path shares (bytes -> decoded, resized pixels exactly as a build prepares them).

Used by the embedding pipeline's actors, the query path of search and serve, evaluation and
activation. Nothing here knows about indexes or Ray Data.
"""

from __future__ import annotations

import os
import threading

import numpy as np

from raysearch import storage
from raysearch.images import DecodeError, decode_image, resize_image
from raysearch.models.spec import ModelSpec


FAST_ENV = "RAYSEARCH_EMBED_FAST"

# Images per forward pass on a CPU. EfficientNet-Lite0 at 224 px with the fast settings on 2 cores,
# two one-thread processes at once (as the pipeline's two model actors run), alternated: 53 img/s
# per process at batch 4, 53 at 6, 48 at 8, 46 at 16, about 33 at 32; the pipeline on 2000 small
# photographs ran 63-66 img/s at 4, 61 at 2, 58 at 6, 52 at 8 and 40 at 32. A larger batch's
# activations (4.8 MB per image after the first expansion) spill out of the caches.
CPU_FORWARD_BATCH = 4


def fast_default() -> bool:
    """Whether embedding uses the fast inference settings: yes, unless the environment sets
    RAYSEARCH_EMBED_FAST=0, which gives the settings from before them (for benchmarks' before/after)."""
    return os.environ.get(FAST_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def use_bf16(device: str, fast: bool | None = None) -> bool:
    """Whether the model runs under bfloat16 autocast on `device`: on CUDA with the fast settings.

    bf16 is for GPUs only: on this CPU (AMX) it ran 1.9x faster but its vectors were as far as
    cosine 0.9966 from float32 (median 0.99974) on sample photographs, outside the CPU's stated
    tolerance of 0.9999.
    """
    fast = fast_default() if fast is None else fast
    return fast and str(device).startswith("cuda")


class Embedder:
    """A model (a resolved `ModelSpec`, as a dict) loaded once on `device` (default: CUDA when
    there is one); `embed_pixels` maps resized uint8 pixels to L2-normalised vectors.

    Parameters
    ----------
    spec : `ModelSpec.to_dict()` of the model.
    device : "cpu", "cuda", "cuda:1", ...; None: CUDA when there is one.
    torch_threads : torch's intra-op threads in this process (None: leave torch's setting).
    fast : the fast inference settings (None: on unless RAYSEARCH_EMBED_FAST=0). On every device:
        batch norms folded into the convolutions and channels_last weights and inputs
        (`build_model(for_inference=True)`); on CUDA also bfloat16 autocast and pinned host
        buffers. False: the settings from before (float32, NCHW on CPU), for comparisons.
    forward_batch : the most images one forward pass takes; larger inputs to `embed_pixels` run
        in slices of it (None: CPU_FORWARD_BATCH on a CPU with the fast settings, else no limit).
    """

    def __init__(self, spec: dict, device: str | None = None, torch_threads: int | None = None,
                 fast: bool | None = None, forward_batch: int | None = None):
        import torch

        from raysearch.models.registry import build_model

        if torch_threads:
            # Ray sets OMP_NUM_THREADS to the actor's CPU reservation; use what we were given.
            torch.set_num_threads(torch_threads)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.fast = fast_default() if fast is None else fast
        self.spec = ModelSpec.from_dict(spec)
        self.model = build_model(self.spec, self.device, for_inference=self.fast)
        self.on_cuda = str(self.device).startswith("cuda")
        if forward_batch is not None and forward_batch < 1:
            raise ValueError(f"forward_batch must be >= 1, got {forward_batch}")
        self.forward_batch = forward_batch or (CPU_FORWARD_BATCH if self.fast and not self.on_cuda else None)
        self.bf16 = use_bf16(self.device, self.fast)
        if self.on_cuda and not self.fast:
            self.model = self.model.to(memory_format=torch.channels_last)
        self._host = None                        # pinned staging buffer for host -> GPU copies
        self._lock = threading.Lock()            # serve may call from several threads at once

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """(n, H, W, 3) uint8 -> (n, dim) float32, L2-normalised."""
        step = self.forward_batch or len(pixels)
        if len(pixels) > step:
            return np.concatenate([self.embed_pixels(pixels[i:i + step]) for i in range(0, len(pixels), step)])
        import torch

        with torch.inference_mode():
            if self.on_cuda:
                with self._lock:
                    return self._embed_cuda(pixels)
            x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float().div_(255.0)
            # permute() of NHWC pixels is already channels_last, the layout the fast model's weights
            # have; the old settings feed it as it was too.
            return self.model(x).float().numpy()

    def _embed_cuda(self, pixels: np.ndarray) -> np.ndarray:
        import torch

        pixels = np.ascontiguousarray(pixels)
        if not self.fast:
            x = torch.from_numpy(pixels).to(self.device, non_blocking=True)
            x = x.permute(0, 3, 1, 2).float().div_(255.0).contiguous(memory_format=torch.channels_last)
            return self.model(x).float().cpu().numpy()
        # uint8 crosses the bus (4x fewer bytes than float32) from a pinned buffer, which lets the
        # copy run as DMA; it is reused, which is safe because .cpu() below waits for the GPU.
        n = len(pixels)
        if self._host is None or self._host.shape[0] < n or self._host.shape[1:] != pixels.shape[1:]:
            self._host = torch.empty(pixels.shape, dtype=torch.uint8).pin_memory()
        host = self._host[:n]
        host.numpy()[...] = pixels
        x = host.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.bf16):
            out = self.model(x)
        return out.float().cpu().numpy()

    def embed_rows(self, pixels: np.ndarray, errors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Embed the rows whose error is '' of a batch: pixels (n, S, S, 3) uint8, errors (n,) object.

        Returns (embeddings (n, dim) float32, zero where a row failed; errors (n,) object, a copy with
        "model produced a non-finite embedding" added where the model gave NaN or inf).
        """
        n = len(errors)
        ok = np.asarray([not e for e in errors], dtype=bool)
        emb = np.zeros((n, self.spec.dim), dtype=np.float32)
        errors = np.asarray(errors, dtype=object).copy()
        if ok.any():
            emb[ok] = self.embed_pixels(pixels[ok])
            # A vector with NaN/inf would poison training and search: record it as an error instead.
            bad = ok & ~np.isfinite(emb).all(axis=1)
            errors[bad] = "model produced a non-finite embedding"
            emb[bad] = 0.0
        return emb, errors


def preprocess_image(data: bytes, spec: ModelSpec, max_pixels: int | None = None) -> np.ndarray:
    """Image bytes -> (S, S, 3) uint8 pixels for `spec`, exactly as the build preprocessed them.

    Raises DecodeError (with a reason) for anything that is not a usable picture.
    """
    arr = decode_image(data, draft_size=spec.input_size, max_pixels=max_pixels)
    return resize_image(arr, spec.input_size, spec.resize)  # type: ignore[arg-type]


def embed_image_uris(
    uris: list[str], spec: ModelSpec, embedder,
    boxes: list[tuple[float, float, float, float] | None] | None = None,
) -> tuple[np.ndarray, list[str | None]]:
    """Read, preprocess as the build did and embed images by path/URI. Returns (vectors (n, d),
    per image None or the reason it could not be used; its vector row is then zeros).

    `boxes`: per image None or an (x1, y1, x2, y2) crop in original pixels (revisitop's query
    protocol): such an image is decoded at full size and cropped before resizing.
    """
    from PIL import Image

    pixels = np.zeros((len(uris), spec.input_size, spec.input_size, 3), np.uint8)
    problems: list[str | None] = []
    for i, uri in enumerate(uris):
        box = boxes[i] if boxes is not None else None
        try:
            data = storage.read_bytes(uri)
            if box is None:
                pixels[i] = preprocess_image(data, spec)
            else:
                img = Image.fromarray(decode_image(data)).crop(box)  # full size: the box is in original pixels
                if img.width < 1 or img.height < 1:
                    raise DecodeError(f"empty crop box {box}")
                pixels[i] = resize_image(np.asarray(img), spec.input_size, spec.resize)  # type: ignore[arg-type]
            problems.append(None)
        except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
            problems.append(str(e))
        except DecodeError as e:
            problems.append(e.reason)
    ok = [i for i, p in enumerate(problems) if p is None]
    x = np.zeros((len(uris), spec.dim), np.float32)
    if ok:
        x[ok] = embedder.embed_pixels(pixels[ok])
    return x, problems
