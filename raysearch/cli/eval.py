"""`raysearch eval ...`: the field's benchmarks against an index directory.

Commands live on `eval_app`, a Typer sub-app mounted as `raysearch eval`. Another module adds a
command with `from raysearch.cli.eval import eval_app` and `@eval_app.command("name")` (and is
imported in `raysearch.cli._register` after this one). The option types below are shared.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Optional

import typer

from raysearch.cli.common import app, setup_logging, user_errors

eval_app = typer.Typer(
    name="eval",
    help="Evaluate an index: copy detection (DISC21), landmarks (Revisited Oxford/Paris), GLDv2 retrieval, CMC, ANN recall, activation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(eval_app, name="eval")

IndexDirArg = Annotated[str, typer.Argument(help="Index directory (local or s3://).")]
QueriesOpt = Annotated[str, typer.Option("--queries", "-q", help="Query images: a folder, glob, list file, s3:// URI (or an embeddings folder made with the index's model).")]
KOpt = Annotated[Optional[int], typer.Option("--k", "-k", help="Results per query (default: what the metric needs).")]
NprobeOpt = Annotated[Optional[int], typer.Option(help="nprobe / efSearch (default: the index's).")]
QeOpt = Annotated[Optional[int], typer.Option(help="Alpha query expansion with the top K results (0 = off; default: the index's setting).")]
QeAlphaOpt = Annotated[float, typer.Option(help="Query expansion weight = similarity ** alpha.")]
RerankOpt = Annotated[Optional[str], typer.Option(help="Second stage: 'local' verifies each query's top --rerank-k with local features and geometry and re-orders them by a fused score.")]
RerankKOpt = Annotated[int, typer.Option(help="Candidates verified per query with --rerank.")]
RerankMirrorOpt = Annotated[str, typer.Option("--rerank-mirror", help="With --rerank: when to match each query's mirror image too, to find flipped copies: 'off', 'fallback' (only for queries none of whose candidates verified directly) or 'always' (twice the matching time).")]


def rerank_option(method: Optional[str], k: int, mirror: str):
    """RerankConfig | None from the --rerank options (a bad --rerank-mirror is refused either way)."""
    from raysearch.rerank import RerankConfig, check_method
    from raysearch.verify import mirror_mode

    check_method(method)
    mirror = mirror_mode(mirror, "--rerank-mirror")
    return RerankConfig(k=k, mirror=mirror) if method else None
MatchOpt = Annotated[str, typer.Option(help="How ids are matched: 'name' (file name without folders/extension, numbers as numbers) or 'exact' (image ids as indexed).")]
InProcessOpt = Annotated[int, typer.Option(help="Embed up to this many query images in this process; more go through the Ray pipeline.")]
WorkOpt = Annotated[Optional[str], typer.Option(help="Folder for query/background embeddings made with Ray (kept and reused; default: a temporary folder). On a multi-node cluster use shared storage, e.g. s3://.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the metrics as JSON.")]
OutOpt = Annotated[Optional[str], typer.Option("--out", "-o", help="Folder for the evaluation's files (predictions); default INDEX_DIR/eval/PROTOCOL.")]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="Ray Data progress bars.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Log each stage.")]
ReportOpt = Annotated[Optional[str], typer.Option("--report", help="Also write a page of the results: DIR/index.html (metrics, plots, thumbnails; opens offline) and DIR/summary.json.")]


def query_expansion_option(qe: Optional[int], qe_alpha: float):
    """None (the index's default), False (off) or a QueryExpansion."""
    from raysearch.index.expansion import QueryExpansion

    if qe is None:
        return None
    return QueryExpansion(qe, qe_alpha) if qe != 0 else False


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def print_json(doc: dict) -> None:
    typer.echo(json.dumps(doc, indent=2, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def output_file(index_dir: str, protocol: str, out: Optional[str], explicit: Optional[str], name: str) -> str | None:
    """Where an evaluation writes a file: the path given explicitly ('' = nowhere), else OUT/name
    with OUT defaulting to INDEX_DIR/eval/PROTOCOL (never the working directory). An index folder
    that cannot be written to gets a warning and no file."""
    from raysearch import storage

    if explicit is not None:
        return explicit or None
    folder = out or storage.join(index_dir, "eval", protocol)
    try:
        storage.ensure_writable_dir(folder)
    except PermissionError as e:
        typer.echo(f"warning: {e}; pass --out DIR to keep the {name}", err=True)
        return None
    return storage.join(folder, name)


@eval_app.command("copy")
@user_errors
def copy_cmd(
    index_dir: IndexDirArg,
    queries: QueriesOpt,
    gt: Annotated[str, typer.Option("--gt", help="Ground truth CSV in DISC21 format: query_id,reference_id (empty reference = no match).")],
    k: Annotated[int, typer.Option("--k", "-k", help="Predictions per query.")] = 10,
    nprobe: NprobeOpt = None,
    qe: QeOpt = None,
    qe_alpha: QeAlphaOpt = 3.0,
    rerank: RerankOpt = None,
    rerank_k: RerankKOpt = 20,
    rerank_mirror: RerankMirrorOpt = "fallback",
    background: Annotated[Optional[str], typer.Option(help="Score normalisation (SSCD): images (or an embeddings folder) none of the references copy, e.g. DISC21's training set.")] = None,
    beta: Annotated[float, typer.Option(help="Score normalisation weight: score -= beta * mean top-k background similarity.")] = 1.0,
    background_k: Annotated[int, typer.Option(help="Background neighbours averaged for score normalisation.")] = 3,
    max_predictions: Annotated[Optional[int], typer.Option(help="Keep only the best-scoring predictions in total (ISC2021 allowed 10 per query).")] = None,
    out: OutOpt = None,
    predictions: Annotated[Optional[str], typer.Option(help="Where to write the predictions CSV (query_id,reference_id,score) instead of OUT/predictions.csv; '' to skip.")] = None,
    match_ids: MatchOpt = "name",
    in_process_limit: InProcessOpt = 1000,
    work: WorkOpt = None,
    json_out: JsonOpt = False,
    report_dir: ReportOpt = None,
    progress: ProgressOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Copy detection (DISC21 / ISC2021): micro-AP, recall at precision 0.9, recall@1 and @10."""
    from raysearch.metrics.groundtruth import write_predictions
    from raysearch.evaluate.copy import CopyEvalConfig, evaluate_copy_detection
    from raysearch.search import Searcher

    setup_logging(verbose)
    config = CopyEvalConfig(
        k=k, nprobe=nprobe, query_expansion=query_expansion_option(qe, qe_alpha), background=background,
        beta=beta, background_k=background_k, max_predictions=max_predictions, match_ids=match_ids,
        in_process_limit=in_process_limit, work_dir=work, progress=progress,
        rerank=rerank_option(rerank, rerank_k, rerank_mirror),
    )
    searcher = Searcher(index_dir)
    report = evaluate_copy_detection(searcher, queries, gt, config)
    predictions = output_file(index_dir, "copy", out, predictions, "predictions.csv")
    if predictions:
        write_predictions(predictions, report.predictions)
    if report_dir:
        from raysearch.pages.reports import write_copy_report

        page = write_copy_report(report_dir, report, queries, searcher, match_ids)
        typer.echo(f"wrote {page}", err=True)
    if json_out:
        print_json({**report.summary(), "predictions_csv": predictions or None})
        return
    m = report.metrics
    typer.echo(
        f"copy detection: {report.n_queries} queries, {m.n_ground_truth} ground-truth matches, "
        f"{m.n_predictions} predictions"
        + (f"; {len(report.missing_queries)} listed queries unusable" if report.missing_queries else "")
        + (f"; {report.ignored_queries} query images not in the ground truth" if report.ignored_queries else "")
    )
    typer.echo(f"micro-AP     {_fmt(m.average_precision)}")
    if m.recall_at_p90 is None:
        typer.echo("recall@P90   n/a (precision never reaches 0.9)")
    else:
        typer.echo(f"recall@P90   {_fmt(m.recall_at_p90)} (threshold {m.threshold_at_p90:.6g})")
    typer.echo(f"recall@1     {_fmt(m.recall_at_rank1)}")
    typer.echo(f"recall@10    {_fmt(m.recall_at_rank10)}")
    if predictions:
        typer.echo(f"wrote {predictions}")


@eval_app.command("landmarks")
@user_errors
def landmarks_cmd(
    index_dir: IndexDirArg,
    queries: QueriesOpt,
    gnd: Annotated[str, typer.Option("--gnd", help="revisitop ground truth, e.g. gnd_roxford5k.pkl or gnd_rparis6k.pkl.")],
    k: KOpt = None,
    nprobe: NprobeOpt = None,
    qe: QeOpt = None,
    qe_alpha: QeAlphaOpt = 3.0,
    rerank: RerankOpt = None,
    rerank_k: RerankKOpt = 20,
    rerank_mirror: RerankMirrorOpt = "fallback",
    crop: Annotated[bool, typer.Option("--crop/--no-crop", help="Crop queries to their bounding boxes (the protocol).")] = True,
    match_ids: MatchOpt = "name",
    json_out: JsonOpt = False,
    report_dir: ReportOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Revisited Oxford / Paris: mAP and mP@1,5,10 for Easy, Medium and Hard."""
    from raysearch.evaluate.landmarks import LandmarkEvalConfig, evaluate_landmarks
    from raysearch.search import Searcher

    setup_logging(verbose)
    config = LandmarkEvalConfig(k=k, nprobe=nprobe, query_expansion=query_expansion_option(qe, qe_alpha),
                                crop=crop, match_ids=match_ids, rerank=rerank_option(rerank, rerank_k, rerank_mirror))
    searcher = Searcher(index_dir)
    report = evaluate_landmarks(searcher, queries, gnd, config)
    if report_dir:
        from raysearch.pages.reports import write_landmarks_report

        typer.echo(f"wrote {write_landmarks_report(report_dir, report, searcher)}", err=True)
    if json_out:
        print_json(report.summary())
        return
    m = report.metrics
    typer.echo(f"landmarks: {report.n_queries} queries, rankings {report.depth} deep")
    if report.not_in_imlist:
        typer.echo(f"  {report.not_in_imlist} indexed images are not in the ground truth's imlist (left out of the rankings)")
    if report.imlist_not_indexed:
        typer.echo(f"  {report.imlist_not_indexed} imlist images are not in the index (never retrieved)")
    kappas = list(next(iter(m.mean_precision_at.values())).keys())
    typer.echo(f"{'':8s} {'mAP':>7s} " + " ".join(f"{'mP@' + str(kp):>7s}" for kp in kappas))
    for protocol in m.map:
        typer.echo(
            f"{protocol:8s} {100 * m.map[protocol]:7.2f} "
            + " ".join(f"{100 * m.mean_precision_at[protocol][kp]:7.2f}" for kp in kappas)
        )


@eval_app.command("cmc")
@user_errors
def cmc_cmd(
    index_dir: IndexDirArg,
    queries: QueriesOpt,
    labels: Annotated[str, typer.Option("--labels", help="CSV of correct query_id,reference_id pairs.")],
    k: KOpt = None,
    nprobe: NprobeOpt = None,
    qe: QeOpt = None,
    qe_alpha: QeAlphaOpt = 3.0,
    rerank: RerankOpt = None,
    rerank_k: RerankKOpt = 20,
    rerank_mirror: RerankMirrorOpt = "fallback",
    match_ids: MatchOpt = "name",
    in_process_limit: InProcessOpt = 1000,
    work: WorkOpt = None,
    json_out: JsonOpt = False,
    report_dir: ReportOpt = None,
    progress: ProgressOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Labelled retrieval (e.g. FID-300): CMC at ranks 1, 5, 10, 20 and at 1%, 5%, 10% of the collection."""
    from raysearch.evaluate.cmc import CmcEvalConfig, evaluate_cmc
    from raysearch.search import Searcher

    setup_logging(verbose)
    config = CmcEvalConfig(k=k, nprobe=nprobe, query_expansion=query_expansion_option(qe, qe_alpha),
                           match_ids=match_ids, in_process_limit=in_process_limit, work_dir=work, progress=progress,
                           rerank=rerank_option(rerank, rerank_k, rerank_mirror))
    searcher = Searcher(index_dir)
    report = evaluate_cmc(searcher, queries, labels, config)
    if report_dir:
        from raysearch.pages.reports import write_cmc_report

        typer.echo(f"wrote {write_cmc_report(report_dir, report, queries, searcher, match_ids)}", err=True)
    if json_out:
        print_json(report.summary())
        return
    m = report.metrics
    typer.echo(f"cmc: {m.n_queries} labelled queries, {m.n_collection} references, rankings {m.depth} deep"
               + (f"; {len(report.missing_queries)} labelled queries unusable" if report.missing_queries else ""))
    for r, v in m.at_rank.items():
        typer.echo(f"rank {r:<6d} {_fmt(v)}")
    for f, v in m.at_fraction.items():
        typer.echo(f"top {100 * f:g}% (rank {m.fraction_ranks[f]}) {_fmt(v)}")


def _int_list(text: Optional[str], option: str) -> Optional[tuple[int, ...]]:
    if not text:
        return None
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"{option} must be comma-separated integers, got {text!r}") from None


@eval_app.command("ann")
@user_errors
def ann_cmd(
    index_dir: IndexDirArg,
    queries: Annotated[int, typer.Option("--queries", help="Query vectors sampled from the index's own embeddings.")] = 1000,
    nprobe: Annotated[Optional[str], typer.Option(help="Comma-separated nprobe / efSearch values (default: powers of two up to nlist).")] = None,
    ks: Annotated[str, typer.Option(help="Comma-separated k for recall@k.")] = "1,10,100",
    seed: Annotated[int, typer.Option(help="Seed for the query sample.")] = 0,
    json_out: JsonOpt = False,
    report_dir: ReportOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """ANN quality: recall@1/10/100 of the index against exact search on the same vectors, and latency, per nprobe."""
    from raysearch.evaluate.ann import AnnEvalConfig, evaluate_ann
    from raysearch.search import Searcher

    setup_logging(verbose)
    config = AnnEvalConfig(n_queries=queries, ks=_int_list(ks, "--ks") or (1, 10, 100),
                           nprobes=_int_list(nprobe, "--nprobe"), seed=seed)
    searcher = Searcher(index_dir)
    report = evaluate_ann(searcher, config)
    if report_dir:
        from raysearch.pages.reports import write_ann_report

        page = write_ann_report(report_dir, report, config.ks, searcher.store.nprobe, index_dir)
        typer.echo(f"wrote {page}", err=True)
    if json_out:
        print_json(report.summary())
        return
    typer.echo(f"ann: {report.factory}, {report.n_vectors} vectors, {report.n_queries} queries "
               f"(exact search {report.exact_seconds:.1f} s)")
    recall_cols = [c for c in report.rows[0] if c.startswith("recall@")]
    typer.echo(f"{'nprobe':>8s} " + " ".join(f"{c:>11s}" for c in recall_cols) + f" {'ms/q batch':>11s} {'ms/q single':>11s}")
    for row in report.rows:
        typer.echo(
            f"{_fmt(row['nprobe']) if row['nprobe'] is not None else 'exact':>8s} "
            + " ".join(f"{_fmt(row[c]):>11s}" for c in recall_cols)
            + f" {row['ms_per_query_batch']:11.3f} {_fmt(row['ms_per_query_single_median']):>11s}"
        )
