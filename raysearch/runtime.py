"""Connecting to Ray: an existing cluster when one is named (RAY_ADDRESS or --address), otherwise a
local one-machine cluster started on demand."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator
import re
import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass

log = logging.getLogger("raysearch")


def verbose_logging() -> bool:
    """Whether raysearch logs verbosely (`-v`: its INFO lines on): then Ray's, Ray Data's, Ray
    Train's and Ray Serve's own progress lines are shown too."""
    return log.isEnabledFor(logging.INFO)


def ensure_ray(address: str | None = None, num_cpus: int | None = None, training: bool = False) -> None:
    """Initialise Ray once per process. `address`: 'auto', 'ray://...' or host:port; None means
    RAY_ADDRESS if set, else start a local cluster. `training`: the job runs Ray Train, whose
    processes' own console lines are kept to errors unless logging is verbose (`quiet_training_worker`)."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    verbose = verbose_logging()
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
    hook = training_setup_hook(training, verbose, os.environ)
    if hook:
        kwargs.setdefault("runtime_env", {})["worker_process_setup_hook"] = hook
    # Ray installs a native handler of fatal signals that also takes SIGTERM (it prints a stack and
    # aborts); a handler the program set up itself (the CLI's: stop cleanly) is put back.
    own = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    ray.init(address=address, **kwargs)
    if callable(own):
        signal.signal(signal.SIGTERM, own)


# Set in a driver whose job was submitted with a worker setup hook of its own (ray job submit
# --runtime-env-json); Ray refuses a second hook for the job.
RAY_SETUP_HOOK_ENV = "__RAY_WORKER_PROCESS_SETUP_HOOK_ENV_VAR"


def training_setup_hook(training: bool, verbose: bool, environ) -> str | None:
    """The worker setup hook `ensure_ray` gives a job: `quiet_training_worker` for a training job
    that does not log verbosely, unless the job already has a hook of its own; else None."""
    if not training or verbose or environ.get(RAY_SETUP_HOOK_ENV):
        return None
    return f"{__name__}.quiet_training_worker"


def quiet_training_worker() -> None:
    """Worker process setup of a training job (`ensure_ray(training=True)`): Ray Data's loggers and
    Ray Train's placement-group cleaner in the job's processes log errors only (Ray Train's own
    system log files keep every level).

    Seen on a 3-epoch `raysearch train` on one machine: without it the console showed over 40 lines
    of Ray's beside raysearch's 9, among them one a second from Ray Train's placement-group
    cleaner, which asks the State API about the controller and warns while the dashboard (which
    serves that API, and which raysearch does not start) is absent. Ray Train's own INFO lines are
    kept off by the run's LoggingConfig (`raysearch.train.run`)."""
    import warnings

    import ray.data  # noqa: F401 - sets up Ray Data's loggers (every process of a training job imports it)

    logging.getLogger("ray.data").setLevel(logging.ERROR)
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
    try:  # "Reporting training result ..." per worker and checkpoint, from a logger named by its file
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:
        pass
    else:
        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    # Ray Train sets a Ray Data option that Ray Data itself reports as deprecated.
    warnings.filterwarnings("ignore", message=".*exclude_resources.* is deprecated")


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


# CPU model actors run one torch thread each up to this many actors: on 2 shared cores one
# EfficientNet-Lite0 process ran 31.5 img/s on 1 thread and 17.5 img/s on 2 (other programs' load
# stalls OpenMP's barriers), so separate one-thread processes scale better than threads; beyond
# it, threads grow instead, which bounds the model copies in memory (one each).
MAX_CPU_ACTORS = 16


def model_actor_resources(gpus: float, cpus: float, concurrency: int | None = None,
                          gpus_per_actor: float | None = None, threads: int | None = None,
                          model_share: float | None = None) -> ActorResources:
    """Resources of the actors that run a model (embedding, activation) on a cluster with `gpus`
    GPUs and `cpus` CPUs.

    Parameters
    ----------
    gpus, cpus : the cluster's.
    concurrency, gpus_per_actor, threads : the user's choices (None: chosen here).
    model_share : the share of the CPUs the model should take, from the measured CPU cost per
        image of decoding and of the model (`raysearch.embed.StageCosts`); None: the fixed rule.

    Returns
    -------
    ActorResources
        With GPUs (unless gpus_per_actor is 0): one GPU each, one CPU reserved. On CPUs with a
        `model_share`: actors of one thread (more threads each past MAX_CPU_ACTORS actors) that
        together reserve that share of the CPUs, each at most one CPU (so that a replacement
        actor fits beside it after a node loss). Without one: one actor per 4 CPUs, each
        reserving one CPU, torch using the actor's share of the machine.
    """
    if gpus >= 1 and gpus_per_actor != 0:
        per = gpus_per_actor or 1.0
        return ActorResources(concurrency or max(1, int(gpus / per)), per, 1, threads)
    if model_share is None:
        concurrency = concurrency or max(1, int(cpus // 4))
        return ActorResources(concurrency, 0, 1, threads or max(1, int(cpus // concurrency)))
    if not 0.0 < model_share <= 1.0:
        raise ValueError(f"model_share must be in (0, 1], got {model_share}")
    # Leave decoding at least 5% of the CPUs: with none, no decode task could ever be scheduled.
    model_cpus = cpus * min(model_share, 0.95)
    if concurrency is None:
        threads = threads or max(1, math.ceil(model_cpus / MAX_CPU_ACTORS))
        concurrency = max(1, round(model_cpus / threads))
    else:
        threads = threads or max(1, round(model_cpus / concurrency))
    # Whole hundredths, rounded down: Ray keeps fractions to 4 places, and the sum must fit.
    reserve = min(1.0, max(0.01, math.floor(100 * model_cpus / concurrency) / 100))
    return ActorResources(concurrency, 0, reserve, threads)


def configure_data_context(progress: bool = True) -> None:
    """Ray Data settings raysearch relies on: no per-operator progress bars or stats dumps of its
    own (raysearch draws one bar per step, `raysearch.progress`), unless logging is verbose."""
    import ray.data

    verbose = verbose_logging()
    if not verbose:
        # Ray Data logs every execution at INFO; keep the terminal for progress bars and results.
        logging.getLogger("ray.data").setLevel(logging.ERROR)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress and verbose
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


# Lines that Ray's and FAISS's native code write straight to stderr, below Python's logging: Ray's
# C++ log lines (e.g. core_worker.cc's note on every Ray Data actor pool that its constructor
# arguments sit in the object store), the raylet's and Ray's log-deduplication notes, INFO lines
# forwarded from Ray workers, and FAISS's one warning per k-means with few points per centroid.
NATIVE_NOISE = re.compile(
    r"^(\x1b\[[0-9;]*m)*(\([^)]*\)(\x1b\[[0-9;]*m)*\s+)?("
    r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [IWE] \d+ \d+\] \S+\.cc:\d+:"
    r"|WARNING clustering \d+ points to \d+ centroids"
    r"|INFO \d{4}-\d\d-\d\d "
    r"|Task \S+ failed\. There are (infinite|\d+) retries remaining"
    r"|\[repeated \d+x across cluster\]"
    r")"
)


def quiet_native_output(drop: re.Pattern = NATIVE_NOISE) -> None:
    """Keep Ray's and FAISS's native log lines (NATIVE_NOISE) off this process's stderr and stdout
    for the rest of its life; everything else passes through unchanged, in order.

    Each of file descriptors 1 and 2 is replaced by a pipe read by a thread that drops the matching
    lines; partial lines (a progress bar's carriage returns) pass through as they come. At exit the
    pipes are drained before the process ends. For command-line runs only (`raysearch` without -v):
    a test process must keep its own descriptors.
    """
    import atexit

    threads = []
    for fd, stream in ((1, sys.stdout), (2, sys.stderr)):
        stream.flush()
        real = os.dup(fd)
        read_end, write_end = os.pipe()
        os.dup2(write_end, fd)
        os.close(write_end)
        thread = threading.Thread(target=_forward, args=(read_end, real, drop), name=f"raysearch-fd{fd}", daemon=True)
        thread.start()
        threads.append((fd, stream, real, thread))

    def drain() -> None:
        for fd, stream, real, thread in threads:
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
            os.dup2(real, fd)      # closes our end of the pipe: the thread reads to its end
            thread.join(timeout=2.0)

    atexit.register(drain)


def _forward(read_end: int, real: int, drop: re.Pattern) -> None:
    pending = b""
    with os.fdopen(read_end, "rb", buffering=0) as pipe:
        while chunk := pipe.read(65536):
            pending += chunk
            lines = pending.split(b"\n")
            pending = lines.pop()
            out = [line + b"\n" for line in lines if not drop.search(line.decode("utf-8", "replace"))]
            if b"\r" in pending:   # a progress bar redrawing its line: show it now
                out.append(pending)
                pending = b""
            if out:
                os.write(real, b"".join(out))
        if pending and not drop.search(pending.decode("utf-8", "replace")):
            os.write(real, pending)
