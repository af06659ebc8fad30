"""The Embedder: the index's model loaded once, mapping pixels to L2-normalised vectors, and the
preprocessing every path shares (bytes -> decoded, resized pixels exactly as a build prepares them).

Used by the embedding pipeline's actors, the query path of search and serve, evaluation and
activation. Nothing here knows about indexes or Ray Data.
"""

from __future__ import annotations

import numpy as np

from raysearch import storage
from raysearch.images import DecodeError, decode_image, resize_image
from raysearch.models.spec import ModelSpec


class Embedder:
    """A model (a resolved `ModelSpec`, as a dict) loaded once on `device` (default: CUDA when
    there is one); `embed_pixels` maps resized uint8 pixels to L2-normalised vectors."""

    def __init__(self, spec: dict, device: str | None = None, torch_threads: int | None = None):
        import torch

        from raysearch.models.registry import build_model

        if torch_threads:
            # Ray sets OMP_NUM_THREADS to the actor's CPU reservation; use what we were given.
            torch.set_num_threads(torch_threads)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.spec = ModelSpec.from_dict(spec)
        self.model = build_model(self.spec, self.device)
        if self.device.startswith("cuda"):
            self.model = self.model.to(memory_format=torch.channels_last)

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """(n, H, W, 3) uint8 -> (n, dim) float32, L2-normalised."""
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(pixels)).to(self.device, non_blocking=True)
            x = x.permute(0, 3, 1, 2).float().div_(255.0)
            if self.device.startswith("cuda"):
                x = x.contiguous(memory_format=torch.channels_last)
            return self.model(x).float().cpu().numpy()

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
