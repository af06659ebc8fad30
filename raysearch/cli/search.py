"""`raysearch search` and `raysearch models`."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from raysearch.cli.common import (
    FAILED_QUERIES_EXIT,
    RESULT_COLUMNS,
    OutputFormat,
    app,
    expand_queries,
    report_failed_queries,
    setup_logging,
    user_errors,
    write_results,
)


def result_rows(queries: list[str], result, image_ids, uris, problems: list[str | None],
                fields: list[list[dict]] | None = None) -> list[dict]:
    """One row per (query, rank); a query that could not be read gets one row with its error.
    `fields`: per query, the metadata of each hit (rows then carry them under "fields")."""
    rows = []
    for q, query in enumerate(queries):
        if problems[q] is not None:
            rows.append({"query": query, "rank": None, "id": None, "uri": None, "score": None, "error": problems[q]})
            continue
        for r in range(result.ids.shape[1]):
            if result.ids[q, r] < 0:
                break
            row = {"query": query, "rank": r + 1, "id": image_ids[q, r], "uri": uris[q, r],
                   "score": float(result.scores[q, r])}
            if result.verified is not None:
                row.update(verified=bool(result.verified[q, r]), inliers=int(result.inliers[q, r]))
            if fields is not None:
                row["fields"] = fields[q][r]
            rows.append(row)
    return rows


def write_rows_with_fields(rows: list[dict], fmt: OutputFormat, columns: list[str]) -> None:
    """`write_results` with the hits' metadata: CSV gains one column per field (after the usual
    ones), JSON a "fields" object per hit, the table `name=value` pairs at the end of each line."""
    import csv
    import json
    import sys

    if fmt == OutputFormat.json:
        doc: dict[str, dict] = {}
        for r in rows:
            entry = doc.setdefault(r["query"], {"query": r["query"], "results": []})
            if r.get("error"):
                entry["error"] = r["error"]
            elif r["id"] is not None:
                entry["results"].append({k: r[k] for k in ("rank", "id", "uri", "score", "verified", "inliers", "fields") if k in r})
        json.dump(list(doc.values()), sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
        return
    checked = any("verified" in r for r in rows)
    if fmt == OutputFormat.csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(list(RESULT_COLUMNS) + (["verified", "inliers"] if checked else []) + columns)
        for r in rows:
            if r.get("error"):
                continue
            extra = [int(r["verified"]), r["inliers"]] if checked else []
            writer.writerow([r["query"], r["rank"], r["id"], r["uri"], f"{r['score']:.6f}", *extra,
                             *(r["fields"].get(c, "") for c in columns)])
        return
    current = None
    for r in rows:
        if r["query"] != current:
            current = r["query"]
            sys.stdout.write(f"{current}\n")
        if r.get("error"):
            sys.stdout.write("  (could not be searched; see the error on stderr)\n")
        elif r["id"] is not None:
            pairs = "  ".join(f"{c}={r['fields'].get(c)}" for c in columns)
            sys.stdout.write(f"  {r['rank']:>4}  {r['score']:>8.6f}  {r['id']}  ({r['uri']})  {pairs}\n")


@app.command()
@user_errors
def search(
    index_dir: Annotated[str, typer.Argument(help="Index directory (local or s3://).")],
    queries: Annotated[list[str], typer.Argument(help="Query images: files, URIs, or any SOURCE (folder, glob, list file).")],
    k: Annotated[int, typer.Option("--top-k", "-k", help="Results per query (1..1000).")] = 10,
    nprobe: Annotated[Optional[int], typer.Option(help="Override the index's tuned nprobe / efSearch.")] = None,
    qe: Annotated[Optional[int], typer.Option(help="Alpha query expansion with the top K results (0 = off; default: the index's setting).")] = None,
    qe_alpha: Annotated[float, typer.Option(help="Query expansion weight = similarity ** alpha.")] = 3.0,
    format: Annotated[OutputFormat, typer.Option("--format", "-f", help="table, csv (query,rank,id,uri,score, and verified,inliers with --rerank) or json.")] = OutputFormat.table,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Check every index file against its checksum.")] = True,
    rerank: Annotated[Optional[str], typer.Option(help="Second stage: 'local' verifies the top --rerank-k candidates with local features and geometry, and re-orders them by a fused score.")] = None,
    rerank_k: Annotated[int, typer.Option(help="Candidates verified per query with --rerank.")] = 20,
    rerank_mirror: Annotated[str, typer.Option("--rerank-mirror", help="With --rerank: when to match the query's mirror image too, to find flipped copies: 'off', 'fallback' (only when none of its candidates verified directly) or 'always' (twice the matching time).")] = "fallback",
    where: Annotated[Optional[str], typer.Option("--where", help="Only images whose metadata satisfy this expression, e.g. 'label == \"boots\"' (==, !=, <, <=, >, >=, in, and, or, not over the columns of the list SOURCE).")] = None,
    fields: Annotated[Optional[str], typer.Option("--fields", help="Metadata columns to show with each hit, comma-separated (e.g. label,price).")] = None,
    html: Annotated[Optional[str], typer.Option("--html", help="Also write the results as a page: each query beside its top-k thumbnails (one self-contained HTML file).")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Search the index with query images, embedded by the index's own model."""
    from raysearch.index.expansion import QueryExpansion
    from raysearch.rerank import RerankConfig, check_method
    from raysearch.search import Searcher, check_k
    from raysearch.verify import mirror_mode

    setup_logging(verbose)
    check_k(k)
    check_method(rerank)
    rerank_mirror = mirror_mode(rerank_mirror, "--rerank-mirror")
    second = RerankConfig(k=rerank_k, mirror=rerank_mirror) if rerank else None
    expansion = None if qe is None else (QueryExpansion(qe, qe_alpha) if qe != 0 else False)
    paths = expand_queries(list(queries))
    columns = [c.strip() for c in fields.split(",") if c.strip()] if fields else None
    searcher = Searcher(index_dir, verify=verify)
    # A bad filter or an unknown column fails before any image is embedded.
    if columns:
        searcher.fields.values([], columns)
    if where is not None:
        searcher.filter_for(where)
    result, problems = searcher.search_images(paths, k=k, nprobe=nprobe, query_expansion=expansion, rerank=second,
                                              where=where)
    image_ids, uris = searcher.lookup(result)
    rows = result_rows(paths, result, image_ids, uris, problems, searcher.fields_of(result, columns) if columns else None)
    if columns:
        write_rows_with_fields(rows, format, columns)
    else:
        write_results(rows, format)
    if html:
        from raysearch.pages.results import write_search_page

        # On stderr: stdout holds the results in --format, which a pipe may be reading.
        typer.echo(f"wrote {write_search_page(html, rows, k, subtitle=index_dir)}", err=True)
    if report_failed_queries(rows):
        raise typer.Exit(FAILED_QUERIES_EXIT)


@app.command()
def models() -> None:
    """List the registered models."""
    from raysearch.models import available_models

    for name, desc in available_models().items():
        typer.echo(f"{name:28s} {desc}")
