"""DISC21 at full scale, one command: index the 1M references, tune nprobe, evaluate the dev (or
test) queries as ISC2021 scores them, and activate the 10k references the dev queries copy
(Active Image Indexing) and measure what activation gains.

    ray job submit --working-dir . -- python jobs/disc21.py \\
        --root s3://my-bucket/disc21 --out s3://my-bucket/runs/disc21 --index IVF4096,PQ8x8

Stages (each recorded in OUT/results.json with its seconds):

    build            disc21:ROOT:references -> OUT/index (images/s, nodes used, index timings)
    tune             nprobe reaching --target-recall recall@10 (or the build's tuned value)
    background       optional (--background): disc21:ROOT:train embedded into OUT/work, for
                     SSCD's score normalisation
    eval_dev         micro-AP, recall@P90, recall@1/10 of the dev queries; OUT/predictions-dev.csv
    activate         disc21:ROOT:references_10k activated for the index -> OUT/activated
    eval_activation  recall@1 under edits, passive vs activated

Activation needs an index that stores product-quantised codes (the protocol uses IVF4096,PQ8x8);
with another index the stage is skipped and says why. Locally (a replica, no cluster):

    python -m raysearch.datasets.replicas disc21 /tmp/disc21-mini
    python jobs/disc21.py --root /tmp/disc21-mini --out /tmp/disc21-run --input-size 64 --index IVF2,PQ16x4
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):
    # `python jobs/disc21.py` from the repository root (what `ray job submit` runs): make the
    # uploaded working directory importable, as Ray does for the job's workers.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jobs.common import JobResults, add_common_arguments, run_build, run_tune, setup  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, help="DISC21 folder (local or s3://), see raysearch.sources.disc21.")
    add_common_arguments(ap)
    ap.add_argument("--queries", choices=["dev", "test"], default="dev", help="Query set to evaluate.")
    ap.add_argument("--k", type=int, default=10, help="Predictions per query.")
    ap.add_argument("--background", action="store_true", help="Score normalisation against the train split (embeds it: 1M images).")
    ap.add_argument("--activate", action=argparse.BooleanOptionalAction, default=True,
                    help="Activate the references the dev queries copy, and evaluate activation.")
    ap.add_argument("--activation-iterations", type=int, default=10, help="Optimisation steps per image.")
    ap.add_argument("--activation-batch-size", type=int, default=8)
    ap.add_argument("--edits", default=None, help="Comma-separated edits for the activation evaluation (default: the suite).")
    ap.add_argument("--max-activation-eval", type=int, default=None, help="Evaluate activation on the first N images only.")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    from raysearch import storage
    from raysearch.sources.disc21 import find_ground_truth

    args = parse_args(argv)
    setup(args)
    out = args.out
    index_dir = storage.join(out, "index")
    work = storage.join(out, "work")
    results = JobResults(out, "disc21", args)

    run_build(results, f"disc21:{args.root}:references", index_dir, args)
    nprobe = run_tune(results, index_dir, args)

    background = None
    if args.background:
        from raysearch.evaluate.queries import embeddings_or_images
        from raysearch.search import Searcher

        with results.stage("background") as rec:
            spec = Searcher(index_dir).store.model_spec
            background = embeddings_or_images(f"disc21:{args.root}:train", spec, 0, work)
            rec["embeddings"] = background

    with results.stage(f"eval_{args.queries}") as rec:
        from raysearch.metrics.groundtruth import write_predictions
        from raysearch.evaluate.copy import CopyEvalConfig, evaluate_copy_detection

        gt = find_ground_truth(args.root, args.queries)
        report = evaluate_copy_detection(
            index_dir, f"disc21:{args.root}:{args.queries}_queries", gt,
            CopyEvalConfig(k=args.k, nprobe=nprobe, work_dir=work), background=background,
        )
        predictions = storage.join(out, f"predictions-{args.queries}.csv")
        write_predictions(predictions, report.predictions)
        rec.update({**report.summary(), "ground_truth": gt, "predictions_csv": predictions})

    if args.activate:
        run_activation(results, args, index_dir, nprobe)
    return results.finish()


def run_activation(results: JobResults, args: argparse.Namespace, index_dir: str, nprobe: int | None) -> None:
    from raysearch import storage
    from raysearch.activate.optimize import ActivateConfig, check_quantising
    from raysearch.activate.pipeline import ActivatePipelineConfig, activate_source
    from raysearch.evaluate.activation import DEFAULT_EDITS, ActivationEvalConfig, evaluate_activation
    from raysearch.index.store import IndexStore

    activated = storage.join(args.out, "activated")
    with results.stage("activate") as rec:
        try:
            check_quantising(IndexStore(index_dir).load_trained(), "pq")
        except ValueError as e:
            rec["skipped"] = str(e)
            return
        s = activate_source(
            index_dir, f"disc21:{args.root}:references_10k", activated,
            ActivatePipelineConfig(activate=ActivateConfig(iterations=args.activation_iterations),
                                   batch_size=args.activation_batch_size, progress=False),
            overwrite=args.overwrite,
        )
        rec.update({"out": activated, "n_images": s.n_images, "n_activated": s.n_activated, "n_errors": s.n_errors,
                    "images_per_second": round(s.images_per_second, 3), "mean_psnr": s.mean_psnr,
                    "mean_ssim": s.mean_ssim, "cos_before": s.mean_cos_before, "cos_after": s.mean_cos_after})
    with results.stage("eval_activation") as rec:
        edits = tuple(e.strip() for e in args.edits.split(",") if e.strip()) if args.edits else DEFAULT_EDITS
        report = evaluate_activation(index_dir, activated, ActivationEvalConfig(
            edits=edits, nprobe=nprobe, max_images=args.max_activation_eval))
        rec.update(report.to_dict())


if __name__ == "__main__":
    doc = main()
    print(f"disc21 job {doc['status']}: results in {doc['args']['out']}/results.json")
