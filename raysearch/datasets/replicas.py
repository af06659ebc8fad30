"""Miniature replicas of DISC21 and GLDv2: tens of real photographs (scikit-image's) written in
the data sets' exact folder structure and CSV formats, to try a layout, a job or a cluster end to
end before pointing it at the real thing.

    python -m raysearch.datasets.replicas disc21 /tmp/disc21-mini
    python -m raysearch.datasets.replicas gldv2 /tmp/gldv2-mini

DISC21 replica: `references/R000000.jpg...` (separated crops of photographs), `dev_queries/Q00000.jpg...`
and `test_queries/Q50000.jpg...` (edited copies of references and edited crops of other
photographs), `train/T000000.jpg...` (crops of photographs neither references nor queries come
from), `dev_queries_groundtruth.csv` and `test_queries_groundtruth.csv` (query_id,reference_id, no
header, as Meta's files; empty reference = no match).

GLDv2 replica: every photograph is a "landmark". `index/a/b/c/<id>.jpg` holds crops of some
landmarks, `test/...` holds crops (some edited) of those landmarks (scored, Public or Private) and
of landmarks the index lacks (ignored: images "None", Usage "Ignored"), `train/...` crops with
their landmark ids; `index.csv`, `test.csv` (id), `train.csv` (id,url,landmark_id),
`index_image_to_landmark.csv` (id,landmark_id) and `retrieval_solution_v2.1.csv`
(id,images,Usage). Ids are 16 random hex characters.
"""

from __future__ import annotations

import csv
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass
class Disc21Replica:
    """A written DISC21 replica: its root, the reference ids, the dev and test ground truths and
    the train image ids."""

    root: str
    reference_ids: list[str]
    dev_ground_truth: dict[str, str]    # query id -> reference id ('' = no match)
    test_ground_truth: dict[str, str]
    train_ids: list[str]


def write_disc21_replica(root: str, n_references: int = 40, n_dev_queries: int = 16, n_test_queries: int = 8,
                         n_train: int = 10, seed: int = 0) -> Disc21Replica:
    """Write a DISC21 replica under `root` (see the module docstring)."""
    from raysearch.datasets.copyset import CopySetConfig, write_copy_detection_set

    os.makedirs(root, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="disc21-replica-") as tmp:
        cs = write_copy_detection_set(tmp, CopySetConfig(
            n_references=n_references, n_queries=n_dev_queries + n_test_queries, n_background=n_train,
            positive_share=0.5, seed=seed))
        shutil.copytree(cs.references, os.path.join(root, "references"), dirs_exist_ok=True)
        dev, test = {}, {}
        for split, folder in (("dev", "dev_queries"), ("test", "test_queries")):
            os.makedirs(os.path.join(root, folder), exist_ok=True)
        for i, q in enumerate(sorted(cs.query_reference)):
            if i < n_dev_queries:
                name, target, folder = f"Q{i:05d}", dev, "dev_queries"
            else:
                name, target, folder = f"Q{50000 + i - n_dev_queries:05d}", test, "test_queries"
            shutil.copyfile(os.path.join(cs.queries, q + ".jpg"), os.path.join(root, folder, name + ".jpg"))
            target[name] = cs.query_reference[q]
        os.makedirs(os.path.join(root, "train"), exist_ok=True)
        train_ids = []
        for i, name in enumerate(sorted(os.listdir(cs.background))):
            train_ids.append(f"T{i:06d}")
            shutil.copyfile(os.path.join(cs.background, name), os.path.join(root, "train", train_ids[-1] + ".jpg"))
    for name, gt in (("dev_queries_groundtruth.csv", dev), ("test_queries_groundtruth.csv", test)):
        with open(os.path.join(root, name), "w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            for q in sorted(gt):
                writer.writerow([q, gt[q]])
    return Disc21Replica(root, list(cs.reference_ids), dev, test, train_ids)


@dataclass
class Gldv2Replica:
    """A written GLDv2 replica: its root, the ids of its index, test and train images, the ground
    truth, and which scored test images are exact copies of an index image."""

    root: str
    index_ids: list[str]
    test_ids: list[str]
    train_ids: list[str]
    solution: dict[str, tuple[list[str], str]]   # test id -> (index ids or [] if ignored, Usage)
    copies: dict[str, str]                        # test id -> the index id it is an exact copy of


def _hex_ids(rng: np.random.Generator, n: int, taken: set[str]) -> list[str]:
    out = []
    while len(out) < n:
        image_id = "".join(rng.choice(list("0123456789abcdef"), size=16))
        if image_id not in taken:
            taken.add(image_id)
            out.append(image_id)
    return out


def _save_gldv2(root: str, split: str, image_id: str, arr: np.ndarray) -> None:
    from raysearch.sources.gldv2 import image_path

    path = image_path(os.path.join(root, split), image_id)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path, quality=90)


def write_gldv2_replica(root: str, n_index: int = 30, n_test: int = 12, n_train: int = 12, n_landmarks: int = 10,
                        seed: int = 0) -> Gldv2Replica:
    """Write a GLDv2 replica under `root` (see the module docstring). Index and scored test images
    come from the first `n_landmarks` photographs; ignored test images from others."""
    from raysearch.edits import apply_edit
    from raysearch.samples import random_crop_box, sample_photographs

    photos = sample_photographs()
    rng = np.random.default_rng(seed)
    names = [str(x) for x in rng.permutation(sorted(photos))]
    landmarks, others = names[:n_landmarks], names[n_landmarks:]
    if not others:
        raise ValueError(f"n_landmarks must leave photographs for ignored test images (at most {len(names) - 1})")
    taken: set[str] = set()

    def crop(name: str) -> np.ndarray:
        arr = photos[name]
        left, top, right, bottom = random_crop_box(arr.shape[0], arr.shape[1], rng, 0.4, 0.9)
        return np.ascontiguousarray(arr[top:bottom, left:right])

    index_ids = _hex_ids(rng, n_index, taken)
    index_landmark: dict[str, int] = {}
    index_arrays: dict[str, np.ndarray] = {}
    for i, image_id in enumerate(index_ids):
        lm = i % n_landmarks
        index_landmark[image_id] = lm
        index_arrays[image_id] = crop(landmarks[lm])
        _save_gldv2(root, "index", image_id, index_arrays[image_id])

    test_ids = _hex_ids(rng, n_test, taken)
    solution: dict[str, tuple[list[str], str]] = {}
    copies: dict[str, str] = {}
    n_scored = max(1, (2 * n_test) // 3)
    for i, image_id in enumerate(test_ids):
        if i < n_scored:
            lm = i % n_landmarks
            usage = "Public" if i % 2 == 0 else "Private"
            if i < n_landmarks // 2:
                # An exact copy of an index image (re-encoded): retrieval must put it first.
                source = [x for x in index_ids if index_landmark[x] == lm][0]
                arr = index_arrays[source]
                copies[image_id] = source
            else:
                arr = np.asarray(apply_edit("crop", Image.fromarray(crop(landmarks[lm])), seed=seed + i))
            solution[image_id] = ([x for x in index_ids if index_landmark[x] == lm], usage)
        else:
            arr = crop(others[i % len(others)])
            solution[image_id] = ([], "Ignored")
        _save_gldv2(root, "test", image_id, arr)

    train_ids = _hex_ids(rng, n_train, taken)
    train_landmark = {}
    for i, image_id in enumerate(train_ids):
        train_landmark[image_id] = int(rng.integers(0, len(names)))
        _save_gldv2(root, "train", image_id, crop(names[train_landmark[image_id]]))

    def write(name: str, header: list[str], rows: list[list]) -> None:
        with open(os.path.join(root, name), "w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(header)
            writer.writerows(rows)

    write("index.csv", ["id"], [[i] for i in index_ids])
    write("test.csv", ["id"], [[i] for i in test_ids])
    write("train.csv", ["id", "url", "landmark_id"],
          [[i, f"https://example.com/gldv2/{i}.jpg", train_landmark[i]] for i in train_ids])
    write("index_image_to_landmark.csv", ["id", "landmark_id"], [[i, index_landmark[i]] for i in index_ids])
    write("retrieval_solution_v2.1.csv", ["id", "images", "Usage"],
          [[t, " ".join(ids) if ids else "None", usage] for t, (ids, usage) in solution.items()])
    return Gldv2Replica(root, index_ids, test_ids, train_ids, solution, copies)


def main(argv: list[str] | None = None) -> None:
    """Command line: `disc21|gldv2 ROOT [--seed N]` writes that replica under ROOT and prints
    what it holds."""
    import argparse

    ap = argparse.ArgumentParser(description="Write a miniature DISC21 or GLDv2 replica.")
    ap.add_argument("layout", choices=["disc21", "gldv2"])
    ap.add_argument("root")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.layout == "disc21":
        r = write_disc21_replica(args.root, seed=args.seed)
        print(f"wrote a DISC21 replica in {r.root}: {len(r.reference_ids)} references, "
              f"{len(r.dev_ground_truth)} dev and {len(r.test_ground_truth)} test queries, {len(r.train_ids)} train images")
    else:
        g = write_gldv2_replica(args.root, seed=args.seed)
        print(f"wrote a GLDv2 replica in {g.root}: {len(g.index_ids)} index, {len(g.test_ids)} test, "
              f"{len(g.train_ids)} train images")


if __name__ == "__main__":
    main(sys.argv[1:])
