"""DISC21 and GLDv2 layouts: SOURCE strings, folder and file names as published, ids as the ground
truth writes them, numeric / CSV order, protocol splits, streaming from S3."""

from __future__ import annotations

import os

import pytest

from raysearch.sources import open_source
from raysearch.sources import scan
from raysearch.sources.disc21 import find_ground_truth, scan_numbered
from raysearch.sources.gldv2 import image_path
from raysearch.sources.base import split_layout_spec


def _touch(path: str, data: bytes = b"x") -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _rows(spec: str, batch_rows: int = 10_000) -> list[tuple[str, str]]:
    out = []
    for tbl in open_source(spec).iter_batches(batch_rows):
        out.extend(zip(tbl.column("image_id").to_pylist(), tbl.column("uri").to_pylist()))
    return out


# ---------------------------------------------------------------------------------------------
# SOURCE strings
# ---------------------------------------------------------------------------------------------


def test_spec_split_is_the_text_after_the_last_colon_when_it_names_a_split(tmp_path):
    splits = ("references", "train")
    assert split_layout_spec("disc21:s3://b/disc21:train", "disc21:", splits, {}, "references") == ("s3://b/disc21", "train")
    assert split_layout_spec("disc21:s3://b/disc21", "disc21:", splits, {}, "references") == ("s3://b/disc21", "references")
    assert split_layout_spec(f"disc21:{tmp_path}/", "disc21:", splits, {}, "references") == (str(tmp_path), "references")
    assert split_layout_spec("disc21:/d:TRAINING", "disc21:", splits, {"training": "train"}, "references") == ("/d", "train")
    with pytest.raises(ValueError, match="no split 'refs'.*references, train"):
        split_layout_spec("disc21:/d:refs", "disc21:", splits, {}, "references")
    with pytest.raises(ValueError, match="names no data set folder"):
        split_layout_spec("disc21:", "disc21:", splits, {}, "references")


# ---------------------------------------------------------------------------------------------
# DISC21
# ---------------------------------------------------------------------------------------------


@pytest.fixture()
def disc21(tmp_path):
    root = tmp_path / "disc21"
    # Images under images/ (the isc2021 tutorial's arrangement), references split across two
    # sub-folders as two unpacked zips would leave them, out of numeric order on disk.
    for rel in ["images/references/part1/R000010.jpg", "images/references/part0/R000002.jpg",
                "images/references/part0/R000000.jpg", "images/references/R000001.png",
                "images/references/notes.txt", "images/references/R12.jpg", "images/references/Q00001.jpg",
                "images/references/.R000003.jpg",
                "images/queries/Q00001.jpg", "images/queries/Q00000.jpg", "images/queries/Q00002.jpg",
                "images/final_queries/Q50000.jpg", "images/training/T000000.jpg"]:
        _touch(str(root / rel))
    (root / "public_ground_truth.csv").write_text(
        "query_id,reference_id\nQ00000,R000010\nQ00001,\nQ00002,R000002\n")
    return root


def test_disc21_ids_are_the_ground_truths_in_numeric_order_across_subfolders(disc21):
    rows = _rows(f"disc21:{disc21}", batch_rows=2)
    assert [i for i, _ in rows] == ["R000000", "R000001", "R000002", "R000010"]
    uris = dict(rows)
    assert uris["R000001"] == f"{disc21}/images/references/R000001.png"
    assert uris["R000010"] == f"{disc21}/images/references/part1/R000010.jpg"


def test_disc21_splits_by_published_folder_names(disc21):
    assert [i for i, _ in _rows(f"disc21:{disc21}:dev_queries")] == ["Q00000", "Q00001", "Q00002"]
    assert [i for i, _ in _rows(f"disc21:{disc21}:test_queries")] == ["Q50000"]
    assert [i for i, _ in _rows(f"disc21:{disc21}:final_queries")] == ["Q50000"]
    assert [i for i, _ in _rows(f"disc21:{disc21}:train")] == ["T000000"]


def test_disc21_active_indexing_splits_come_from_the_dev_ground_truth(disc21):
    assert [i for i, _ in _rows(f"disc21:{disc21}:references_10k")] == ["R000002", "R000010"]
    assert [i for i, _ in _rows(f"disc21:{disc21}:references_990k")] == ["R000000", "R000001"]
    assert [i for i, _ in _rows(f"disc21:{disc21}:dev_queries_10k")] == ["Q00000", "Q00002"]
    assert [i for i, _ in _rows(f"disc21:{disc21}:dev_queries_40k")] == ["Q00001"]
    assert find_ground_truth(str(disc21), "dev") == f"{disc21}/public_ground_truth.csv"


def test_disc21_counts_stray_files_and_keeps_one_path_per_id(disc21):
    _touch(str(disc21 / "images/references/part0/R000001.jpg"))   # a second R000001
    files = scan_numbered(str(disc21 / "images/references"), "R", 6)
    assert files.n_ignored == 3          # notes.txt, R12.jpg (wrong width), Q00001.jpg
    assert files.n_duplicates == 1
    # The smaller path wins, whatever the listing order.
    assert files.uri(1) == f"{disc21}/images/references/R000001.png"
    assert int(files.present.sum()) == 4


def test_disc21_missing_split_names_every_place_looked(tmp_path):
    (tmp_path / "references").mkdir()
    with pytest.raises(FileNotFoundError, match="DISC21 train not found.*train, .*training_images"):
        open_source(f"disc21:{tmp_path}:train")
    with pytest.raises(FileNotFoundError, match="dev ground truth not found.*dev_queries_groundtruth.csv"):
        open_source(f"disc21:{tmp_path}:references_10k")


def test_disc21_bad_ground_truth_id_is_a_clear_error(disc21):
    (disc21 / "public_ground_truth.csv").write_text("Q00000,ref-10\n")
    with pytest.raises(ValueError, match="'ref-10' is not a DISC21 id"):
        _rows(f"disc21:{disc21}:references_10k")


def test_disc21_replica_matches_its_ground_truth(tmp_path):
    from raysearch.metrics.groundtruth import read_copy_ground_truth
    from raysearch.datasets.replicas import write_disc21_replica

    rep = write_disc21_replica(str(tmp_path / "d"), n_references=12, n_dev_queries=6, n_test_queries=3, n_train=3)
    gt = read_copy_ground_truth(find_ground_truth(rep.root, "dev"))
    refs = {i for i, _ in _rows(f"disc21:{rep.root}")}
    assert refs == set(rep.reference_ids)
    assert {r for _, r in gt.pairs} <= refs
    assert {i for i, _ in _rows(f"disc21:{rep.root}:dev_queries")} == set(gt.query_ids)
    assert len(_rows(f"disc21:{rep.root}:test_queries")) == 3


def test_disc21_streams_from_s3_in_pages(s3_bucket, monkeypatch):
    import s3fs

    fs = s3fs.S3FileSystem()
    numbers = list(range(0, 60, 2))
    fs.pipe({f"{s3_bucket}/disc21/references/R{n:06d}.jpg": b"x" for n in reversed(numbers)})
    fs.pipe({f"{s3_bucket}/disc21/references/sub/R000001.jpg": b"x", f"{s3_bucket}/disc21/references/readme.txt": b"x"})
    monkeypatch.setattr(scan, "_PAGE", 7)    # several trips through the listing generator
    rows = _rows(f"disc21:s3://{s3_bucket}/disc21", batch_rows=8)
    assert [i for i, _ in rows] == sorted([f"R{n:06d}" for n in numbers] + ["R000001"])
    assert dict(rows)["R000001"] == f"s3://{s3_bucket}/disc21/references/sub/R000001.jpg"
    assert dict(rows)["R000058"] == f"s3://{s3_bucket}/disc21/references/R000058.jpg"
    with pytest.raises(FileNotFoundError, match="DISC21 train not found"):
        open_source(f"disc21:s3://{s3_bucket}/disc21:train")


# ---------------------------------------------------------------------------------------------
# GLDv2
# ---------------------------------------------------------------------------------------------

IDS = ["ffee000000000001", "0123456789abcdef", "a0a0a0a0a0a0a0a0"]


def test_gldv2_csv_order_and_abc_paths(tmp_path):
    root = tmp_path / "gld"
    for i in IDS:
        _touch(image_path(str(root / "index"), i))
    (root / "index.csv").write_text("id\n" + "\n".join(IDS) + "\n")
    rows = _rows(f"gldv2:{root}", batch_rows=2)
    assert [i for i, _ in rows] == IDS
    assert rows[1][1] == f"{root}/index/0/1/2/0123456789abcdef.jpg"


def test_gldv2_without_csv_walks_the_folders_in_sorted_order(tmp_path):
    root = tmp_path / "gld"
    for i in IDS:
        _touch(image_path(str(root / "train"), i))
    _touch(str(root / "train/0/1/2/readme.txt"))
    assert [i for i, _ in _rows(f"gldv2:{root}:train")] == sorted(IDS)


def test_gldv2_train_csv_in_metadata_reads_only_the_id_column(tmp_path):
    root = tmp_path / "gld"
    (root / "train").mkdir(parents=True)
    (root / "metadata").mkdir()
    (root / "metadata/train.csv").write_text(
        "id,url,landmark_id\n" + "".join(f'{i},"http://x/{i}.jpg, with a comma",{n}\n' for n, i in enumerate(IDS)))
    assert [i for i, _ in _rows(f"gldv2:{root}:train")] == IDS


def test_gldv2_test_retrieval_keeps_the_scored_test_images(tmp_path):
    root = tmp_path / "gld"
    (root / "test").mkdir(parents=True)
    (root / "ground_truth").mkdir()
    (root / "test.csv").write_text("id\n" + "\n".join(IDS) + "\n")
    (root / "ground_truth/retrieval_solution_v2.1.csv").write_text(
        f"id,images,Usage\n{IDS[0]},aaa bbb,Public\n{IDS[1]},None,Ignored\n{IDS[2]},ccc,Private\n")
    assert [i for i, _ in _rows(f"gldv2:{root}:test_retrieval")] == [IDS[0], IDS[2]]
    assert [i for i, _ in _rows(f"gldv2:{root}:test")] == IDS


def test_gldv2_bad_input_is_named(tmp_path):
    root = tmp_path / "gld"
    (root / "index").mkdir(parents=True)
    (root / "index.csv").write_text("id\nnot-a-hex-id\n")
    with pytest.raises(ValueError, match="'not-a-hex-id' is not a GLDv2 image id"):
        _rows(f"gldv2:{root}")
    with pytest.raises(FileNotFoundError, match="GLDv2 test images not found"):
        open_source(f"gldv2:{root}:test")
    with pytest.raises(ValueError, match="gldv2 has no split 'val'"):
        open_source(f"gldv2:{root}:val")
