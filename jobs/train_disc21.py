"""Learn a copy-detection descriptor on DISC21's training split, then evaluate it on the references
and dev queries, one command:

    ray job submit --working-dir . -- python jobs/train_disc21.py \\
        --root s3://my-bucket/disc21 --out s3://my-bucket/runs/disc21-trained --workers 8 --gpu

Stages (each recorded in OUT/results.json with its seconds):

    train     raysearch train disc21:ROOT:train --objective copy -> OUT/model (Ray Train, one GPU
              per worker; a rerun continues from the last checkpoint)
    disc21    jobs/disc21.py with --model OUT/model into OUT/eval: the references indexed, nprobe
              tuned, the dev queries scored as ISC2021 does (and activation, unless --no-activate)

Locally (a replica, no cluster):

    python -m raysearch.datasets.replicas disc21 /tmp/disc21-mini
    python jobs/train_disc21.py --root /tmp/disc21-mini --out /tmp/disc21-trained --epochs 1 \\
        --input-size 64 --index IVF2,PQ16x4
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jobs.common import JobResults, setup  # noqa: E402


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, help="DISC21 folder (local or s3://), see raysearch.sources.disc21.")
    ap.add_argument("--out", required=True, help="Output folder (local or s3://): model/, eval/, results.json.")
    ap.add_argument("--workers", type=int, default=1, help="Ray Train workers (one GPU each with --gpu).")
    ap.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=None, help="Train on GPUs (default: when the cluster has them).")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=64, help="Images per worker per step.")
    ap.add_argument("--input-size", type=int, default=None, help="Training and indexing input size (default: the model's).")
    ap.add_argument("--dim", type=int, default=None, help="Projection to this many dimensions (default: none).")
    ap.add_argument("--train-blocks", default="auto", help="'all', 'auto' or the last N blocks.")
    ap.add_argument("--max-time", default=None, help="Stop training cleanly after this long (e.g. 6h); rerun to continue.")
    ap.add_argument("--address", default=None, help="Ray address (default: $RAY_ADDRESS, set by `ray job submit`).")
    ap.add_argument("--verbose", "-v", action="store_true")
    # Everything else goes to jobs/disc21.py (e.g. --index, --shards, --no-activate).
    return ap.parse_known_args(argv)


def main(argv: list[str] | None = None) -> dict:
    from raysearch import storage
    from raysearch.train.config import TrainConfig, parse_duration
    from raysearch.train.run import train

    args, rest = parse_args(argv)
    setup(args)
    results = JobResults(args.out, "train_disc21", args)
    model_dir = storage.join(args.out, "model")
    with results.stage("train") as rec:
        config = TrainConfig(objective="copy", workers=args.workers, use_gpu=args.gpu, epochs=args.epochs,
                             batch_size=args.batch_size, input_size=args.input_size, dim=args.dim,
                             train_blocks=args.train_blocks, max_time=parse_duration(args.max_time))
        done = train(f"disc21:{args.root}:train", model_dir, config)
        rec.update({"model": model_dir, "trained_now": done.trained_now,
                    "images": done.model.get("n_images"), "steps": done.model.get("training", {}).get("steps")})
    from jobs import disc21

    with results.stage("disc21") as rec:
        evaluation = disc21.main(["--root", args.root, "--out", storage.join(args.out, "eval"), "--model", model_dir,
                                  *(["--input-size", str(args.input_size)] if args.input_size else []), *rest])
        rec.update({"results": storage.join(args.out, "eval", "results.json"), "status": evaluation.get("status")})
    results.finish()
    return results.doc


if __name__ == "__main__":
    main()
