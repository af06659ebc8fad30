"""Connecting to Ray: an existing cluster when one is named (RAY_ADDRESS or --address), otherwise a
local one-machine cluster started on demand."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

log = logging.getLogger("raysearch")


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Initialise Ray once per process. `address`: 'auto', 'ray://...' or host:port; None means
    RAY_ADDRESS if set, else start a local cluster."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    verbose = logging.getLogger("raysearch").isEnabledFor(logging.INFO)
    kwargs: dict = {
        "include_dashboard": False,
        "configure_logging": True,
        "logging_level": logging.INFO if verbose else logging.ERROR,
    }

    if address is None and num_cpus is not None:
        kwargs["num_cpus"] = num_cpus
        # Asking for a CPU count means a cluster of our own: without "local", ray.init() would join
        # any cluster `ray start` (or a test's ray.cluster_utils.Cluster) left on this machine.
        address = "local"
    # Ship the package's environment variables for S3 endpoints and credentials to every worker.
    env = {k: v for k, v in os.environ.items() if k.startswith(("AWS_", "FSSPEC_", "RAYSEARCH_"))}
    if env:
        kwargs["runtime_env"] = {"env_vars": env}
    ray.init(address=address, **kwargs)


def node_id() -> str | None:
    """The id of the Ray node this code runs on; None outside Ray. Recorded with the work a task
    or actor did, so a run can tell which nodes decoded, embedded and built what."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def cluster_gpus() -> float:
    """GPUs of the Ray cluster this process is connected to (0.0 without any); Ray must be
    initialised (`ensure_ray`)."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


def cluster_cpus() -> float:
    """CPUs of the Ray cluster this process is connected to (1.0 if Ray reports none); Ray must be
    initialised (`ensure_ray`)."""
    import ray

    return float(ray.cluster_resources().get("CPU", 1.0))


@dataclass(frozen=True)
class ActorResources:
    """What each model actor of a Ray Data stage reserves, and how many run."""

    concurrency: int
    num_gpus: float
    num_cpus: float
    threads: int | None   # torch threads per actor (None: torch's default)


def model_actor_resources(gpus: float, cpus: float, concurrency: int | None = None,
                          gpus_per_actor: float | None = None, threads: int | None = None) -> ActorResources:
    """Resources of the actors that run a model (embedding, activation) on a cluster with `gpus`
    GPUs and `cpus` CPUs: one GPU each when there are GPUs (unless gpus_per_actor is 0), else one
    actor per 4 CPUs. Each reserves one CPU, so decode tasks always get the rest, but torch uses the
    actor's share of the machine (on 2 cores: one actor with 2 threads, decode tasks overlapping)."""
    if gpus >= 1 and gpus_per_actor != 0:
        per = gpus_per_actor or 1.0
        return ActorResources(concurrency or max(1, int(gpus / per)), per, 1, threads)
    concurrency = concurrency or max(1, int(cpus // 4))
    return ActorResources(concurrency, 0, 1, threads or max(1, int(cpus // concurrency)))


def configure_data_context(progress: bool = True) -> None:
    """Ray Data settings raysearch relies on: progress bars, and no verbose per-op stats dumps."""
    import ray.data

    if not logging.getLogger("raysearch").isEnabledFor(logging.INFO):
        # Ray Data logs every execution at INFO; keep the terminal for progress bars and results.
        logging.getLogger("ray.data").setLevel(logging.ERROR)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    ctx.print_on_execution_start = False
    ctx.verbose_stats_logs = False


class Timer:
    """Collects named stage timings: `with timer("train"): ...`; `timer.seconds` maps name -> s."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.seconds[name] = self.seconds.get(name, 0.0) + elapsed
            log.info("%s took %.2f s", name, elapsed)


def available_memory() -> int:
    """Bytes of memory this machine can still give (MemAvailable; physical memory where unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
