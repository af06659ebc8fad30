"""`raysearch eval gldv2`: GLDv2 landmark retrieval, mAP@100 as the challenge scores it."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from raysearch.cli.common import user_errors
from raysearch.cli.eval import (
    IndexDirArg,
    InProcessOpt,
    JsonOpt,
    OutOpt,
    NprobeOpt,
    ProgressOpt,
    QeAlphaOpt,
    QeOpt,
    VerboseOpt,
    WorkOpt,
    eval_app,
    output_file,
    print_json,
    query_expansion_option,
)


@eval_app.command("gldv2")
@user_errors
def gldv2_cmd(
    index_dir: IndexDirArg,
    root: Annotated[Optional[str], typer.Option(help="GLDv2 folder (local or s3://): queries default to gldv2:ROOT:test_retrieval, the solution to ROOT's retrieval_solution_v2.1.csv.")] = None,
    queries: Annotated[Optional[str], typer.Option("--queries", "-q", help="The test images (any SOURCE, e.g. gldv2:ROOT:test); only the scored ones are embedded.")] = None,
    solution: Annotated[Optional[str], typer.Option(help="retrieval_solution_v2.1.csv (id,images,Usage).")] = None,
    k: Annotated[int, typer.Option("--k", "-k", help="Results per query (the metric reads the top 100).")] = 100,
    nprobe: NprobeOpt = None,
    qe: QeOpt = None,
    qe_alpha: QeAlphaOpt = 3.0,
    out: OutOpt = None,
    predictions: Annotated[Optional[str], typer.Option(help="Where to write the predictions in the challenge's submission format (id,images) instead of OUT/predictions.csv; '' to skip.")] = None,
    match_ids: Annotated[str, typer.Option(help="'name' (file name without folders/extension) or 'exact' (image ids as indexed).")] = "name",
    in_process_limit: InProcessOpt = 1000,
    work: WorkOpt = None,
    json_out: JsonOpt = False,
    progress: ProgressOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """GLDv2 retrieval: mAP@100, mP@1,5,10,50,100 and first-correct positions, Public and Private."""
    from raysearch.cli.common import setup_logging
    from raysearch.evaluate.gldv2 import Gldv2EvalConfig, evaluate_gldv2
    from raysearch.metrics.gldv2 import write_retrieval_predictions

    setup_logging(verbose)
    if root is None and (queries is None or solution is None):
        raise ValueError("give --root, or both --queries and --solution")
    if queries is None:
        queries = f"gldv2:{root}:test_retrieval"
    if solution is None:
        from raysearch.sources.gldv2 import find_solution

        solution = find_solution(str(root))
    config = Gldv2EvalConfig(k=k, nprobe=nprobe, query_expansion=query_expansion_option(qe, qe_alpha),
                             match_ids=match_ids, in_process_limit=in_process_limit, work_dir=work, progress=progress)
    report = evaluate_gldv2(index_dir, queries, solution, config)
    predictions = output_file(index_dir, "gldv2", out, predictions, "predictions.csv")
    if predictions:
        write_retrieval_predictions(predictions, report.predictions)
    if json_out:
        print_json({**report.summary(), "predictions_csv": predictions or None})
        return
    typer.echo(f"gldv2 retrieval: {report.n_ignored} ignored test images"
               + (f"; {len(report.missing_queries)} scored test images unusable (AP 0)" if report.missing_queries else ""))
    ranks = list(next(iter(report.metrics.values())).precision_at)
    typer.echo(f"{'':8s} {'queries':>8s} {'mAP@100':>8s} " + " ".join(f"{'mP@' + str(r):>7s}" for r in ranks)
               + f" {'pos mean':>9s} {'median':>7s}")
    for usage, m in report.metrics.items():
        typer.echo(f"{usage:8s} {m.n_queries:8d} {100 * m.map_at_100:8.2f} "
                   + " ".join(f"{100 * m.precision_at[r]:7.2f}" for r in ranks)
                   + f" {m.mean_position:9.2f} {m.median_position:7.1f}")
    if predictions:
        typer.echo(f"wrote {predictions}")
