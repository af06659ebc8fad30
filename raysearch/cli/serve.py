"""`raysearch serve` (run the query service) and `raysearch query` (its command-line client)."""

from __future__ import annotations

import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Optional

import typer

from raysearch.cli.common import (
    FAILED_QUERIES_EXIT,
    OutputFormat,
    app,
    expand_queries,
    fail,
    report_failed_queries,
    setup_logging,
    user_errors,
    write_results,
)

ApiKeyOpt = Annotated[Optional[str], typer.Option(
    "--api-key", envvar="RAYSEARCH_API_KEY", show_envvar=True,
    help="Require 'Authorization: Bearer KEY' on every request (except /healthz and the API docs).",
)]
ClientKeyOpt = Annotated[Optional[str], typer.Option(
    "--api-key", envvar="RAYSEARCH_API_KEY", show_envvar=True,
    help="The service's API key (sent as 'Authorization: Bearer KEY').",
)]


@app.command("serve")
@user_errors
def serve_cmd(
    index_dir: Annotated[str, typer.Argument(help="Index directory (local or s3://).")],
    host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 exposes the service to the network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port.")] = 8000,
    replicas: Annotated[int, typer.Option(help="Replicas of the ingress and of the query embedder.")] = 1,
    shard_replicas: Annotated[int, typer.Option(help="Replicas of each shard searcher.")] = 1,
    api_key: ApiKeyOpt = None,
    shard_timeout: Annotated[float, typer.Option(help="Seconds to wait for a shard; slower shards are reported in 'missing_shards'.")] = 5.0,
    max_body_mb: Annotated[float, typer.Option(help="Largest request body accepted (MiB); larger ones get 413.")] = 20.0,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Check every shard file against its checksum when loading.")] = True,
    shards_in_ingress: Annotated[bool, typer.Option(help="Search every shard inside the ingress replica(s) instead of one searcher deployment per shard: one Ray hop less per query (lower latency for light searches); for indexes one replica can map.")] = False,
    direct_ingress: Annotated[bool, typer.Option(help="Each ingress replica also answers HTTP on a port of its own (Ray Serve's direct ingress, ports printed at start), skipping the Serve proxy: about half the latency. A cluster joined with --address must run with RAY_SERVE_ENABLE_DIRECT_INGRESS=1.")] = False,
    rerank: Annotated[Optional[str], typer.Option(help="Second stage for image queries: 'local' verifies each query's top --rerank-k with local features and geometry (a LocalVerifier deployment) and re-orders them by a fused score; hits gain 'verified' and 'inliers'. Vector queries are answered by the first stage.")] = None,
    rerank_k: Annotated[int, typer.Option(help="Candidates verified per image query with --rerank.")] = 20,
    rerank_mirror: Annotated[str, typer.Option("--rerank-mirror", help="With --rerank: when to match each query's mirror image too, to find flipped copies: 'off', 'fallback' (only for queries none of whose candidates verified directly) or 'always' (twice the matching time).")] = "fallback",
    verifier_replicas: Annotated[int, typer.Option(help="Replicas of the LocalVerifier with --rerank (one CPU each).")] = 1,
    detach: Annotated[bool, typer.Option(help="Return once the service is up and leave it running on the Ray cluster (needs --address or $RAY_ADDRESS).")] = False,
    address: Annotated[Optional[str], typer.Option(help="Ray cluster address (default: $RAY_ADDRESS, else a local cluster).")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Serve INDEX_DIR over HTTP with Ray Serve until interrupted (Ctrl-C shuts Serve down)."""
    from raysearch.index.store import IndexStore
    from raysearch.serve.app import check_port_free, direct_urls, prepare_ray, service_url, start_service
    from raysearch.serve.config import ServeConfig

    setup_logging(verbose)
    config = ServeConfig(
        index_dir=index_dir, host=host, port=port, replicas=replicas, shard_replicas=shard_replicas,
        api_key=api_key, shard_timeout_s=shard_timeout, max_body_bytes=int(max_body_mb * 1024 * 1024),
        verify=verify, shards_in_ingress=shards_in_ingress,
        rerank=rerank, rerank_k=rerank_k, rerank_mirror=rerank_mirror, verifier_replicas=verifier_replicas,
    )
    address = address or os.environ.get("RAY_ADDRESS") or None
    if detach and not address:
        raise fail("--detach leaves the service on a running Ray cluster: give --address (or set "
                   "RAY_ADDRESS); start one with `ray start --head`")
    store = IndexStore(index_dir, verify=False)  # a missing or incomplete index fails here, by name
    if not address:
        check_port_free(host, port)   # a Ray we start ourselves: the port must be free now
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        typer.echo(f"warning: listening on {host} without --api-key: anyone who can reach port {port} "
                   "can search this index", err=True)
    where = "in the ingress" if shards_in_ingress else "searcher(s)"
    typer.echo(f"starting {len(store.shards)} shard {where} for {store.ntotal} vectors ...", err=True)
    if rerank:
        from raysearch.rerank import LocalReranker

        LocalReranker.check_index(store)   # an extractor this machine lacks fails here, not in a replica
        stored = "stored" if (store.manifest.get("local") or {}).get("files") else "extracted per query (none stored)"
        typer.echo(f"verifying image queries' top {rerank_k} with local features ({stored}), "
                   f"{verifier_replicas} verifier replica(s)", err=True)
    url = service_url(config)
    # SIGTERM (from a process manager) stops the service as cleanly as Ctrl-C, even mid-start.
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        prepare_ray(address, direct_ingress)
        # Starting Ray installs its own handler of fatal signals, SIGTERM included (it prints a
        # native stack and aborts): put ours back.
        signal.signal(signal.SIGTERM, _raise_interrupt)
        start_service(config, address, direct_ingress=direct_ingress)
        typer.echo(f"serving {index_dir} at {url}  (POST {url}/search, GET {url}/healthz, docs {url}/docs)")
        if direct_ingress:
            for direct in direct_urls(config):
                typer.echo(f"direct (no proxy hop): {direct}")
        if detach:
            typer.echo(f"detached: the service keeps running on the Ray cluster; stop it with "
                       f"`serve shutdown` or `serve delete {config.app_name}`")
            return
        typer.echo("press Ctrl-C to stop", err=True)
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        typer.echo("shutting down ...", err=True)
        _stop_service(config.app_name, attached=address is not None)
        typer.echo("stopped", err=True)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _stop_service(app_name: str, attached: bool) -> None:
    """Remove our application; shut Serve (and a Ray we started) down when nothing else uses it."""
    import ray
    from ray import serve

    if attached:
        serve.delete(app_name)
        if serve.status().applications:
            return  # other applications still run on this cluster's Serve
    serve.shutdown()
    if not attached:
        ray.shutdown()


@app.command("query")
@user_errors
def query_cmd(
    url: Annotated[str, typer.Argument(help="Service URL, e.g. http://127.0.0.1:8000 (the scheme may be left out).")],
    images: Annotated[list[str], typer.Argument(help="Query images: local files or any local SOURCE (folder, glob, list file); read here and uploaded.")],
    k: Annotated[int, typer.Option("--top-k", "-k", help="Results per query (1..1000).")] = 10,
    nprobe: Annotated[Optional[int], typer.Option(help="Override the index's tuned nprobe / efSearch.")] = None,
    format: Annotated[OutputFormat, typer.Option("--format", "-f", help="table, csv (query,rank,id,uri,score) or json.")] = OutputFormat.table,
    api_key: ClientKeyOpt = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each answer.")] = 60.0,
    concurrency: Annotated[int, typer.Option(help="Requests in flight at once.")] = 4,
) -> None:
    """Search a running `raysearch serve` with query images; same output as `raysearch search`."""
    import httpx

    from raysearch import storage
    from raysearch.serve.client import MAX_K, SearchClient, ServiceError

    if not 1 <= k <= MAX_K:
        raise ValueError(f"-k must be between 1 and {MAX_K}, got {k}")
    images = expand_queries(list(images))
    if concurrency < 1:
        raise ValueError(f"--concurrency must be >= 1, got {concurrency}")

    def ask(path: str):
        """One query: (hits, None) or (None, reason the image could not be used)."""
        try:
            data = storage.read_bytes(path)
        except OSError as e:
            return None, f"cannot read: {e.strerror or e}"
        try:
            answer = client.search_images([data], k=k, nprobe=nprobe, names=[path])
        except ServiceError as e:
            if e.status in (400, 413, 422):  # this image is the problem; other queries may be fine
                return None, e.message
            raise
        if answer.partial:
            typer.echo(f"warning: {path}: partial results, shards {', '.join(answer.missing_shards)} "
                       "did not answer", err=True)
        return answer.results[0], None

    try:
        with SearchClient(url, api_key=api_key, timeout=timeout) as client:
            with ThreadPoolExecutor(max_workers=concurrency) as pool:
                answers = list(pool.map(ask, images))
    except ServiceError as e:
        raise fail(f"{url}: {e}") from None
    except httpx.HTTPError as e:
        raise fail(f"{url}: {type(e).__name__}: {e}") from None

    rows = []
    for path, (hits, problem) in zip(images, answers):
        if problem is not None:
            rows.append({"query": path, "rank": None, "id": None, "uri": None, "score": None, "error": problem})
            continue
        rows.extend({"query": path, **hit} for hit in hits)
    write_results(rows, format)
    sys.stdout.flush()
    if report_failed_queries(rows):
        raise typer.Exit(FAILED_QUERIES_EXIT)
