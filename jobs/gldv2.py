"""GLDv2 retrieval at full scale, one command: index the 762k index images, tune nprobe, and score
the test queries with mAP@100 as the GLDv2 retrieval challenge does (Public and Private).

    ray job submit --working-dir . -- python jobs/gldv2.py \\
        --root s3://my-bucket/gldv2 --out s3://my-bucket/runs/gldv2 --model resnet101_gem --weights ...

Stages (each recorded in OUT/results.json with its seconds):

    build       gldv2:ROOT:index -> OUT/index (with --whiten-on gldv2:ROOT:train, PCA-whitening
                learned on the train images is built into the index)
    tune        nprobe reaching --target-recall recall@10 (or the build's tuned value)
    eval        the scored test images (gldv2:ROOT:test_retrieval) searched, mAP@100, mP@k,
                positions; OUT/predictions-gldv2.csv in the challenge's submission format

Locally (a replica, no cluster):

    python -m raysearch.datasets.replicas gldv2 /tmp/gldv2-mini
    python jobs/gldv2.py --root /tmp/gldv2-mini --out /tmp/gldv2-run --input-size 64
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):
    # `python jobs/gldv2.py` from the repository root (what `ray job submit` runs).
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jobs.common import JobResults, add_common_arguments, run_build, run_tune, setup  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, help="GLDv2 folder (local or s3://), see raysearch.sources.gldv2.")
    add_common_arguments(ap)
    ap.add_argument("--whiten-on", default=None, help="Learn PCA-whitening on this SOURCE (e.g. gldv2:ROOT:train) and build it into the index.")
    ap.add_argument("--whiten-dim", type=int, default=None)
    ap.add_argument("--queries", default=None, help="Query images (default: gldv2:ROOT:test_retrieval).")
    ap.add_argument("--k", type=int, default=100, help="Results per query (the metric reads the top 100).")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    from raysearch import storage
    from raysearch.evaluate.gldv2 import Gldv2EvalConfig, evaluate_gldv2
    from raysearch.metrics.gldv2 import write_retrieval_predictions
    from raysearch.sources.gldv2 import find_solution

    args = parse_args(argv)
    setup(args)
    out = args.out
    index_dir = storage.join(out, "index")
    results = JobResults(out, "gldv2", args)

    whitening = None
    if args.whiten_on:
        from raysearch.index.transforms import WhiteningConfig

        whitening = WhiteningConfig(source=args.whiten_on, dim=args.whiten_dim)
    run_build(results, f"gldv2:{args.root}:index", index_dir, args, whitening)
    nprobe = run_tune(results, index_dir, args)

    with results.stage("eval") as rec:
        solution = find_solution(args.root)
        queries = args.queries or f"gldv2:{args.root}:test_retrieval"
        report = evaluate_gldv2(index_dir, queries, solution, Gldv2EvalConfig(
            k=args.k, nprobe=nprobe, work_dir=storage.join(out, "work")))
        predictions = storage.join(out, "predictions-gldv2.csv")
        write_retrieval_predictions(predictions, report.predictions)
        rec.update({**report.summary(), "solution": solution, "queries": queries, "predictions_csv": predictions})
    return results.finish()


if __name__ == "__main__":
    doc = main()
    print(f"gldv2 job {doc['status']}: results in {doc['args']['out']}/results.json")
