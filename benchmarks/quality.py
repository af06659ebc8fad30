"""Retrieval quality of raysearch's options on a copy-detection set cut from real photographs.

The set (raysearch.datasets.copyset, DISC21 format): references are crops of scikit-image's
photographs that overlap by at most 5% of the smaller crop, so a copy of one reference shows
content no other reference holds and the single-reference ground truth is well defined;
queries are edited copies of references (every edit of the suite, combinations included) and
edited crops of photographs no reference comes from (non-matching queries, empty reference);
the score-normalisation background is crops of a third, disjoint group of photographs.

Every row is scored by raysearch's ISC2021 metrics (micro-AP over pooled predictions, ties
pessimistic; recall@1; recall@10; recall at precision 0.9) on k=10 predictions per query. The
baseline row, the default model over an exact (Flat) index, is computed in the same run:

  default                     efficientnet_lite0_gem, Flat
  + whitening (refs)          PCA-whitening learned on the indexed references
  + whitening (background)    PCA-whitening learned on the background set (as SSCD does)
  + multi-scale               scales 1, 1/sqrt2, 1/2 combined by GeM
  + score norm                score -= beta * mean top-3 similarity to the background
  + alpha-QE                  query expansion with the top --qe-k results, weights s**alpha
  + DBA                       database vectors averaged with their --dba-k neighbours
  + DBA + alpha-QE
  stack ...                   the options added one after another on the multi-scale model (with the
                              whitening learned on the references)
  auto index / IVF-Flat / IVF-SQ8 / IVF-PQ   index types on the default model (PQ only when the
                              collection has enough vectors to train 8-bit codebooks)

Costs are printed beside: embedding images/s per model, extra build seconds, search ms/query.

Usage:
  python benchmarks/quality.py --references 200 --queries 400 --background 150 [--seed 0]
      [--qe-k 2] [--dba-k 2] [--alpha 3] [--beta 1] [--whiten-shrinkage 0.1] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from collections import defaultdict


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--references", type=int, default=200)
    ap.add_argument("--queries", type=int, default=400)
    ap.add_argument("--background", type=int, default=150)
    ap.add_argument("--negative-photos", type=int, default=3, help="photographs kept for non-matching queries")
    ap.add_argument("--background-photos", type=int, default=3, help="photographs kept for the background set")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--qe-k", type=int, default=2)
    ap.add_argument("--dba-k", type=int, default=2)
    ap.add_argument("--alpha", type=float, default=3.0)
    ap.add_argument("--beta", type=float, default=1.0)
    ap.add_argument("--whiten-shrinkage", type=float, default=0.1)
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--workdir", default=None, help="keep the set, indexes and results.json here")
    args = ap.parse_args()

    from raysearch.builder import build, index_embeddings
    from raysearch.embed import EmbedConfig
    from raysearch.datasets.copyset import CopySetConfig, write_copy_detection_set
    from raysearch.evaluate.copy import CopyEvalConfig, evaluate_copy_detection
    from raysearch.evaluate.queries import embed_images
    from raysearch.index import factory as fac
    from raysearch.index.build import IndexConfig
    from raysearch.models import ModelConfig
    from raysearch.index.transforms import WhiteningConfig
    from raysearch.index.expansion import DatabaseAugmentation, QueryExpansion
    from raysearch.runtime import ensure_ray
    from raysearch.search import Searcher

    work = args.workdir or tempfile.mkdtemp(prefix="rs-bench-quality-")
    shutil.rmtree(os.path.join(work, "set"), ignore_errors=True)
    cs = write_copy_detection_set(os.path.join(work, "set"), CopySetConfig(
        n_references=args.references, n_queries=args.queries, n_background=args.background, seed=args.seed,
        negative_photos=args.negative_photos, background_photos=args.background_photos))
    n_refs = len(cs.reference_ids)
    n_pos = sum(1 for r in cs.query_reference.values() if r)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; python {platform.python_version()}")
    print(f"set: {n_refs} references (asked {args.references}) from {len(cs.photos['references'])} photographs, "
          f"{len(cs.query_reference)} queries ({n_pos} copies, {len(cs.query_reference) - n_pos} non-matching), "
          f"{args.background} background images; overlap between references <= 5%")
    ensure_ray(num_cpus=args.cpus)

    models = {"single": ModelConfig(), "multi": ModelConfig(scales=(1.0, 0.7071, 0.5))}
    bases: dict[str, str] = {}
    queries, background, cost = {}, {}, {}
    for tag, model in models.items():
        out = os.path.join(work, f"index-{tag}")
        result = build(cs.references, out, EmbedConfig(model=model, progress=False), IndexConfig(factory="Flat"),
                       overwrite=True)
        bases[tag] = out
        searcher = Searcher(out)
        start = time.perf_counter()
        queries[tag] = embed_images(cs.queries, searcher.store.model_spec, in_process_limit=10**9,
                                    embedder=searcher.embedder())
        background[tag] = embed_images(cs.background, searcher.store.model_spec, in_process_limit=10**9,
                                       embedder=searcher.embedder())
        seconds = time.perf_counter() - start
        cost[tag] = (len(queries[tag]) + len(background[tag])) / seconds
        print(f"model {tag}-scale: references embedded with Ray at {result.embed.images_per_second:.1f} img/s; "
              f"queries + background in-process at {cost[tag]:.1f} img/s")

    def variant(name: str, tag: str, config: IndexConfig, dba=None) -> tuple[str, float]:
        out = os.path.join(work, f"index-{name}")
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        index_embeddings(os.path.join(bases[tag], "embeddings"), out, config, dba=dba)
        return out, time.perf_counter() - start

    flat = IndexConfig(factory="Flat")
    w_refs = IndexConfig(factory="Flat", whitening=WhiteningConfig(shrinkage=args.whiten_shrinkage))
    w_bg = IndexConfig(factory="Flat", whitening=WhiteningConfig(source=cs.background, shrinkage=args.whiten_shrinkage))
    qe = QueryExpansion(args.qe_k, args.alpha)
    dba = DatabaseAugmentation(args.dba_k, args.alpha)

    built: dict[str, tuple[str, float]] = {"single": (bases["single"], 0.0), "multi": (bases["multi"], 0.0)}
    built["single-wrefs"] = variant("single-wrefs", "single", w_refs)
    built["single-wbg"] = variant("single-wbg", "single", w_bg)
    built["single-dba"] = variant("single-dba", "single", flat, dba)
    built["multi-wrefs"] = variant("multi-wrefs", "multi", w_refs)
    built["multi-wrefs-dba"] = variant("multi-wrefs-dba", "multi", w_refs, dba)
    choice = fac.choose_factory(n_refs, 1280)
    nlist = fac.nlist_for(n_refs)
    built["auto"] = variant("auto", "single", IndexConfig(factory="auto"))
    built["ivf-flat"] = variant("ivf-flat", "single", IndexConfig(factory=f"IVF{nlist},Flat"))
    built["ivf-sq8"] = variant("ivf-sq8", "single", IndexConfig(factory=f"IVF{nlist},SQ8"))
    if n_refs >= 256:
        built["ivf-pq"] = variant("ivf-pq", "single", IndexConfig(factory=f"IVF{nlist},PQ32"))

    rows = [
        ("default (Flat)", "single", "single", {}),
        ("+ whitening (refs)", "single-wrefs", "single", {}),
        ("+ whitening (background)", "single-wbg", "single", {}),
        ("+ multi-scale", "multi", "multi", {}),
        ("+ score norm", "single", "single", {"norm": True}),
        ("+ alpha-QE", "single", "single", {"qe": qe}),
        ("+ DBA", "single-dba", "single", {}),
        ("+ DBA + alpha-QE", "single-dba", "single", {"qe": qe}),
        ("stack: multi-scale + whitening (refs)", "multi-wrefs", "multi", {}),
        ("stack: ... + alpha-QE", "multi-wrefs", "multi", {"qe": qe}),
        ("stack: ... + score norm", "multi-wrefs", "multi", {"qe": qe, "norm": True}),
        ("stack: ... + DBA", "multi-wrefs-dba", "multi", {"qe": qe, "norm": True}),
        (f"auto index ({choice.factory})", "auto", "single", {}),
        (f"IVF{nlist},Flat", "ivf-flat", "single", {}),
        (f"IVF{nlist},SQ8", "ivf-sq8", "single", {}),
    ]
    if "ivf-pq" in built:
        rows.append((f"IVF{nlist},PQ32", "ivf-pq", "single", {}))

    results = []
    per_edit: dict[str, dict[str, float]] = {}
    header = f"{'configuration':40s} {'uAP':>7s} {'R@1':>7s} {'R@10':>7s} {'R@P90':>7s} {'build+s':>8s} {'ms/query':>9s}"
    print()
    print(header)
    print("-" * len(header))
    for label, index_key, tag, opts in rows:
        index_dir, extra_build = built[index_key]
        searcher = Searcher(index_dir)
        config = CopyEvalConfig(k=10, query_expansion=opts.get("qe", False), beta=args.beta)
        report = evaluate_copy_detection(searcher, queries[tag], cs.ground_truth, config,
                                         background=background[tag] if opts.get("norm") else None)
        m = report.metrics
        ms = 1000 * report.seconds["search"] / max(1, report.n_queries)
        r90 = "n/a" if m.recall_at_p90 is None else f"{m.recall_at_p90:.4f}"
        print(f"{label:40s} {m.average_precision:7.4f} {m.recall_at_rank1:7.4f} {m.recall_at_rank10:7.4f} "
              f"{r90:>7s} {extra_build:8.1f} {ms:9.3f}")
        results.append({"configuration": label, **m.summary(), "extra_build_seconds": extra_build,
                        "search_ms_per_query": ms, "factory": searcher.store.manifest["factory"]})
        if label in ("default (Flat)", "+ whitening (refs)", "stack: ... + alpha-QE"):
            top = defaultdict(list)
            best = {}
            for q, r, s in zip(report.predictions.query_ids, report.predictions.reference_ids, report.predictions.scores):
                if q not in best or s > best[q][1]:
                    best[q] = (r, s)
            for q, ref in cs.query_reference.items():
                if ref:
                    top[cs.query_edits[q]].append(best.get(q, ("", 0))[0] == ref)
            per_edit[label] = {e: sum(v) / len(v) for e, v in sorted(top.items())}
    print()
    print("recall@1 by edit (copies only):")
    edits = sorted(next(iter(per_edit.values())))
    print(f"{'edit':14s} " + " ".join(f"{lab[:22]:>22s}" for lab in per_edit))
    for e in edits:
        print(f"{e:14s} " + " ".join(f"{per_edit[lab].get(e, float('nan')):22.2f}" for lab in per_edit))
    print()
    print(f"embedding cost: multi-scale {cost['single'] / cost['multi']:.2f}x the single-scale time (in-process)")
    with open(os.path.join(work, "results.json"), "w") as f:
        json.dump({"set": {"references": n_refs, "queries": len(cs.query_reference), "copies": n_pos,
                           "background": args.background, "seed": args.seed},
                   "rows": results, "recall_at_1_by_edit": per_edit}, f, indent=1)
    if args.workdir:
        print(f"results: {os.path.join(work, 'results.json')}")
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
