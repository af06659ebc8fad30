"""Composing the Serve application for one index, and starting it.

`build_app(config)` returns the bound application (Ingress <- QueryEmbedder + one ShardSearcher per
shard, + a LocalVerifier with --rerank local); nothing runs until it is passed to `serve.run` (`start_service` does that) or deployed with
`serve deploy cluster/serve_config.yaml`, whose `import_path` names `app_builder`.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any

from raysearch.serve.config import ServeConfig
from raysearch.serve.core import ResourcePlan, plan_resources, shard_label

if TYPE_CHECKING:
    from ray.serve import Application
    from ray.serve.handle import DeploymentHandle

    from raysearch.index.store import IndexStore

log = logging.getLogger("raysearch.serve")

# Replicas stop within this many seconds when the app is deleted or Serve shuts down.
GRACEFUL_SHUTDOWN_S = 5.0


def shard_deployment_name(i: int) -> str:
    """Shard number `i` -> the name of its ShardSearcher deployment, e.g. 'ShardSearcher-00003'."""
    return f"ShardSearcher-{i:05d}"


def rerank_info(config: ServeConfig) -> dict[str, Any]:
    """The second stage as GET /stats reports it: RerankConfig.to_dict() (method, k, mirror,
    exclusive) and the LocalVerifier's replicas."""
    from raysearch.rerank import RerankConfig

    second = RerankConfig(k=config.rerank_k, mirror=config.rerank_mirror)
    return {**second.to_dict(), "replicas": config.verifier_replicas}


def index_info(store: "IndexStore", config: ServeConfig, plan: ResourcePlan) -> dict[str, Any]:
    """What the Ingress needs to know about the index (and reports on GET /stats)."""
    m = store.manifest
    return {
        "index_dir": store.index_dir,
        "model": m["model"],
        "dim": store.dim,
        "metric": store.metric,
        "count": store.ntotal - int(store.manifest.get("n_removed") or 0),   # live vectors
        "factory": m.get("factory"),
        "nprobe": store.nprobe,
        "nprobe_tuned": bool(m.get("search", {}).get("tuned", False)),
        # The service answers without query expansion (see build_app); reported so clients know.
        "query_expansion_applied": False,
        # Image queries' top rerank_k verified with local features (raysearch.rerank), or None.
        "rerank": rerank_info(config) if config.rerank else None,
        "shards": [{"name": shard_label(s.name), "count": s.ntotal} for s in store.shards],
        "shard_names": [shard_label(s.name) for s in store.shards],
        "replicas": {"ingress": config.replicas, "embedder": config.replicas,
                     "shard": 0 if config.shards_in_ingress else config.shard_replicas},
        "shards_in_ingress": config.shards_in_ingress,
        "resources": {
            "ingress_cpus": plan.ingress_cpus, "embedder_cpus": plan.embedder_cpus,
            "embedder_gpus": plan.embedder_gpus, "shard_cpus": plan.shard_cpus,
        },
        "limits": {
            "max_body_bytes": config.max_body_bytes, "max_queries": config.max_queries,
            "shard_timeout_s": config.shard_timeout_s, "max_image_pixels": config.max_image_pixels,
        },
    }


def _cluster_resources() -> tuple[float, float]:
    import ray

    from raysearch.runtime import ensure_ray

    ensure_ray()
    resources = ray.cluster_resources()
    return float(resources.get("CPU", 1.0)), float(resources.get("GPU", 0.0))


def plan_for(config: ServeConfig, n_shards: int, cluster_cpus: float, cluster_gpus: float) -> ResourcePlan:
    """The resources of each replica of `config`'s application on a cluster of that size.

    With --shards-in-ingress there are no shard deployments: each Ingress replica searches every
    shard itself and reserves one searcher's share on top of its own, so the plan counts one
    search share per Ingress replica.
    """
    local = config.shards_in_ingress
    return plan_resources(
        1 if local else n_shards, config.replicas, config.replicas if local else config.shard_replicas,
        cluster_cpus, cluster_gpus,
        ingress_cpus=config.ingress_cpus, embedder_cpus=config.embedder_cpus,
        embedder_gpus=config.embedder_gpus, shard_cpus=config.shard_cpus,
        embed_threads=config.embed_threads, search_threads=config.search_threads,
        verifiers=config.verifier_replicas if config.rerank else 0, verifier_cpus=config.verifier_cpus,
    )


def build_app(config: ServeConfig) -> "Application":
    """The Serve application for `config.index_dir` (bound, not running).

    Reads only the manifest here; each ShardSearcher replica opens (and checks) its own shard.
    Resources left None in the config are sized to fit the Ray cluster as it is now.
    """
    from raysearch.serve.api import hash_api_key
    from raysearch.index.store import IndexStore
    from raysearch.serve.deployments import Ingress, LocalVerifier, QueryEmbedder, ShardSearcher

    store = IndexStore(config.index_dir, verify=False)
    needs_cluster = any(v is None for v in (config.ingress_cpus, config.embedder_cpus,
                                            config.shard_cpus, config.embedder_gpus)) or bool(
        config.rerank and config.verifier_cpus is None)
    cpus, gpus = _cluster_resources() if needs_cluster else (0.0, 0.0)
    local = config.shards_in_ingress
    plan = plan_for(config, len(store.shards), cpus, gpus)
    log.info("serving %s: %d shards%s; %s", store.index_dir, len(store.shards),
             " searched in the ingress" if local else "", plan)
    if store.manifest.get("query_expansion"):
        # Query expansion needs a second fan-out with vectors reconstructed by the shards; the
        # service answers with the first round only. Say so rather than differ silently.
        log.warning(
            "%s was built with query expansion (%s); the service does not apply it: its answers are "
            "those of `raysearch search --qe 0`", store.index_dir, store.manifest["query_expansion"],
        )
    quiet = {"logging_config": {"enable_access_log": False}}  # internal calls: no line per query
    common = {
        "max_ongoing_requests": config.max_ongoing_requests,
        "health_check_period_s": config.health_check_period_s,
        "graceful_shutdown_timeout_s": GRACEFUL_SHUTDOWN_S,
        "graceful_shutdown_wait_loop_s": 0.5,
    }
    embedder = QueryEmbedder.options(
        num_replicas=config.replicas,
        ray_actor_options={"num_cpus": plan.embedder_cpus, "num_gpus": plan.embedder_gpus},
        **common, **quiet,
    ).bind(
        store.manifest["model"], "cuda" if plan.embedder_gpus > 0 else "cpu", plan.embed_threads,
        config.embed_batch_size, config.embed_batch_wait_s,
    )
    shards = [] if local else [
        ShardSearcher.options(
            name=shard_deployment_name(i),
            num_replicas=config.shard_replicas,
            ray_actor_options={"num_cpus": plan.shard_cpus},
            **common, **quiet,
        ).bind(store.index_dir, i, config.verify, plan.search_threads,
               config.search_batch_size, config.search_batch_wait_s, len(store.shards))
        for i in range(len(store.shards))
    ]
    verifier = None
    if config.rerank:
        from raysearch.rerank import LocalReranker, RerankConfig

        RerankConfig(k=config.rerank_k, mirror=config.rerank_mirror)   # refuse a bad k before deploying
        LocalReranker.check_index(store)
        verifier_cpus = plan.verifier_cpus   # sized with the other deployments to fit the cluster
        verifier = LocalVerifier.options(
            num_replicas=config.verifier_replicas,
            ray_actor_options={"num_cpus": verifier_cpus},
            **common, **quiet,
        ).bind(store.index_dir, {"k": config.rerank_k, "mirror": config.rerank_mirror},
               max(1, int(verifier_cpus)))
    settings = {
        "shard_timeout_s": config.shard_timeout_s,
        "embed_timeout_s": config.embed_timeout_s,
        "max_body_bytes": config.max_body_bytes,
        "max_queries": config.max_queries,
        "max_image_pixels": config.max_image_pixels,
        "api_key_sha256": hash_api_key(config.api_key) if config.api_key else None,
        "rerank_k": config.rerank_k if config.rerank else 0,
        "verify": config.verify,
        # Searching in the ingress: the shards are opened there, with the searcher's share of CPUs.
        "local_shards": {"index_dir": store.index_dir, "verify": config.verify, "threads": plan.search_threads,
                         "batch_size": config.search_batch_size, "batch_wait_s": config.search_batch_wait_s}
        if local else None,
    }
    return Ingress.options(
        num_replicas=config.replicas,
        ray_actor_options={"num_cpus": plan.ingress_cpus + (plan.shard_cpus if local else 0.0)},
        logging_config={"enable_access_log": config.access_log},
        **common,
    ).bind(embedder, shards, index_info(store, config, plan), settings, verifier)


def app_builder(args: dict[str, Any]) -> "Application":
    """Entry point for `serve deploy` / `serve run` config files (`import_path:
    raysearch.serve.app:app_builder`); `args` are ServeConfig fields, `index_dir` required."""
    return build_app(ServeConfig.from_args(args))


def start_service(config: ServeConfig, address: str | None = None, direct_ingress: bool = False) -> "DeploymentHandle":
    """Start Serve's HTTP proxy on config.host:config.port (Ray started or joined first), deploy
    the application and wait until every replica is up. Returns the Ingress handle.

    direct_ingress: each Ingress replica also answers HTTP itself, on a port of its own (Ray Serve's
    direct ingress; `direct_urls` lists them), without the hop through the Serve proxy. A Ray that
    this call starts is started with it enabled; a running cluster must have been started with
    RAY_SERVE_ENABLE_DIRECT_INGRESS=1, else this raises (and removes the application it deployed).
    """
    from ray import serve

    prepare_ray(address, direct_ingress)
    logging_config = serve_logging()
    serve.start(http_options={"host": config.host, "port": config.port}, logging_config=logging_config)
    _check_http_address(config)
    handle = serve.run(build_app(config), name=config.app_name, route_prefix=config.route_prefix,
                       logging_config=logging_config)
    if direct_ingress and not direct_urls(config):
        serve.delete(config.app_name)
        raise ValueError(
            "this Ray cluster's Serve has no direct ingress: start the cluster with "
            f"{DIRECT_INGRESS_ENV}=1 in its environment (e.g. `{DIRECT_INGRESS_ENV}=1 ray start --head`), "
            "or serve without --direct-ingress"
        )
    return handle


def prepare_ray(address: str | None = None, direct_ingress: bool = False) -> None:
    """Start (or join) the Ray a service runs on; a Ray started here gets Serve's direct ingress
    enabled when it is asked for (Serve reads that setting when Ray starts)."""
    import ray

    from raysearch.runtime import ensure_ray

    if direct_ingress and not ray.is_initialized() and not (address or os.environ.get("RAY_ADDRESS")):
        enable_direct_ingress_env()
    ensure_ray(address)


def check_port_free(host: str, port: int) -> None:
    """Raise ValueError when something already listens on host:port (before any of Ray or Serve
    starts, so a busy port costs one line, not a failed deployment)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # As the HTTP server will bind: a port left in TIME_WAIT by a service just stopped is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e} (another service uses it? "
                             "choose another --port)") from None


def serve_logging() -> dict:
    """Serve's logging for a raysearch service: its INFO lines (replicas starting and stopping,
    one access line per request) only when raysearch logs verbosely (-v); warnings and errors
    always. Access logs stay in the session's logs/serve folder either way."""
    from raysearch.runtime import verbose_logging

    verbose = verbose_logging()
    if not verbose:
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    return {"log_level": "INFO" if verbose else "WARNING", "enable_access_log": verbose}


# Ray Serve reads these when its controller and replicas start (so: before Ray starts).
DIRECT_INGRESS_ENV = "RAY_SERVE_ENABLE_DIRECT_INGRESS"
# How long a stopping ingress replica keeps its own port open for load balancers (Serve: 30 s);
# a service started by raysearch stops in about a second unless the user asks for more.
DIRECT_DRAIN_ENV = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"
DIRECT_DRAIN_S = "1"


# Ray Serve's throughput-optimised mode: user code on the replica's own event loop (raysearch's
# deployments do their blocking work in threads), request logs buffered and kept out of stderr
# (they stay in the session's logs/serve folder), gRPC between deployments. Measured with
# benchmarks/serve_load.py --shards-in-ingress --direct-ingress: sequential p50 -1.1 to -1.9 ms,
# queries/s under 16 clients +12-17% (RESULTS.md).
THROUGHPUT_ENV = "RAY_SERVE_THROUGHPUT_OPTIMIZED"
# That mode also moves a handle's router onto the caller's event loop, which breaks handles used
# from plain (non-async) code such as this CLI's and the benchmarks': keep the router's own loop.
ROUTER_LOOP_ENV = "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP"


def enable_direct_ingress_env() -> None:
    """Environment for a Ray about to be started here, with Serve's direct ingress on, in
    throughput-optimised mode (a variable the user has set is left as it is)."""
    os.environ[DIRECT_INGRESS_ENV] = "1"
    os.environ.setdefault(DIRECT_DRAIN_ENV, DIRECT_DRAIN_S)
    os.environ.setdefault(THROUGHPUT_ENV, "1")
    os.environ.setdefault(ROUTER_LOOP_ENV, "1")


def direct_urls(config: ServeConfig, wait_s: float = 5.0) -> list[str]:
    """The URLs at which the Ingress replicas of `config.app_name` answer directly (direct
    ingress), one per replica; [] when Serve routes everything through its proxies.

    Reads the Serve controller's target groups (what a load balancer in front of the replicas
    would read); waits up to `wait_s` for replicas that are still opening their ports.
    """
    import ray
    from ray.serve.context import _get_global_client

    controller = _get_global_client()._controller
    if not hasattr(controller, "get_target_groups"):  # a Ray without direct ingress
        return []
    deadline = time.monotonic() + wait_s
    while True:
        groups = ray.get(controller.get_target_groups.remote(config.app_name))
        targets = [t for g in groups if str(getattr(g.protocol, "value", g.protocol)).upper() == "HTTP"
                   for t in g.targets if str(t.name).startswith("SERVE_REPLICA::")]
        if targets or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    urls = []
    for t in sorted(targets, key=lambda t: (t.ip, t.port)):
        # Replicas bind config.host: loopback stays loopback; a wildcard is reached at the node's IP.
        host = t.ip if config.host in ("0.0.0.0", "::", "") else config.host
        urls.append(_url(host, int(t.port), config.route_prefix))
    return urls


def _check_http_address(config: ServeConfig) -> None:
    """Serve keeps one HTTP address per Ray cluster; refuse to pretend we listen elsewhere."""
    try:
        from ray.serve.context import _get_global_client

        current = _get_global_client().http_config
    except Exception:  # noqa: BLE001 - private API: skip the check rather than fail
        return
    if (current.host, current.port) != (config.host, config.port):
        raise ValueError(
            f"Ray Serve already runs on this Ray cluster at {current.host}:{current.port}; "
            f"it cannot also listen on {config.host}:{config.port} (use --port {current.port}, "
            "or stop it with `serve shutdown`)"
        )


def service_url(config: ServeConfig) -> str:
    """The service's address through the Serve proxy (what `raysearch serve` prints)."""
    return _url(config.host, config.port, config.route_prefix)


def _url(host: str, port: int, route_prefix: str) -> str:
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{port}{route_prefix.rstrip('/')}"


__all__ = ["app_builder", "build_app", "direct_urls", "index_info", "service_url", "start_service"]
