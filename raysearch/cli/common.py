"""Shared CLI plumbing: the Typer app, error reporting (one line, exit code 2), output formats."""

from __future__ import annotations

import csv
import functools
import json
import logging
import signal
import sys
import threading
from collections.abc import Callable
from enum import Enum
from typing import Any, TypeVar

import typer

from raysearch.version import __version__

app = typer.Typer(
    name="raysearch",
    help="Index and search very large image collections on a Ray cluster.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

USER_ERROR_EXIT = 2
FAILED_QUERIES_EXIT = 1  # some queries could not be searched (the others were)
INTERRUPTED_EXIT = 130   # 128 + SIGINT, what a shell reports for Ctrl-C
F = TypeVar("F", bound=Callable[..., Any])


class OutputFormat(str, Enum):
    table = "table"
    csv = "csv"
    json = "json"


RESULT_COLUMNS = ("query", "rank", "id", "uri", "score")
VERIFY_COLUMNS = ("verified", "inliers")   # added by a re-ranked search


def fail(message: str, code: int = USER_ERROR_EXIT) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def interrupted(progress: tuple[int, int] | None, unit: str) -> typer.Exit:
    """Tell the user where a stopped run stands and how to go on; the exit code of a Ctrl-C."""
    where = f" after {progress[0]} of {progress[1]} {unit}" if progress else ""
    typer.echo(f"interrupted{where}; rerun the same command to resume", err=True)
    return typer.Exit(INTERRUPTED_EXIT)


def user_errors(fn: F) -> F:
    """Turn the errors a user can fix (bad paths, bad options, bad data) into a one-line message and
    exit code 2; anything else is a bug and keeps its traceback."""
    from raysearch.errors import RaysearchError
    from raysearch.images import DecodeError

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if threading.current_thread() is threading.main_thread():
            # SIGTERM (a job manager, a container stopping) ends a command like Ctrl-C does.
            signal.signal(signal.SIGTERM, _stop_on_sigterm)
        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError,
                RaysearchError, DecodeError) as e:
            raise fail(str(e).splitlines()[0] if str(e) else type(e).__name__) from None

    return wrapper  # type: ignore[return-value]


def expand_queries(arguments: list[str]) -> list[str]:
    """Query arguments -> image paths/URIs: an image file stands for itself; a folder, glob or list
    file (any SOURCE) for every image it names, in source order."""
    from raysearch import storage
    from raysearch.images import is_image_path
    from raysearch.sources import open_source

    out: list[str] = []
    for arg in arguments:
        if is_image_path(arg) and not any(ch in arg for ch in "*?[") and (not storage.exists(arg) or not storage.isdir(arg)):
            out.append(arg)   # a file (or a missing one: it is reported as a failed query)
            continue
        for batch in open_source(arg).iter_batches():
            out.extend(batch.column("uri").to_pylist())
    if not out:
        raise ValueError(f"no query image in {' '.join(arguments)}")
    return out


def report_failed_queries(rows: list[dict[str, Any]]) -> int:
    """Write one `error: QUERY: reason` line per failed query on stderr; return how many failed."""
    failed = [r for r in rows if r.get("error")]
    for r in failed:
        typer.echo(f"error: {r['query']}: {r['error']}", err=True)
    return len(failed)


def _stop_on_sigterm(signum, frame) -> None:
    raise KeyboardInterrupt


def setup_logging(verbose: bool) -> None:
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr, force=True)
    logging.getLogger("raysearch").setLevel(logging.INFO if verbose else logging.WARNING)


def write_results(rows: list[dict[str, Any]], fmt: OutputFormat, out=None) -> None:
    """rows: dicts with RESULT_COLUMNS (and "error" for a query that could not be searched).
    table: aligned text; csv: exactly RESULT_COLUMNS, failed queries left out; json: one object per
    query with its ranked results (and its error)."""
    out = out or sys.stdout
    checked = any("verified" in r for r in rows)   # re-ranked: each hit says whether it was verified
    if fmt == OutputFormat.csv:
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(RESULT_COLUMNS + (VERIFY_COLUMNS if checked else ()))
        for r in rows:
            if r.get("error"):   # a failed query has no row; report_failed_queries names it on stderr
                continue
            extra = [int(r["verified"]), r["inliers"]] if checked else []
            writer.writerow([r["query"], r["rank"], r["id"], r["uri"], _score_text(r["score"]), *extra])
        return
    if fmt == OutputFormat.json:
        by_query: dict[str, list[dict[str, Any]]] = {}
        problems: dict[str, str] = {}
        for r in rows:
            by_query.setdefault(r["query"], [])
            if r.get("error"):
                problems[r["query"]] = r["error"]
            elif r["id"] is not None:
                by_query[r["query"]].append({k: r[k] for k in ("rank", "id", "uri", "score", *VERIFY_COLUMNS) if k in r})
        doc = [
            {"query": q, "results": res, **({"error": problems[q]} if q in problems else {})}
            for q, res in by_query.items()
        ]
        json.dump(doc, out, indent=2)
        out.write("\n")
        return
    current = None
    for r in rows:
        if r["query"] != current:
            current = r["query"]
            out.write(f"{current}\n")
        if r.get("error"):
            out.write("  (could not be searched; see the error on stderr)\n")
        elif r["id"] is not None:
            mark = (f"  verified, {r['inliers']} inliers" if r["verified"] else "  not verified") if checked else ""
            out.write(f"  {r['rank']:>4}  {_score_text(r['score']):>8}  {r['id']}  ({r['uri']}){mark}\n")


def _score_text(score: float | None) -> str:
    return "" if score is None else f"{score:.6f}"


def version_callback(value: bool) -> None:
    if value:
        typer.echo(f"raysearch {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=version_callback, is_eager=True, help="Print the version."),
) -> None:
    """Index and search very large image collections on a Ray cluster."""
