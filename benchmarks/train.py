"""Does training pay? `raysearch train --objective copy` on photographs of one group for a fixed
budget, then copy detection on sets cut from photographs of other sources: the built-in model and
the trained one, same index type, same queries, same run.

Method:
- training images: benchmarks/photos.py's "train" group (Debian wallpaper and artwork packages;
  `--photos train-wide` adds gcompris-qt-data's photographs of monuments, animals and paintings),
  less the --holdout packages, cut into --train-crops separated crops per photograph (at most 10% of the smaller crop shared
  by two crops, sides 6-30% of the photograph's), written as JPEGs: each crop is one training
  image, whose views are its positives and every other crop a negative. Near-copies among the
  photographs (the same picture at two sizes) are left out first (--distinct). The 139 whole
  photographs as training images gave 139 instances, too few: the descriptor they taught was no
  better than the built-in one (RESULTS.md, 2026-12-01). `--train-crops 0` trains on the whole
  photographs. `raysearch train` (Ray Train, this machine's CPUs) with the settings below,
  stopped by --max-time;
- judging sets, each `raysearch.datasets.copyset` (separated crops as references, edited copies
  of some of them and edited crops of other photographs as queries, half without a match, every
  edit of the suite; DISC21-format ground truth):
  - "judge": cut from the "judge" group (scikit-image's photographs, lomiri-wallpapers-20.04, two
    visp pictures): other kinds of pictures than the training ones (textures, microscopy,
    astronomy, portraits): does the descriptor carry over to other domains?
  - "held-out" (with --holdout PKG,...): cut from those packages of the train group, which are
    then left out of training, e.g. lomiri-wallpapers-16.04's 15 photographs. Beware packages
    that ship one picture at several sizes (sway-backgrounds, desktop-base's themes): their
    copies would be counted as different pictures;
- for each model: `raysearch build` of the references (--index, Flat by default), `raysearch eval
  copy` of the queries: micro-AP, recall@1, recall at precision 0.9; the same with PCA-whitening
  learned on the references (--whiten), which calibrates scores across queries.

Neither group holds a photograph reserved for independent evaluation.

Usage:
  python benchmarks/train.py [--max-time 25m] [--input-size 160] [--references 600] [--queries 400]
      [--train-crops 25] [--holdout PKG,PKG] [--workdir DIR] [--train-args "--lr 3e-4 --koleo-weight 10 ..."]
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




def split_train_group(holdout: list[str], group: str = "train"):
    """(training photographs, held-out photographs): the photographs of `group` ('train' or
    'train-wide') split by package."""
    from photos import RESOURCE_PACKAGES, TRAIN_PACKAGES, photographs

    packages = TRAIN_PACKAGES + (RESOURCE_PACKAGES if group == "train-wide" else ())
    unknown = [p for p in holdout if p not in packages]
    if unknown:
        raise SystemExit(f"error: --holdout {unknown}: not packages of the {group} group {packages}")
    photos = photographs(group)
    held = {k: v for k, v in photos.items() if k.split("/", 1)[0] in holdout}
    return {k: v for k, v in photos.items() if k not in held}, held


def judge_set(work: str, n_refs: int, n_queries: int, seed: int, name: str = "judge", photos=None):
    from photos import photographs

    from raysearch.datasets.copyset import CopySetConfig, write_copy_detection_set

    folder = os.path.join(work, f"{name}-set")
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
    return write_copy_detection_set(folder, config, photos=photographs("judge") if photos is None else photos)


def distinct_photographs(photos: dict, threshold: float) -> dict:
    """The photographs with their near-copies left out: greedily, in name order, a photograph is
    kept unless the built-in descriptor of its whole picture has cosine >= `threshold` with one
    already kept.

    The train group ships many pictures several times (a theme's background at 4:3 and 16:9, the
    same logo in five themes): of its 139 pictures, 91 remain at cosine 0.95 and 81 at 0.9. Left
    in, the crops of two copies of one picture are each other's negatives, which teaches the
    descriptor the opposite of what copy detection needs.
    """
    import numpy as np

    from raysearch.images import resize_image
    from raysearch.models.embedder import Embedder
    from raysearch.models.registry import resolve_model
    from raysearch.models.spec import ModelConfig

    spec = resolve_model(ModelConfig())
    embedder = Embedder(spec.to_dict(), device="cpu")
    names = sorted(photos)
    pixels = np.stack([resize_image(photos[n], spec.input_size, spec.resize) for n in names])
    x = np.concatenate([embedder.embed_pixels(pixels[i:i + 32]) for i in range(0, len(pixels), 32)])
    kept: list[int] = []
    for i in range(len(names)):
        if not kept or float((x[kept] @ x[i]).max()) < threshold:
            kept.append(i)
    return {names[i]: photos[names[i]] for i in kept}


def training_crops(folder: str, photos: dict, per_photo: int, seed: int) -> int:
    """Write separated crops of `photos` into `folder` (once); returns the count."""
    import numpy as np
    from PIL import Image

    from raysearch.datasets.copyset import separate_crops

    marker = os.path.join(folder, ".complete")
    if os.path.exists(marker):
        return sum(1 for f in os.listdir(folder) if f.endswith(".jpg"))
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    n = 0
    for name, photo in sorted(photos.items()):
        stem = name.replace("/", "__")
        for left, top, right, bottom in separate_crops(photo, per_photo, rng, 0.1, 64, (0.06, 0.3), 8.0, tries=20000):
            Image.fromarray(photo[top:bottom, left:right]).save(os.path.join(folder, f"{stem}__{left}_{top}.jpg"), quality=92)
            n += 1
    open(marker, "w").close()
    return n


def evaluate(cs, model: str | None, work: str, name: str, index: str, whiten: bool, judged: str) -> dict:
    from raysearch.builder import build
    from raysearch.embed import EmbedConfig
    from raysearch.evaluate.copy import CopyEvalConfig, evaluate_copy_detection
    from raysearch.index.build import IndexConfig
    from raysearch.index.transforms import WhiteningConfig
    from raysearch.models.spec import ModelConfig

    out = os.path.join(work, f"index-{judged}-{name}{'-whiten' if whiten else ''}")
    start = time.perf_counter()
    build(cs.references, out, EmbedConfig(model=ModelConfig(name=model) if model else ModelConfig(), progress=False),
          IndexConfig(factory=index, whitening=WhiteningConfig() if whiten else None), overwrite=True)
    built = time.perf_counter() - start
    report = evaluate_copy_detection(out, cs.queries, cs.ground_truth, CopyEvalConfig(k=10))
    m = report.metrics
    return {"set": judged, "model": name, "whiten": whiten, "micro_ap": m.average_precision, "recall_at_1": m.recall_at_rank1,
            "recall_at_p90": m.recall_at_p90, "build_seconds": round(built, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-time", default="25m", help="Training budget (raysearch train --max-time).")
    ap.add_argument("--epochs", type=int, default=1000, help="Upper bound; --max-time stops first.")
    ap.add_argument("--input-size", type=int, default=160)
    ap.add_argument("--train-crops", type=int, default=25,
                    help="Separated crops per training photograph, each a training image (0: the whole photographs).")
    ap.add_argument("--photos", choices=("train", "train-wide"), default="train",
                    help="Training photographs: benchmarks/photos.py's group (train-wide adds gcompris-qt-data's).")
    ap.add_argument("--holdout", default="",
                    help="Packages of the train group kept out of training and judged on as a second set "
                         "(comma-separated), e.g. lomiri-wallpapers-16.04.")
    ap.add_argument("--distinct", type=float, default=0.9,
                    help="Leave out training photographs whose built-in descriptor has at least this cosine with "
                         "one kept (near-copies; 1: keep all).")
    ap.add_argument("--train-args", default="", help="More `raysearch train` options, e.g. \"--lr 3e-4\".")
    ap.add_argument("--references", type=int, default=600)
    ap.add_argument("--queries", type=int, default=400)
    ap.add_argument("--index", default="Flat")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model-dir", default=None, help="Evaluate this trained model instead of training one.")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()

    from photos import write_photographs

    from raysearch.runtime import ensure_ray

    work = args.workdir or tempfile.mkdtemp(prefix="rs-bench-train-")
    os.makedirs(work, exist_ok=True)
    ensure_ray()
    holdout = [p for p in args.holdout.split(",") if p.strip()]
    train_photos, held_photos = split_train_group(holdout, args.photos)
    sets = {"judge": judge_set(work, args.references, args.queries, args.seed)}
    if held_photos:
        sets["held-out"] = judge_set(work, args.references, args.queries, args.seed, "held-out", held_photos)
    for name, cs in sets.items():
        n_copies = sum(1 for r in cs.query_reference.values() if r)
        print(f"{name} set: {len(cs.reference_ids)} references, {len(cs.query_edits)} queries ({n_copies} copies) in {cs.folder}")

    model_dir = args.model_dir
    train_seconds = None
    if model_dir is None:
        suffix = "-wide" if args.photos == "train-wide" else ""
        suffix += "-without-" + "-".join(sorted(holdout)) if holdout else ""
        if args.distinct < 1:
            n_before = len(train_photos)
            train_photos = distinct_photographs(train_photos, args.distinct)
            print(f"training photographs: {len(train_photos)} of {n_before} distinct (cosine < {args.distinct})")
            suffix += f"-distinct{args.distinct:g}"
        if args.train_crops:
            train_dir = os.path.join(work, f"train-crops-{args.train_crops}{suffix}")
            n = training_crops(train_dir, train_photos, args.train_crops, args.seed)
            print(f"training images: {n} crops of {len(train_photos)} photographs in {train_dir}")
        else:
            train_dir = os.path.join(work, f"train-photos{suffix}")
            if not os.path.isdir(train_dir):
                write_photographs(train_photos, train_dir)
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
    for judged, cs in sets.items():
        for name, model in (("built-in", None), ("trained", model_dir)):
            for whiten in (False, True):
                rows.append(evaluate(cs, model, work, name, args.index, whiten, judged))
                r = rows[-1]
                print(f"{judged:8s} {name:9s} whiten={str(whiten):5s} micro-AP {r['micro_ap']:.3f}  "
                      f"recall@1 {r['recall_at_1']:.3f}  "
                      f"recall@P90 {r['recall_at_p90'] if r['recall_at_p90'] is not None else float('nan'):.3f}")
    base = {(r["set"], r["whiten"]): r["micro_ap"] for r in rows if r["model"] == "built-in"}
    for r in rows:
        if r["model"] == "trained":
            b = base[(r["set"], r["whiten"])]
            r["micro_ap_ratio"] = round(r["micro_ap"] / b, 3) if b else None
    result = {"machine": platform.platform(), "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
              "args": vars(args), "train_wall_seconds": train_seconds, "training": {
                  k: training.get(k) for k in ("steps", "seconds", "images_per_second", "epochs_completed", "final_loss")},
              "model_settings": model_json.get("settings"), "rows": rows}
    with open(os.path.join(work, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({f"{r['set']}: trained{'+whiten' if r['whiten'] else ''}": r.get("micro_ap_ratio")
                      for r in rows if r["model"] == "trained"}))
    print(f"results: {os.path.join(work, 'results.json')}")


if __name__ == "__main__":
    main()
