"""What the Ray Job entrypoints share: options, stages that time themselves, a results file.

A job writes everything next to its index, under OUT (local or s3://):

    OUT/index/          the index directory (embeddings inside)
    OUT/results.json    per stage: seconds, figures (images/s, metrics), nodes used; rewritten
                        atomically after every stage, so a running or failed job shows how far it got
    OUT/work/           query embeddings made with Ray (kept: a rerun reuses them)
    OUT/...             predictions CSVs, activated images (per job)

Rerunning a job with the same OUT resumes it: a complete index is reused (an interrupted build
resumes from its embedded parts), and finished stages run again only where cheap (search and
metrics); `--overwrite` starts from scratch.
"""

from __future__ import annotations

import argparse
import logging
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from raysearch import __version__, storage

log = logging.getLogger("raysearch")

RESULTS_FILE = "results.json"


def add_common_arguments(ap: argparse.ArgumentParser, default_index: str = "auto") -> None:
    """Options every job takes: where, which model, which index, how much of the cluster."""
    ap.add_argument("--out", required=True, help="Output folder (local or s3://): index, results.json, predictions.")
    ap.add_argument("--model", default=None, help="Model name or torchscript:PATH (default: raysearch's default model).")
    ap.add_argument("--weights", default=None, help="Local weights file for resnet50_gem / resnet101_gem.")
    ap.add_argument("--input-size", type=int, default=None, help="Square input size in pixels (default: the model's).")
    ap.add_argument("--batch-size", type=int, default=32, help="Images per forward pass.")
    ap.add_argument("--concurrency", type=int, default=None, help="Embedder actors (default: one per GPU).")
    ap.add_argument("--index", default=default_index, help="FAISS factory string or 'auto'.")
    ap.add_argument("--max-index-memory", default="16G", help="Memory budget of the index for --index auto.")
    ap.add_argument("--shards", type=int, default=None, help="Index shards (default: one per 8 CPUs of the cluster, at least 1).")
    ap.add_argument("--target-recall", type=float, default=0.95, help="Recall@10 the tuned nprobe must reach.")
    ap.add_argument("--max-error-rate", type=float, default=0.05, help="Fail the build if more images than this cannot be used.")
    ap.add_argument("--address", default=None, help="Ray address (default: $RAY_ADDRESS, set by `ray job submit`; else a local Ray).")
    ap.add_argument("--overwrite", action="store_true", help="Start from scratch instead of resuming OUT.")
    ap.add_argument("--verbose", "-v", action="store_true")


class JobResults:
    """results.json of one job: a dict of stages, rewritten after each stage."""

    def __init__(self, out: str, job: str, args: argparse.Namespace):
        self.uri = storage.join(out, RESULTS_FILE)
        self.doc: dict[str, Any] = {
            "job": job,
            "raysearch_version": __version__,
            "args": {k: v for k, v in vars(args).items()},
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "status": "running",
            "cluster": cluster_info(),
            "stages": {},
        }
        self.save()

    def save(self) -> None:
        storage.atomic_write_json(self.uri, self.doc)

    @contextmanager
    def stage(self, name: str) -> Iterator[dict[str, Any]]:
        """Time a stage; what the body puts in the yielded dict is recorded with its seconds."""
        record: dict[str, Any] = {}
        start = time.perf_counter()
        log.info("stage %s", name)
        try:
            yield record
        except BaseException as e:
            record["error"] = f"{type(e).__name__}: {e}"
            self.doc["status"] = f"failed in {name}"
            raise
        finally:
            record["seconds"] = round(time.perf_counter() - start, 3)
            self.doc["stages"][name] = record
            self.save()

    def finish(self) -> dict[str, Any]:
        self.doc["status"] = "done"
        self.doc["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.doc["cluster_at_end"] = cluster_info()
        self.save()
        return self.doc


def cluster_info() -> dict[str, Any]:
    """Nodes, CPUs and GPUs of the Ray cluster this job runs on (Ray is started if needed)."""
    import ray

    from raysearch.runtime import ensure_ray

    ensure_ray()
    alive = [n for n in ray.nodes() if n.get("Alive")]
    resources = ray.cluster_resources()
    return {
        "nodes": len(alive),
        "node_ids": sorted(n["NodeID"] for n in alive),
        "cpus": float(resources.get("CPU", 0.0)),
        "gpus": float(resources.get("GPU", 0.0)),
        "gpu_types": sorted({k.split(":", 1)[1] for k in resources if k.startswith("accelerator_type:")}),
        "driver": platform.node(),
    }


def embed_config(args: argparse.Namespace):
    from raysearch.embed import EmbedConfig
    from raysearch.models.names import DEFAULT_MODEL
    from raysearch.models.spec import ModelConfig

    model = ModelConfig(name=args.model or DEFAULT_MODEL, weights=args.weights, input_size=args.input_size)
    return EmbedConfig(model=model, batch_size=args.batch_size, concurrency=args.concurrency,
                       max_error_rate=args.max_error_rate, progress=False)


def index_config(args: argparse.Namespace, whitening=None):
    from raysearch.index.build import IndexConfig
    from raysearch.runtime import cluster_cpus

    shards = args.shards or max(1, int(cluster_cpus() // 8))
    return IndexConfig(factory=args.index, max_memory=args.max_index_memory, shards=shards,
                       target_recall=args.target_recall, whitening=whitening)


def index_is_complete(index_dir: str) -> bool:
    from raysearch.index.store import MANIFEST

    return storage.exists(storage.join(index_dir, MANIFEST))


def run_build(results: JobResults, source: str, index_dir: str, args: argparse.Namespace, whitening=None) -> dict:
    """Stage 'build': embed SOURCE and index it (reused when OUT already holds a complete index)."""
    from raysearch.builder import build
    from raysearch.index.store import read_manifest

    with results.stage("build") as rec:
        rec["source"] = source
        rec["index_dir"] = index_dir
        if index_is_complete(index_dir) and not args.overwrite:
            manifest = read_manifest(index_dir)
            rec["reused"] = True
        else:
            result = build(source, index_dir, embed_config(args), index_config(args, whitening), overwrite=args.overwrite)
            s = result.embed
            manifest = result.manifest
            rec.update({
                "n_images": s.n_images, "n_embedded": s.n_embedded, "n_errors": s.n_errors,
                "n_resumed": s.n_skipped, "embed_seconds": round(s.seconds, 3),
                "images_per_second": round(s.images_per_second, 2),
                "nodes": s.nodes,
            })
        rec.update({
            "factory": manifest.get("factory"), "factory_reason": manifest.get("factory_reason"),
            "n_vectors": manifest.get("n_vectors"), "shards": len(manifest.get("shards", [])),
            "index_timings": manifest.get("timings", {}), "index_bytes": index_bytes(manifest),
        })
    return manifest


def index_bytes(manifest: dict) -> int:
    """Bytes of the index files (trained index, shards, id maps) the manifest lists."""
    return int(sum(int(f.get("size", 0)) for f in manifest.get("files", {}).values()))


def choose_nprobe(rows: list[dict[str, Any]], target_recall: float, k: int = 10) -> tuple[int | None, float | None]:
    """The smallest swept nprobe whose recall@k reaches `target_recall` (else the best one).
    rows: `evaluate_ann` rows. Returns (nprobe, its recall)."""
    key = f"recall@{k}"
    usable = [r for r in rows if r.get(key) is not None and r.get("nprobe") is not None]
    if not usable:
        return None, None
    usable.sort(key=lambda r: r["nprobe"])
    for r in usable:
        if r[key] >= target_recall:
            return int(r["nprobe"]), float(r[key])
    best = max(usable, key=lambda r: (r[key], -r["nprobe"]))
    return int(best["nprobe"]), float(best[key])


def run_tune(results: JobResults, index_dir: str, args: argparse.Namespace, n_queries: int = 1000) -> int | None:
    """Stage 'tune': the nprobe the evaluations use. An index whose build tuned nprobe keeps it;
    otherwise recall@10 against exact search is measured over an nprobe sweep (`raysearch eval
    ann`) and the smallest nprobe reaching --target-recall is chosen. None for exact indexes."""
    from raysearch.evaluate.ann import AnnEvalConfig, evaluate_ann
    from raysearch.index.store import read_manifest

    with results.stage("tune") as rec:
        manifest = read_manifest(index_dir)
        search = manifest.get("search", {})
        if search.get("tuned"):
            rec.update({"nprobe": search.get("nprobe"), "source": "tuned by the build", **{
                k: v for k, v in search.items() if k not in ("nprobe",)}})
            return search.get("nprobe")
        factory = str(manifest.get("factory", ""))
        if "IVF" not in factory and "HNSW" not in factory:
            rec.update({"nprobe": None, "source": f"{factory} searches exhaustively: nothing to tune"})
            return None
        report = evaluate_ann(index_dir, AnnEvalConfig(n_queries=min(n_queries, int(manifest["n_vectors"])), ks=(1, 10)))
        nprobe, recall = choose_nprobe(report.rows, args.target_recall)
        rec.update({"nprobe": nprobe, "recall@10": recall, "source": "sweep", "target_recall": args.target_recall,
                    "sweep": report.rows, "factory": report.factory})
        return nprobe


def setup(args: argparse.Namespace) -> None:
    from raysearch.cli.common import setup_logging
    from raysearch.runtime import ensure_ray

    setup_logging(args.verbose)
    logging.getLogger("raysearch").setLevel(logging.INFO)
    ensure_ray(args.address)
    storage.makedirs(args.out)
