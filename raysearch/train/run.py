"""`train(source, out, config)`: descriptor learning on Ray Train, from a SOURCE to a model directory.

The driver lists SOURCE, builds the Ray Data dataset of decoded images, and runs a
`ray.train.torch.TorchTrainer` whose workers execute `raysearch.train.loop.train_loop_per_worker`.
Checkpoints go to MODEL_DIR/run (RunConfig(storage_path=MODEL_DIR, name="run")): Ray Train (V2, the
default in Ray 2.60) finds that run's checkpoint_manager_snapshot.json when the same command is run
again and hands its latest checkpoint to the workers through `ray.train.get_checkpoint()`, so a
killed run continues from its last checkpoint, step counter included. With `--init-projection
whitening` a Ray task first fits the projection (raysearch.train.whitening); with `--epochs 0` that
fit is the whole run and no TorchTrainer starts.

MODEL_DIR when done:

    model-<sha256[:16]>.pt   TorchScript: normalised (B, 3, S, S) float -> (B, d) unit vectors
    loss.csv                 step, epoch, loss, the loss terms, lr, images, seconds
    run.json                 the source and the settings the run was started with
    run/                     Ray Train's run folder (the last checkpoint, the snapshot)
    projection_init.npz      the fitted projection (--init-projection whitening), reused on resume
    model.json               written last, atomically: what `--model MODEL_DIR` reads
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass

from raysearch import storage
from raysearch.models.trained import MODEL_JSON, TRAINED_FORMAT
from raysearch.train.config import TrainConfig
from raysearch.train.data import read_listing, rows_per_worker, sample_dataset, training_dataset
from raysearch.train.loop import (LOSS_FILE, LoopSettings, Progress, load_checkpoint_dir, train_loop_per_worker,
                                  write_loss_csv)
from raysearch.train.model import build_descriptor_net, export_torchscript, resolve_init, set_projection
from raysearch.train.whitening import PROJECTION_FILE, WHITEN_VIEWS, ProjectionInit, fit_projection

log = logging.getLogger("raysearch")

RUN_JSON = "run.json"
RUN_NAME = "run"
# Settings added after the first release of `raysearch train`: absent from older run.json files.
NEWER_SETTINGS = frozenset({"projection_init", "whiten_images"})


@dataclass(frozen=True)
class TrainResult:
    model_dir: str
    model: dict              # the model.json written (or found, when the run was already complete)
    trained_now: bool        # False: MODEL_DIR already held the finished model; nothing ran


def _absolute(uri: str) -> str:
    return uri if "://" in uri else os.path.abspath(os.path.expanduser(uri))


def _storage_for_ray(out: str):
    """(storage_path, storage_filesystem) for RunConfig: local paths as they are; remote URIs
    through the same fsspec file system raysearch.storage uses (same credentials, same endpoint)."""
    if storage.is_local(out):
        return out, None
    import pyarrow.fs

    fs, path = storage.get_fs(out)
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def _check_previous_run(out: str, run_doc: dict, overwrite: bool) -> dict | None:
    """The finished model.json of an identical earlier run, if any. Raises ValueError when MODEL_DIR
    holds a run with other settings or something that is not a run (unless `overwrite`)."""
    entries = [e for e in storage.listdir(out) if not e.startswith(".")]
    if not entries:
        return None
    if overwrite:
        for entry in entries:
            storage.remove(storage.join(out, entry), recursive=True)
        return None
    run_path = storage.join(out, RUN_JSON)
    if not storage.exists(run_path):
        raise ValueError(f"--out {out} is not empty and holds no training run; give an empty folder or --overwrite")
    previous = storage.read_json(run_path)
    # A run started before a setting existed ran with that setting's default.
    defaults = json.loads(json.dumps(TrainConfig().learning_settings()))
    previous["settings"] = {**{k: v for k, v in defaults.items() if k in NEWER_SETTINGS}, **previous.get("settings", {})}
    if previous.get("source") != run_doc["source"] or previous.get("settings") != run_doc["settings"]:
        changed = sorted(
            k for k in set(previous.get("settings", {})) | set(run_doc["settings"])
            if previous.get("settings", {}).get(k) != run_doc["settings"].get(k)
        )
        if previous.get("source") != run_doc["source"]:
            changed.insert(0, "SOURCE")
        raise ValueError(f"--out {out} holds a run with other settings ({', '.join(changed)}); rerun with the "
                         "same arguments to resume it, or pass --overwrite to start again")
    model_path = storage.join(out, MODEL_JSON)
    if storage.exists(model_path):
        model = storage.read_json(model_path)
        if model.get("training", {}).get("finished"):
            return model
    return None


def train(source: str, out: str, config: TrainConfig, overwrite: bool = False, progress: bool = False) -> TrainResult:
    """Train a descriptor on SOURCE with Ray Train and write MODEL_DIR `out` (local or s3://...).

    Needs Ray initialised (`raysearch.runtime.ensure_ray`); rerunning with the same arguments
    resumes an interrupted run, and returns at once when the run had finished. With `config.epochs`
    0 the model is the starting network with its fitted whitened projection (no gradient step).
    """
    from raysearch.runtime import cluster_gpus, configure_data_context

    started = time.monotonic()
    out = _absolute(out)
    init = resolve_init(config.init, config.weights, config.input_size)
    input_size = config.input_size or init.input_size
    load_size = config.load_size or 2 * input_size
    if load_size < input_size:
        raise ValueError(f"--load-size must be >= the input size {input_size}, got {load_size}")
    config.view_config(input_size)  # checks the view settings before anything starts
    use_gpu = config.use_gpu if config.use_gpu is not None else cluster_gpus() > 0
    if use_gpu and cluster_gpus() < config.workers:
        raise ValueError(f"--workers {config.workers} with GPUs needs {config.workers} GPUs; the cluster has {cluster_gpus():g}")
    train_blocks = config.effective_train_blocks(use_gpu)
    # Checks --init, --train-blocks and --dim before anything starts.
    net = build_descriptor_net(init, config.dim, config.gem_p, train_blocks, config.projection_init)
    cpus = config.cpus_per_worker or (4.0 if use_gpu else 1.0)

    # Through JSON, so that it compares equal to the run.json an earlier invocation wrote.
    run_doc = json.loads(json.dumps({"source": source, "settings": config.learning_settings()}))
    storage.ensure_writable_dir(out)
    finished = _check_previous_run(out, run_doc, overwrite)
    if finished is not None:
        return TrainResult(out, finished, trained_now=False)

    listing = read_listing(source, config.labels, config.seed)
    n_rows = listing.table.num_rows
    steps_per_epoch = rows_per_worker(n_rows, config.workers) // config.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"--batch-size {config.batch_size} x --workers {config.workers} is more than the "
                         f"{n_rows} images of {source!r}: no full batch per worker")
    run_path = storage.join(out, RUN_JSON)
    if storage.exists(run_path):
        before = storage.read_json(run_path).get("n_rows")
        if before != n_rows:
            raise ValueError(f"SOURCE {source!r} lists {n_rows} images now but {before} when the run in {out} "
                             "started; resuming would change every epoch: pass --overwrite to start again")
    storage.atomic_write_json(run_path, {**run_doc, "n_rows": n_rows})

    configure_data_context(progress)
    projection = None
    if config.projection_init == "whitening":
        projection = _projection_init(out, listing, load_size, config, init, input_size, use_gpu, cpus)
    if config.epochs == 0:
        # The fitted projection alone: no gradient step, so no Ray Train run and no checkpoint.
        set_projection(net, projection.weight, projection.bias)
        prog, loss_csv, checkpoint_rel, metrics = Progress(), write_loss_csv([], config.objective), None, {}
    else:
        settings = LoopSettings(config, init, input_size, train_blocks, steps_per_epoch, use_gpu, projection)
        state, prog, loss_csv, checkpoint_rel, metrics = _run_trainer(
            out, settings, training_dataset(listing, load_size, config.workers), cpus)
        net.load_state_dict(state["model"])
    scripted = export_torchscript(net)
    digest = hashlib.sha256(scripted).hexdigest()
    script_name = f"model-{digest[:16]}.pt"
    storage.atomic_write(storage.join(out, script_name), scripted)
    storage.atomic_write(storage.join(out, LOSS_FILE), loss_csv)

    complete = [e for e in prog.epochs if e["complete"]]
    last = prog.epochs[-1] if prog.epochs else {}
    total_steps = steps_per_epoch * config.epochs
    done = prog.step >= total_steps
    seconds = sum(e["seconds"] for e in prog.epochs)
    images = sum(e["images"] for e in prog.epochs)
    mixup, cutmix = config.mix_probs()
    model = {
        "format": TRAINED_FORMAT,
        "torchscript": script_name,
        "torchscript_sha256": digest,
        "input_size": input_size,
        "resize": "squash",  # views are squashed to the input size: index with the same policy
        "mean": list(init.mean),
        "std": list(init.std),
        "dim": net.dim,
        "pooling": None if net.pools_itself else "gem",
        "gem_p": net.gem_p,
        "projection": config.dim,
        "projection_init": projection.record() if projection is not None else None,
        "objective": config.objective,
        "init": {"name": init.name, "weights": init.weights, "weights_sha256": init.weights_sha256},
        "source": source,
        "n_listed": listing.n_listed,
        "n_unlabelled": listing.n_unlabelled,
        "n_rows": n_rows,
        "n_labels": len(listing.label_names) or None,
        "n_errors": max((e["errors"] for e in prog.epochs), default=0),
        "n_images": n_rows - max((e["errors"] for e in prog.epochs), default=0),
        "settings": config.to_dict(),
        "effective": {
            "train_blocks": train_blocks, "load_size": load_size, "temperature": config.effective_temperature,
            "margin": config.effective_margin, "koleo_weight": config.effective_koleo_weight,
            "mixup_prob": mixup, "cutmix_prob": cutmix, "use_gpu": use_gpu, "cpus_per_worker": cpus,
            "batch_size_per_worker": config.batch_size, "global_batch_size": config.batch_size * config.workers,
            "negatives": "in-batch, per worker",
        },
        "training": {
            "finished": done,
            "stopped": "epochs" if done else metrics.get("stopped") or "interrupted",
            "steps": prog.step,
            "starts": prog.starts,
            "steps_per_epoch": steps_per_epoch,
            "total_steps": total_steps,
            "epochs_completed": len(complete),
            "seconds": round(seconds, 3),
            "images_per_second": round(images / seconds, 3) if seconds > 0 else None,
            "final_loss": last.get("loss"),
            "epochs": prog.epochs,
        },
        "checkpoint": f"{RUN_NAME}/{checkpoint_rel}" if checkpoint_rel else None,
        "loss_curve": LOSS_FILE,
        "versions": _versions(),
    }
    # model.json last: until it is replaced, readers see the previous complete model (whose
    # TorchScript file is still there) or none at all.
    model = json.loads(json.dumps(model))  # what a reader of model.json gets (lists, not tuples)
    storage.atomic_write_json(storage.join(out, MODEL_JSON), model)
    for entry in storage.listdir(out):
        if entry.startswith("model-") and entry.endswith(".pt") and entry != script_name:
            storage.remove(storage.join(out, entry))
    log.info("trained %s in %.1f s", out, time.monotonic() - started)
    return TrainResult(out, model, trained_now=True)


def _run_trainer(out: str, settings: LoopSettings, dataset, cpus: float):
    """Run the TorchTrainer (resuming MODEL_DIR/run when it holds a checkpoint); returns the last
    checkpoint's (torch state, progress, loss.csv bytes, folder name) and the last metrics."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from raysearch.runtime import verbose_logging

    config = settings.config
    resources = {"CPU": cpus, **({"GPU": 1.0} if settings.use_gpu else {})}
    storage_path, storage_fs = _storage_for_ray(out)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"loop": settings},
        scaling_config=ray.train.ScalingConfig(num_workers=config.workers, use_gpu=settings.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=RUN_NAME, storage_path=storage_path, storage_filesystem=storage_fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
            # Ray Train copies worker prints into its own log as well; once on the console is enough.
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
            # Ray Train's own progress lines (resources, reports, checkpoints) only with -v:
            # raysearch's lines say the same per epoch.
            logging_config=ray.train.LoggingConfig(
                log_level="INFO" if verbose_logging() else "WARNING"),
        ),
        datasets={"train": dataset},
    )
    result = trainer.fit()
    checkpoint = result.checkpoint
    if checkpoint is None:
        raise RuntimeError(f"training in {out} ended without a checkpoint")
    with checkpoint.as_directory() as folder:
        state, prog = load_checkpoint_dir(folder)
        with open(os.path.join(folder, LOSS_FILE), "rb") as f:
            loss_csv = f.read()
    return state, prog, loss_csv, checkpoint.path.rstrip("/").split("/")[-1], dict(result.metrics or {})


def _projection_init(out: str, listing, load_size: int, config: TrainConfig, init, input_size: int,
                     use_gpu: bool, cpus: float) -> ProjectionInit:
    """The whitened projection's start: fitted once per run and kept in MODEL_DIR, so that a resumed
    run (whose settings run.json has matched) starts the same way without fitting again."""
    path = storage.join(out, PROJECTION_FILE)
    if storage.exists(path):
        return ProjectionInit.from_bytes(storage.read_bytes(path))
    n = min(config.whiten_images, listing.table.num_rows)
    log.info("fitting the whitened projection on %d views of %d images", WHITEN_VIEWS * n, n)
    fitted = fit_projection(sample_dataset(listing, load_size, n), init, config.gem_p, config.view_config(input_size),
                            config.dim, n, config.seed, use_gpu, cpus, config.threads)
    storage.atomic_write(path, fitted.to_bytes())
    return fitted


def _versions() -> dict:
    import ray
    import torch

    from raysearch.version import __version__

    return {"raysearch": __version__, "torch": torch.__version__, "ray": ray.__version__}


__all__ = ["RUN_JSON", "TrainResult", "train"]
