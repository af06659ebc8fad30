"""ServeConfig: everything `raysearch serve` (or a `serve deploy` config file) decides about the service.

Pure data, no Ray: `build_app(config)` turns it into deployments.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

API_KEY_ENV = "RAYSEARCH_API_KEY"
DEFAULT_PORT = 8000
DEFAULT_APP_NAME = "raysearch"
MAX_NPROBE = 65536


@dataclass(frozen=True)
class ServeConfig:
    """How to serve one index directory. None means "chosen from the cluster's resources"."""

    index_dir: str
    host: str = "127.0.0.1"           # loopback only unless the user says otherwise
    port: int = DEFAULT_PORT
    app_name: str = DEFAULT_APP_NAME
    route_prefix: str = "/"
    replicas: int = 1                 # Ingress and QueryEmbedder replicas
    shard_replicas: int = 1           # replicas of each ShardSearcher
    api_key: str | None = field(default=None, repr=False)
    shard_timeout_s: float = 5.0      # a shard slower than this is reported missing ("partial")
    embed_timeout_s: float = 30.0
    max_body_bytes: int = 20 * 1024 * 1024
    max_queries: int = 64             # images or vectors in one request
    max_image_pixels: int = 40_000_000  # refused from the header, before decoding (memory bound)
    verify: bool = True               # check shard files against the manifest's checksums on load
    embed_batch_size: int = 16
    embed_batch_wait_s: float = 0.005  # a forward pass is worth waiting a few ms for company
    search_batch_size: int = 64
    # 0: no added latency; requests that queue while a FAISS call runs still form the next batch.
    search_batch_wait_s: float = 0.0
    max_ongoing_requests: int = 256   # per replica; high so that @serve.batch can form batches
    ingress_cpus: float | None = None
    embedder_cpus: float | None = None
    embedder_gpus: float | None = None  # None: one GPU per replica when the cluster has GPUs
    shard_cpus: float | None = None
    embed_threads: int | None = None
    search_threads: int | None = None
    health_check_period_s: float = 2.0  # how soon Serve notices (and replaces) a dead replica
    access_log: bool = True           # one log line per HTTP request (Ingress only)
    # Search every shard inside each Ingress replica (opened there) instead of one
    # ShardSearcher deployment per shard: one Ray hop less per query, for indexes one replica holds.
    shards_in_ingress: bool = False
    # Second stage (raysearch.rerank): "local" verifies each image query's top rerank_k with local
    # features and geometry in a LocalVerifier deployment after the shard merge.
    rerank: str | None = None
    rerank_k: int = 20
    # When the query's mirror image is matched too: "off", "fallback" (only for queries none of
    # whose candidates verified directly) or "always" (raysearch.verify.MIRROR_MODES).
    rerank_mirror: str = "fallback"
    verifier_replicas: int = 1
    verifier_cpus: float | None = None

    def __post_init__(self) -> None:
        if not self.index_dir:
            raise ValueError("INDEX_DIR must be given")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"--port must be between 1 and 65535, got {self.port}")
        if not self.host:
            raise ValueError("--host must not be empty")
        if not self.route_prefix.startswith("/"):
            raise ValueError(f"route_prefix must start with '/', got {self.route_prefix!r}")
        for name in ("replicas", "shard_replicas", "max_queries", "embed_batch_size", "search_batch_size",
                     "max_ongoing_requests", "max_body_bytes", "max_image_pixels", "verifier_replicas", "rerank_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("shard_timeout_s", "embed_timeout_s", "health_check_period_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("embed_batch_wait_s", "search_batch_wait_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.rerank is not None and self.rerank != "local":
            raise ValueError(f"--rerank must be 'local', got {self.rerank!r}")
        from raysearch.verify.verifier import mirror_mode

        object.__setattr__(self, "rerank_mirror", mirror_mode(self.rerank_mirror, "--rerank-mirror"))
        for name in ("ingress_cpus", "embedder_cpus", "embedder_gpus", "shard_cpus", "verifier_cpus"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        for name in ("embed_threads", "search_threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("--api-key must not be empty")

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> "ServeConfig":
        """From a `serve deploy` config file's `args`; unknown keys are refused by name. Without
        `api_key` in args, the key comes from $RAYSEARCH_API_KEY (keep secrets out of config files)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(args) - names)
        if unknown:
            raise ValueError(f"unknown raysearch serve settings {unknown}; known: {sorted(names)}")
        args = dict(args)
        if args.get("api_key") is None and os.environ.get(API_KEY_ENV):
            args["api_key"] = os.environ[API_KEY_ENV]
        return cls(**args)
