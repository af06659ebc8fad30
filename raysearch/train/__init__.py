"""Descriptor learning on Ray Train: `train(source, out, TrainConfig(...))` writes a model directory
that `--model MODEL_DIR` uses like any registry model. Losses (`losses`), views (`views`), the
network (`model`), the data (`data`), the worker loop (`loop`) and the driver (`run`) are separate
modules; only `run` and `loop` touch Ray."""

from raysearch.train.config import OBJECTIVES, TrainConfig, parse_duration

__all__ = ["OBJECTIVES", "TrainConfig", "TrainResult", "parse_duration", "train"]


def __getattr__(name: str):
    # The driver pulls in torch and Ray: load it when asked for, not when the config is.
    if name in ("train", "TrainResult"):
        from raysearch.train import run

        return getattr(run, name)
    raise AttributeError(f"module 'raysearch.train' has no attribute {name!r}")
