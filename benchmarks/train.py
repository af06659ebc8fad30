"""Does training pay? `raysearch train --objective copy` on photographs of one group for a fixed
budget, then copy detection on a set cut from photographs of another group: the built-in model and
the trained one, same index type, same queries, same run.

Method:
- training images: benchmarks/photos.py's "train" group (Debian wallpaper and artwork packages),
  written as JPEGs; `raysearch train` (Ray Train, this machine's CPUs) with the settings below,
  stopped by --max-time;
- judging set: `raysearch.datasets.copyset` cut from the "judge" group (scikit-image's
  photographs, lomiri-wallpapers-20.04, two visp pictures): separated crops as references, edited
  copies of some of them and edited crops of held-out photographs as queries (half without a
  match), every edit of the suite; DISC21-format ground truth;
- for each model: `raysearch build` of the references (--index, Flat by default), `raysearch eval
  copy` of the queries: micro-AP, recall@1, recall at precision 0.9; the same with PCA-whitening
  learned on the references (--whiten), which calibrates scores across queries.

Neither group holds a photograph reserved for independent evaluation.

Usage:
  python benchmarks/train.py [--max-time 25m] [--input-size 160] [--references 600] [--queries 400]
      [--workdir DIR] [--train-args "--lr 3e-4 --koleo-weight 10 ..."]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def judge_set(work: str, n_refs: int, n_queries: int, seed: int):
    from photos import photographs

    from raysearch.datasets.copyset import CopySetConfig, write_copy_detection_set

    folder = os.path.join(work, "judge-set")
    config = CopySetConfig(n_references=n_refs, n_queries=n_queries, n_background=0, seed=seed,
                           negative_photos=4, background_photos=0, crop_fraction=(0.08, 0.3), min_side=64)
    marker = os.path.join(folder, "copyset.json")
    if os.path.exists(marker) and json.load(open(marker))["config"]["seed"] == seed:
        from raysearch.datasets.copyset import CopySet

        doc = json.load(open(marker))
        return CopySet(folder, os.path.join(folder, "references"), os.path.join(folder, "queries"),
                       os.path.join(folder, "background"), os.path.join(folder, "ground_truth.csv"),
                       sorted(doc["references"]), {q: v["edit"] for q, v in doc["queries"].items()},
                       {q: v["reference"] for q, v in doc["queries"].items()}, doc["photos"])
    return write_copy_detection_set(folder, config, photos=photographs("judge"))


def evaluate(cs, model: str | None, work: str, name: str, index: str, whiten: bool) -> dict:
    from raysearch.builder import build
    from raysearch.embed import EmbedConfig
    from raysearch.evaluate.copy import CopyEvalConfig, evaluate_copy_detection
    from raysearch.index.build import IndexConfig
    from raysearch.index.transforms import WhiteningConfig
    from raysearch.models.spec import ModelConfig

    out = os.path.join(work, f"index-{name}{'-whiten' if whiten else ''}")
    start = time.perf_counter()
    build(cs.references, out, EmbedConfig(model=ModelConfig(name=model) if model else ModelConfig(), progress=False),
          IndexConfig(factory=index, whitening=WhiteningConfig() if whiten else None), overwrite=True)
    built = time.perf_counter() - start
    report = evaluate_copy_detection(out, cs.queries, cs.ground_truth, CopyEvalConfig(k=10))
    m = report.metrics
    return {"model": name, "whiten": whiten, "micro_ap": m.average_precision, "recall_at_1": m.recall_at_rank1,
            "recall_at_p90": m.recall_at_p90, "build_seconds": round(built, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-time", default="25m", help="Training budget (raysearch train --max-time).")
    ap.add_argument("--epochs", type=int, default=1000, help="Upper bound; --max-time stops first.")
    ap.add_argument("--input-size", type=int, default=160)
    ap.add_argument("--train-args", default="", help="More `raysearch train` options, e.g. \"--lr 3e-4\".")
    ap.add_argument("--references", type=int, default=600)
    ap.add_argument("--queries", type=int, default=400)
    ap.add_argument("--index", default="Flat")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model-dir", default=None, help="Evaluate this trained model instead of training one.")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()

    from photos import photographs, write_photographs

    from raysearch.runtime import ensure_ray

    work = args.workdir or tempfile.mkdtemp(prefix="rs-bench-train-")
    os.makedirs(work, exist_ok=True)
    ensure_ray()
    cs = judge_set(work, args.references, args.queries, args.seed)
    n_copies = sum(1 for r in cs.query_reference.values() if r)
    print(f"judge set: {len(cs.reference_ids)} references, {len(cs.query_edits)} queries ({n_copies} copies) in {cs.folder}")

    model_dir = args.model_dir
    train_seconds = None
    if model_dir is None:
        train_dir = os.path.join(work, "train-photos")
        if not os.path.isdir(train_dir):
            write_photographs(photographs("train"), train_dir)
        model_dir = os.path.join(work, "model")
        command = [sys.executable, "-m", "raysearch", "train", train_dir, "--out", model_dir,
                   "--input-size", str(args.input_size), "--epochs", str(args.epochs), "--max-time", args.max_time,
                   "--seed", str(args.seed), *shlex.split(args.train_args)]
        print("$ " + " ".join(shlex.quote(c) for c in command[2:]))
        start = time.perf_counter()
        import subprocess

        subprocess.run(command, check=True)
        train_seconds = time.perf_counter() - start
    model_json = json.load(open(os.path.join(model_dir, "model.json")))
    training = model_json.get("training", {})

    rows = []
    for name, model in (("built-in", None), ("trained", model_dir)):
        for whiten in (False, True):
            rows.append(evaluate(cs, model, work, name, args.index, whiten))
            r = rows[-1]
            print(f"{name:9s} whiten={str(whiten):5s} micro-AP {r['micro_ap']:.3f}  recall@1 {r['recall_at_1']:.3f}  "
                  f"recall@P90 {r['recall_at_p90'] if r['recall_at_p90'] is not None else float('nan'):.3f}")
    base = {r["whiten"]: r["micro_ap"] for r in rows if r["model"] == "built-in"}
    for r in rows:
        if r["model"] == "trained":
            r["micro_ap_ratio"] = round(r["micro_ap"] / base[r["whiten"]], 3) if base[r["whiten"]] else None
    result = {"machine": platform.platform(), "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
              "args": vars(args), "train_wall_seconds": train_seconds, "training": {
                  k: training.get(k) for k in ("steps", "seconds", "images_per_second", "epochs_completed", "final_loss")},
              "model_settings": model_json.get("settings"), "rows": rows}
    with open(os.path.join(work, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({r["model"] + ("+whiten" if r["whiten"] else ""): r.get("micro_ap_ratio") for r in rows if r["model"] == "trained"}))
    print(f"results: {os.path.join(work, 'results.json')}")


if __name__ == "__main__":
    main()
