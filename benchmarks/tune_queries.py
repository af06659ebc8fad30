"""Does the tuned nprobe keep its recall for real queries? Edited copies of indexed photographs,
searched at the nprobe that tuning chose, against exact search.

Method: --references random crops of the photographs of benchmarks/photos.py's "train" group (no
photograph reserved for independent evaluation), embedded with the built-in model; --queries of
them are edited (every edit of raysearch.edits in turn) and embedded the same way. For each IVF
factory the index is built twice from the same embeddings, in the same run: tuned on indexed
vectors with their own id left out (`tune_with="database"`, raysearch before this measure) and on
perturbed copies of indexed vectors (`tune_with="perturbed"`, the default). Reported per build: the
tuned nprobe, the recall@10 tuning measured, and the recall@10 of the edited copies at that nprobe
(their true top-10 from an exact scan), with the median cosine of an edited copy to its original.

Usage:
  python benchmarks/tune_queries.py [--references 1500] [--queries 300] [--factories IVF32,Flat IVF64,Flat]
      [--target 0.95] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def embed_set(work: str, n_refs: int, n_queries: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reference and edited-query vectors (cached in `work`), and which reference each query copies."""
    path = os.path.join(work, f"vectors-{n_refs}-{n_queries}-{seed}.npz")
    if os.path.exists(path):
        data = np.load(path)
        return data["xb"], data["xq"], data["source"]
    import torch
    from PIL import Image

    from photos import photographs
    from raysearch.edits import EDITS, apply_edit
    from raysearch.images import resize_image
    from raysearch.models.embedder import Embedder
    from raysearch.models.registry import ModelConfig, resolve_model
    from raysearch.samples import random_crop_box

    torch.set_num_threads(os.cpu_count() or 2)
    rng = np.random.default_rng(seed)
    photos = list(photographs("train").values())
    refs = []
    for i in range(n_refs):
        p = photos[i % len(photos)]
        left, top, right, bottom = random_crop_box(p.shape[0], p.shape[1], rng, 0.2, 0.7)
        refs.append(p[top:bottom, left:right])
    source = rng.choice(n_refs, n_queries, replace=False)
    edits = list(EDITS)
    queries = [np.asarray(apply_edit(edits[j % len(edits)], Image.fromarray(refs[i]), seed=j).convert("RGB"))
               for j, i in enumerate(source)]
    spec = resolve_model(ModelConfig())
    embedder = Embedder(spec.to_dict())

    def embed(images):
        return np.concatenate([
            embedder.embed_pixels(np.stack([resize_image(a, spec.input_size, spec.resize) for a in images[k:k + 32]]))
            for k in range(0, len(images), 32)
        ])

    xb, xq = embed(refs), embed(queries)
    np.savez(path, xb=xb, xq=xq, source=source)
    return xb, xq, source


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--references", type=int, default=1500)
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--factories", nargs="+", default=["IVF32,Flat", "IVF64,Flat"])
    ap.add_argument("--target", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()

    from raysearch.formats.embeddings import write_embeddings
    from raysearch.index.build import IndexConfig, build_index
    from raysearch.index.exact import exact_knn
    from raysearch.index.tune import recall_at_k
    from raysearch.models.registry import ModelConfig, resolve_model
    from raysearch.search import Searcher

    work = args.workdir or tempfile.mkdtemp(prefix="rs-bench-tune-")
    os.makedirs(work, exist_ok=True)
    start = time.perf_counter()
    xb, xq, source = embed_set(work, args.references, args.queries, args.seed)
    print(f"{len(xb)} references, {len(xq)} edited copies embedded ({time.perf_counter() - start:.0f} s)")
    cosine = float(np.median((xq * xb[source]).sum(axis=1)))
    print(f"median cosine of an edited copy to its original: {cosine:.3f}")
    emb = os.path.join(work, "embeddings")
    if not os.path.exists(os.path.join(emb, "embeddings.json")):
        write_embeddings(emb, xb, resolve_model(ModelConfig()), part_rows=500)
    _, truth = exact_knn(xq, [(xb, np.arange(len(xb)))], 10)
    rows = []
    print(f"{'factory':14s} {'tuned on':10s} {'nprobe':>6s} {'tuned recall':>12s} {'copies recall@10':>17s}")
    for factory in args.factories:
        for kind in ("database", "perturbed"):
            out = os.path.join(work, f"index-{factory.replace(',', '_')}-{kind}")
            manifest = build_index(emb, out, IndexConfig(factory=factory, target_recall=args.target, tune_with=kind))
            search = manifest["search"]
            found = Searcher(out).search(xq, 10).ids
            row = {"factory": factory, "tuned_with": kind, "nprobe": search["nprobe"],
                   "tuned_recall": search["recall_at_k"], "copies_recall_at_10": round(recall_at_k(found, truth), 4)}
            rows.append(row)
            print(f"{factory:14s} {kind:10s} {row['nprobe']:6d} {row['tuned_recall']:12.3f} {row['copies_recall_at_10']:17.3f}")
    result = {"machine": platform.platform(), "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
              "target": args.target, "median_copy_cosine": cosine, "rows": rows}
    with open(os.path.join(work, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"results: {os.path.join(work, 'results.json')}")


if __name__ == "__main__":
    main()
