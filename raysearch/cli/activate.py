"""`raysearch activate`."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from raysearch.activate import DEFAULT_BATCH_PIXELS
from raysearch.cli.common import app, setup_logging, user_errors


@app.command()
@user_errors
def activate(
    index_dir: Annotated[str, typer.Argument(help="Index directory whose quantiser the images should suit (IVF/PQ).")],
    source: Annotated[str, typer.Argument(help="The images to activate (their image_ids must be in the index).")],
    out: Annotated[str, typer.Option("--out", "-o", help="Folder for activated images and the report.")],
    iterations: Annotated[int, typer.Option(help="Optimisation steps (Adam).")] = 10,
    lr: Annotated[Optional[float], typer.Option(help="Adam learning rate on the perturbation variable (default: 1.0 with the cosine loss, 0.5 with the rank loss).")] = None,
    lambda_f: Annotated[float, typer.Option(help="Weight of the feature loss (see --loss).")] = 1.0,
    lambda_i: Annotated[float, typer.Option(help="Weight of the image loss mean((x' - x)^2).")] = 0.2,
    scaling: Annotated[float, typer.Option(help="Multiplier of the JND heatmap (perturbation budget).")] = 3.0,
    target: Annotated[str, typer.Option(help="pq: the PQ reconstruction of the image's indexed vector; ivf: its IVF centroid.")] = "pq",
    psnr: Annotated[float, typer.Option(help="PSNR floor in dB: perturbations are scaled down until every image meets it (0: no floor).")] = 40.0,
    augment: Annotated[Optional[int], typer.Option(help="Randomly edited views of each image added to the feature loss per step (default: 0 with the cosine loss, the published method; 3 with the rank loss).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the edited views.")] = 0,
    loss: Annotated[Optional[str], typer.Option(help=(
        "Feature loss. cosine: 1 - cos(f(x'), target), pull the feature to its --target (the published "
        "method); rank: make the image's own PQ code outscore the codes of its --competitors "
        "nearest other indexed vectors (softmax over distances at temperature --tau; needs --target pq). "
        "Default: cosine for an edit-invariant model (a TorchScript one, or trained with "
        "--objective copy), rank for the others (it measured best with them)."))] = None,
    competitors: Annotated[int, typer.Option(help="With --loss rank: neighbouring codes, found by searching the index, that the own code must outscore.")] = 10,
    tau: Annotated[float, typer.Option(help="With --loss rank: softmax temperature on squared L2 distances.")] = 0.05,
    format: Annotated[str, typer.Option("--format", help="png (keeps the perturbation) or jpg.")] = "png",
    quality: Annotated[int, typer.Option(help="JPEG quality with --format jpg.")] = 95,
    batch_size: Annotated[int, typer.Option(help="Images optimised together.")] = 8,
    batch_megapixels: Annotated[float, typer.Option(help=(
        "Largest number of megapixels optimised at once: a batch of large photographs is split to stay "
        "within it (memory: about 160 MB a megapixel on the CPU)."))] = DEFAULT_BATCH_PIXELS / 1e6,
    concurrency: Annotated[Optional[int], typer.Option(help="Activator actors (default: one per GPU).")] = None,
    max_error_rate: Annotated[float, typer.Option(help="Fail if more than this share of images cannot be activated.")] = 0.05,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty --out.")] = False,
    report_dir: Annotated[Optional[str], typer.Option("--report", help=(
        "Also write a page: DIR/index.html with each image's original, activated version and amplified "
        "difference, PSNR and SSIM (and recall@1 once `raysearch eval activation --report DIR` measured it)."))] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Perturb images imperceptibly so that the index finds their edited copies more often.

    Publish the activated images instead of the originals; the index is not changed.
    """
    from raysearch.activate.pipeline import ActivatePipelineConfig, activate_source

    setup_logging(verbose)
    given = {"iterations": iterations, "lr": lr, "lambda_f": lambda_f, "lambda_i": lambda_i, "scaling": scaling,
             "target": target, "psnr": psnr or None, "augment": augment, "seed": seed, "loss": loss,
             "competitors": competitors, "tau": tau}
    options = tuple((k, v) for k, v in given.items() if v is not None or k == "psnr")
    config = ActivatePipelineConfig(
        options=options,
        batch_size=batch_size, max_batch_pixels=round(batch_megapixels * 1e6), concurrency=concurrency, format=format, quality=quality,
        max_error_rate=max_error_rate, progress=progress,
    )
    s = activate_source(index_dir, source, out, config, overwrite=overwrite)
    typer.echo(
        f"activated {s.n_activated} of {s.n_images} images ({s.n_errors} errors"
        f"{f', {s.n_skipped} already done' if s.n_skipped else ''}) in {s.seconds:.1f} s, "
        f"{s.images_per_second:.2f} images/s"
    )
    used = s.settings
    floor = f", floor {used['psnr']:g} dB" if used.get("psnr") else ", no PSNR floor"
    typer.echo(f"loss {used['loss']} (lr {used['lr']:g}, {used['augment']} edited views){floor}")
    typer.echo(
        f"PSNR {s.mean_psnr:.1f} dB (min {s.min_psnr:.1f}), SSIM {s.mean_ssim:.3f}; cosine to target "
        f"{s.mean_cos_before:.3f} -> {s.mean_cos_after:.3f}"
    )
    typer.echo(f"wrote {out}/images and {out}/report")
    if report_dir:
        from raysearch.pages.reports import write_activation_report

        typer.echo(f"wrote {write_activation_report(report_dir, out)}")


def _register_eval() -> None:
    from raysearch.cli.eval import eval_app

    @eval_app.command("activation")
    @user_errors
    def activation_cmd(
        index_dir: Annotated[str, typer.Argument(help="The index the images were activated for.")],
        activated: Annotated[str, typer.Option("--activated", help="Output folder of `raysearch activate`.")],
        edits: Annotated[Optional[str], typer.Option(help="Comma-separated edits (default: the whole suite; 'none' = unedited).")] = None,
        nprobe: Annotated[Optional[int], typer.Option(help="nprobe (default: the index's).")] = None,
        seed: Annotated[int, typer.Option(help="Seed of the edits.")] = 0,
        max_images: Annotated[Optional[int], typer.Option(help="Evaluate only the first N activated images.")] = None,
        exact: Annotated[bool, typer.Option(
            "--exact", help="Also search the stored, unquantised vectors exactly: what the index's compression "
                            "costs (activation's room) beside what the edits cost the model itself. Reads every "
                            "stored vector into memory.")] = False,
        json_out: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
        report_dir: Annotated[Optional[str], typer.Option("--report", help=(
            "Also write the activation's page with these recall figures: DIR/index.html (and DIR/summary.json, "
            "which a later `raysearch activate --report DIR` of the same activation reuses)."))] = None,
        verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
    ) -> None:
        """Recall@1 of edited copies of the passive vs the activated images, per edit and overall."""
        import json

        from raysearch.evaluate.activation import DEFAULT_EDITS, ActivationEvalConfig, evaluate_activation

        setup_logging(verbose)
        chosen = tuple(e.strip() for e in edits.split(",") if e.strip()) if edits else DEFAULT_EDITS
        report = evaluate_activation(index_dir, activated, ActivationEvalConfig(
            edits=chosen, nprobe=nprobe, seed=seed, max_images=max_images, exact=exact))
        if report_dir:
            from raysearch.pages.reports import write_activation_report

            typer.echo(f"wrote {write_activation_report(report_dir, activated, report)}", err=True)
        if json_out:
            typer.echo(json.dumps(report.to_dict(), indent=2))
            return
        typer.echo(f"{report.n_images} images, nprobe {report.nprobe}; PSNR {report.mean_psnr:.1f} dB, SSIM {report.mean_ssim:.3f}")
        ep, ea = report.exact_passive, report.exact_activated
        exact_head = f" {'exact passive':>14s} {'exact activated':>16s}" if ep is not None else ""
        typer.echo(f"{'edit':14s} {'passive':>8s} {'activated':>10s}{exact_head}")
        for e in report.passive:
            extra = f" {ep[e]:14.3f} {ea[e]:16.3f}" if ep is not None and ea is not None else ""
            typer.echo(f"{e:14s} {report.passive[e]:8.3f} {report.activated[e]:10.3f}{extra}")
        extra = f" {report.mean_exact_passive:14.3f} {report.mean_exact_activated:16.3f}" if ep is not None else ""
        typer.echo(f"{'mean (edits)':14s} {report.mean_passive:8.3f} {report.mean_activated:10.3f}{extra}   "
                   f"ratio {report.ratio:.2f}")
        if report.shared_codes:
            typer.echo(f"{report.shared_codes} of {report.n_images} images share their index code with another "
                       "indexed image: the index cannot rank them first, activated or not")


_register_eval()
