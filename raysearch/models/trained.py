"""Model directories written by `raysearch train`, used as `--model MODEL_DIR` like any registry model.

A model directory holds `model.json` (written last: its presence means the model is complete) and
the TorchScript file it names, which maps a normalised (B, 3, S, S) batch to (B, d) unit vectors.
`resolve_trained_model` turns it into a `ModelSpec`: name "trained:<directory>", the TorchScript
file as `weights` with its SHA-256, and the input size, resize policy, mean/std and dimension the
model was trained with. `load_trained_torchscript` loads that file after checking its SHA-256, so an
index keeps embedding queries with exactly the model it was built with, or fails clearly.
"""

from __future__ import annotations

import os
import posixpath
import uuid

from raysearch import storage
from raysearch.models.spec import ModelConfig, ModelSpec

MODEL_JSON = "model.json"
TRAINED_FORMAT = "raysearch-trained-model/1"
TRAINED_PREFIX = "trained:"
_REQUIRED = ("torchscript", "torchscript_sha256", "input_size", "resize", "mean", "std", "dim")


def is_model_dir_name(name: str) -> bool:
    """Whether a --model value names a directory rather than a registry entry: the trained: prefix,
    a URI, a path with a separator, or an existing local folder."""
    return (
        name.startswith(TRAINED_PREFIX) or "://" in name or "/" in name or os.sep in name
        or os.path.isdir(os.path.expanduser(name))
    )


def model_dir_of(name: str) -> str:
    """The directory a --model value (with or without the trained: prefix) names; local paths absolute."""
    path = name[len(TRAINED_PREFIX):] if name.startswith(TRAINED_PREFIX) else name
    path = path.rstrip("/") or path
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def read_model_json(model_dir: str) -> dict:
    """model.json of a model directory, checked. Raises ValueError for a missing or incomplete one."""
    path = storage.join(model_dir, MODEL_JSON)
    if not storage.isdir(model_dir):
        raise ValueError(f"--model {model_dir}: no such model directory")
    if not storage.exists(path):
        raise ValueError(f"--model {model_dir}: not a complete trained model (no {MODEL_JSON}; "
                         "`raysearch train` writes it last, so the training has not finished or saved yet)")
    try:
        doc = storage.read_json(path)
    except ValueError as e:
        raise ValueError(f"--model {model_dir}: {MODEL_JSON} is not valid JSON: {e}") from e
    if not isinstance(doc, dict) or doc.get("format") != TRAINED_FORMAT:
        raise ValueError(f"--model {model_dir}: {MODEL_JSON} is not a raysearch trained model "
                         f"(format {doc.get('format') if isinstance(doc, dict) else None!r}, expected {TRAINED_FORMAT!r})")
    missing = [k for k in _REQUIRED if k not in doc]
    if missing:
        raise ValueError(f"--model {model_dir}: {MODEL_JSON} lacks {', '.join(missing)}")
    return doc


def resolve_trained_model(config: ModelConfig) -> ModelSpec:
    """The ModelSpec of a trained model directory. --input-size, --resize and --scales override the
    trained values; --pooling and --weights do not apply (the model pools itself, its weights are
    the TorchScript file)."""
    model_dir = model_dir_of(config.name)
    if config.pooling is not None:
        raise ValueError(f"--pooling does not apply to a trained model directory ({model_dir} pools itself)")
    if config.weights is not None:
        raise ValueError(f"--weights does not apply to a trained model directory ({model_dir} holds its weights)")
    doc = read_model_json(model_dir)
    script = storage.join(model_dir, str(doc["torchscript"]))
    if not storage.exists(script):
        raise ValueError(f"--model {model_dir}: the TorchScript file {doc['torchscript']} named by {MODEL_JSON} is missing")
    _, digest = storage.file_digest(script)
    if digest != doc["torchscript_sha256"]:
        raise ValueError(f"--model {model_dir}: {doc['torchscript']} has SHA-256 {digest}, {MODEL_JSON} "
                         f"records {doc['torchscript_sha256']}: the directory was modified or is incomplete")
    return ModelSpec(
        name=TRAINED_PREFIX + model_dir, dim=int(doc["dim"]),
        input_size=config.input_size or int(doc["input_size"]), resize=config.resize or str(doc["resize"]),
        mean=tuple(float(v) for v in doc["mean"]), std=tuple(float(v) for v in doc["std"]),  # type: ignore[arg-type]
        pooling=None, gem_p=float(doc.get("gem_p") or config.gem_p), weights=script, weights_sha256=digest,
        scales=tuple(config.scales),
    )


def is_trained_spec(spec: ModelSpec) -> bool:
    return spec.name.startswith(TRAINED_PREFIX)


def _cache_dir() -> str:
    return os.environ.get("RAYSEARCH_MODEL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "raysearch", "models")


def local_torchscript(spec: ModelSpec) -> str:
    """A local path holding the spec's TorchScript file with the recorded SHA-256; a remote file is
    copied once into the cache (named by its digest). Raises ValueError on a mismatch."""
    assert spec.weights is not None and spec.weights_sha256 is not None, "a trained spec names its file"
    if storage.is_local(spec.weights):
        path = spec.weights
    else:
        folder = _cache_dir()
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{spec.weights_sha256}.pt")
        if not os.path.exists(path):
            tmp = os.path.join(folder, f".{uuid.uuid4().hex}.tmp")
            try:
                with open(tmp, "wb") as f:
                    f.write(storage.read_bytes(spec.weights))
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
    if not os.path.exists(path):
        raise ValueError(f"model {spec.name}: TorchScript file {spec.weights} not found")
    _, digest = storage.file_digest(path)
    if digest != spec.weights_sha256:
        raise ValueError(f"model {spec.name}: {posixpath.basename(spec.weights)} has SHA-256 {digest}, but the index "
                         f"was built with {spec.weights_sha256}; the model directory changed since")
    return path


def load_trained_torchscript(spec: ModelSpec):
    """The trained model's TorchScript module (CPU, eval mode)."""
    import warnings

    import torch

    path = local_torchscript(spec)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation notice
            return torch.jit.load(path, map_location="cpu").eval()
    except Exception as e:  # torch raises RuntimeError/ValueError variants for bad files
        raise ValueError(f"cannot load the TorchScript model {path} of {spec.name}: {e}") from e

