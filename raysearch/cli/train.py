"""`raysearch train SOURCE --out MODEL_DIR`: learn a descriptor on Ray Train (see raysearch.train)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from raysearch.cli.common import app, setup_logging, user_errors
from raysearch.models.names import DEFAULT_MODEL


def parse_pair(text: str, what: str, cast=float) -> tuple:
    """'0.25,1' or '1-3' -> (0.25, 1.0) / (1, 3)."""
    sep = "," if "," in text else "-"
    parts = [p.strip() for p in text.split(sep)]
    try:
        if len(parts) == 1:
            value = cast(parts[0])
            return (value, value)
        if len(parts) == 2:
            return (cast(parts[0]), cast(parts[1]))
    except ValueError:
        pass
    raise ValueError(f"{what} must be MIN,MAX (e.g. {'1,3' if cast is int else '0.25,1'}), got {text!r}")


def parse_edits(text: Optional[str]) -> tuple[str, ...] | None:
    if text is None:
        return None
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise ValueError(f"--edits names no edit: {text!r}")
    return names


@app.command("train")
@user_errors
def train_cmd(
    source: Annotated[str, typer.Argument(help="Training images: folder, glob, list file, s3:// URI, disc21:ROOT[:split] or gldv2:ROOT[:split].")],
    out: Annotated[str, typer.Option("--out", "-o", help="Model directory to write (local or s3://); use it as `--model MODEL_DIR`.")],
    objective: Annotated[str, typer.Option(help="copy (self-supervised, SSCD: InfoNCE + KoLeo + mixup/cutmix), contrastive, triplet or supcon.")] = "copy",
    labels: Annotated[Optional[str], typer.Option(help="CSV image_id,label for contrastive/triplet/supcon (contrastive/triplet also learn from views alone).")] = None,
    init: Annotated[str, typer.Option(help="Starting model: a registry name (see `raysearch models`) or torchscript:PATH returning a feature map.")] = DEFAULT_MODEL,
    weights: Annotated[Optional[str], typer.Option(help="Weights file for resnet50_gem / resnet101_gem (a torchvision state dict).")] = None,
    dim: Annotated[Optional[int], typer.Option(help="Linear projection to this many dimensions (default: none, the trunk's size).")] = None,
    init_projection: Annotated[str, typer.Option(help="random, or whitening: start the projection (to --dim, or the trunk's size) from a whitening fitted on edited views of the training images.")] = "random",
    whiten_images: Annotated[int, typer.Option(help="Training images whose views --init-projection whitening is fitted on.")] = 2048,
    gem_p: Annotated[float, typer.Option(help="GeM pooling exponent.")] = 3.0,
    train_blocks: Annotated[str, typer.Option(help="'all', or N: only the last N trunk blocks train (faster, less memory); 'auto': all on GPU, 4 on CPU.")] = "auto",
    input_size: Annotated[Optional[int], typer.Option(help="Square training (and indexing) input size (default: the init model's).")] = None,
    load_size: Annotated[Optional[int], typer.Option(help="Images are decoded with their shorter side at most this (default: 2 x input size).")] = None,
    epochs: Annotated[int, typer.Option(help="Passes over SOURCE (0: no gradient step, only the projection fitted by --init-projection whitening).")] = 10,
    batch_size: Annotated[int, typer.Option(help="Images per worker per step (negatives come from the worker's batch).")] = 32,
    views: Annotated[int, typer.Option(help="Views of each image per step.")] = 2,
    lr: Annotated[float, typer.Option(help="AdamW peak learning rate (linear warm-up, cosine decay).")] = 3e-4,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = 1e-6,
    warmup_steps: Annotated[Optional[int], typer.Option(help="Warm-up steps (default: 5% of the steps).")] = None,
    temperature: Annotated[Optional[float], typer.Option(help="Softmax temperature of copy / supcon (default 0.05 / 0.1).")] = None,
    margin: Annotated[Optional[float], typer.Option(help="Margin of contrastive / triplet (default 0.7 / 0.2).")] = None,
    koleo_weight: Annotated[Optional[float], typer.Option(help="KoLeo entropy weight of copy (default 10).")] = None,
    mixup: Annotated[Optional[float], typer.Option(help="Share of first views mixed up with another image (copy; default 0.05).")] = None,
    cutmix: Annotated[Optional[float], typer.Option(help="Share of first views given a box of another image (copy; default 0.05).")] = None,
    mix_alpha: Annotated[float, typer.Option(help="Mixing weights are drawn from Beta(alpha, alpha).")] = 2.0,
    edits: Annotated[Optional[str], typer.Option(help="Comma-separated edits views draw from (default: the whole edit suite but combo).")] = None,
    edits_per_view: Annotated[str, typer.Option(help="MIN,MAX edits applied to each view.")] = "1,3",
    crop_scale: Annotated[str, typer.Option(help="MIN,MAX share of the image's area each view's random crop keeps.")] = "0.25,1",
    max_time: Annotated[Optional[str], typer.Option(help="Stop cleanly after this much training (e.g. 20m, 1h30m) and save; rerun to continue.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for the order, the views and the initialisation.")] = 0,
    workers: Annotated[int, typer.Option(help="Ray Train workers (DDP); one GPU each when training on GPUs.")] = 1,
    gpu: Annotated[Optional[bool], typer.Option("--gpu/--no-gpu", help="Train on GPUs (default: when the cluster has them).")] = None,
    cpus_per_worker: Annotated[Optional[float], typer.Option(help="CPUs reserved per worker (default: 1 on CPU, 4 with a GPU).")] = None,
    threads: Annotated[Optional[int], typer.Option(help="Torch threads per worker (default: on CPUs, the node's cores shared by its workers; with a GPU, torch's default).")] = None,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints (0: at the end of each epoch).")] = 0,
    precision: Annotated[str, typer.Option(help="auto (bf16 autocast on GPU, fp32 on CPU), fp32 or bf16.")] = "auto",
    max_failures: Annotated[int, typer.Option(help="Worker failures Ray Train recovers from (restarting from the last checkpoint).")] = 1,
    overwrite: Annotated[bool, typer.Option(help="Discard what --out holds and start again.")] = False,
    address: Annotated[Optional[str], typer.Option(help="Ray cluster address (default: $RAY_ADDRESS, else a local cluster).")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Ray Data progress bars.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log each stage.")] = False,
) -> None:
    """Learn a descriptor on SOURCE with Ray Train and write a model directory for `--model`.

    A killed run rerun with the same arguments continues from its last checkpoint.
    """
    from raysearch.runtime import ensure_ray
    from raysearch.train import TrainConfig, parse_duration, train

    setup_logging(verbose)
    edit_names = parse_edits(edits)
    config = TrainConfig(
        objective=objective, labels=labels, init=init, weights=weights, dim=dim,
        projection_init=init_projection, whiten_images=whiten_images, gem_p=gem_p,
        train_blocks=train_blocks, input_size=input_size, load_size=load_size, epochs=epochs,
        batch_size=batch_size, n_views=views, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps,
        temperature=temperature, margin=margin, koleo_weight=koleo_weight, mixup_prob=mixup, cutmix_prob=cutmix,
        mix_alpha=mix_alpha, **({"edits": edit_names} if edit_names else {}),
        edits_per_view=parse_pair(edits_per_view, "--edits-per-view", int),
        crop_scale=parse_pair(crop_scale, "--crop-scale", float), max_time=parse_duration(max_time), seed=seed,
        workers=workers, use_gpu=gpu, cpus_per_worker=cpus_per_worker, threads=threads, checkpoint_every=checkpoint_every,
        precision=precision, max_failures=max_failures,
    )
    ensure_ray(address, training=True)
    result = train(source, out, config, overwrite=overwrite, progress=progress)
    m = result.model
    t = m["training"]
    if not result.trained_now:
        typer.echo(f"{out} already holds the finished model of this run ({t['steps']} steps); nothing to do")
    elif t["steps"] == 0 and m.get("projection_init"):
        fit = m["projection_init"]
        typer.echo(f"fitted the whitened projection on {fit['views']} views of {fit['images']} images of {m['source']} "
                   f"in {fit['seconds']:.1f} s; no gradient step (--epochs 0)")
    else:
        state = "finished" if t["finished"] else f"stopped ({t['stopped']}) at step {t['steps']} of {t['total_steps']}; rerun to continue"
        typer.echo(
            f"trained on {m['n_images']} images of {m['source']} ({m['n_errors']} unusable): {t['steps']} steps, "
            f"{t['epochs_completed']} epochs, {t['images_per_second']} images/s; loss {t['final_loss']}; {state}"
        )
    typer.echo(f"model: {m['dim']}-d, {m['input_size']} px; use it with --model {out}")
