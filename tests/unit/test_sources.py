"""Image sources: folders, globs, list files and s3:// give stable ids, in a stable order, streamed."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raysearch.sources import FolderSource, GlobSource, ListFileSource, open_source
from raysearch.sources.base import image_id_for
from raysearch.sources.folder import glob_to_regex, split_glob
from raysearch.sources.listing import GROUP_ROWS, read_listing_groups, write_listing


def _touch(path, data=b"x"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


@pytest.fixture()
def tree(tmp_path):
    root = tmp_path / "photos"
    for rel in ["a.jpg", "b.PNG", "sub/c.webp", "sub/deeper/d.tiff", "sub/e.gif", "f.bmp", "g.jpeg",
                "h.tif", "notes.txt", ".hidden.jpg", ".cache/i.jpg", "sub/readme.md"]:
        _touch(str(root / rel))
    return root


def _rows(source, batch_rows=10_000):
    out = []
    for tbl in source.iter_batches(batch_rows):
        out.extend(zip(tbl.column("image_id").to_pylist(), tbl.column("uri").to_pylist()))
    return out


def test_folder_is_recursive_sorted_and_filters_extensions(tree):
    src = open_source(str(tree))
    assert isinstance(src, FolderSource)
    ids = [i for i, _ in _rows(src)]
    assert ids == ["a", "b", "f", "g", "h", "sub/c", "sub/e", "sub/deeper/d"]


def test_ids_are_relative_paths_without_extension_and_stable(tree):
    first = _rows(open_source(str(tree)))
    second = _rows(open_source(str(tree) + "/"))
    assert first == second
    for image_id, uri in first:
        assert uri == str(tree / (image_id + os.path.splitext(uri)[1]))


def test_small_batches_stream_the_same_rows(tree):
    src = open_source(str(tree))
    batches = list(src.iter_batches(3))
    assert [b.num_rows for b in batches] == [3, 3, 2]
    assert _rows(src, 3) == _rows(src)


def test_glob_matches_within_segments_and_across_with_double_star(tree):
    src = open_source(str(tree / "*.jpg"))
    assert isinstance(src, GlobSource)
    assert [i for i, _ in _rows(src)] == ["a"]
    deep = open_source(str(tree / "**" / "*.tiff"))
    assert [i for i, _ in _rows(deep)] == ["sub/deeper/d"]
    every = open_source(str(tree / "sub" / "*"))
    assert [i for i, _ in _rows(every)] == ["c", "e"]


def test_glob_helpers():
    assert split_glob("/data/x/**/*.jpg") == ("/data/x", "**/*.jpg")
    assert split_glob("s3://bucket/p/*.png") == ("s3://bucket/p", "*.png")
    rx = glob_to_regex("**/*.jpg")
    assert rx.match("a.jpg") and rx.match("x/y/a.jpg") and not rx.match("a.png")
    assert not glob_to_regex("*.jpg").match("x/a.jpg")
    assert glob_to_regex("img[0-9].jpg").match("img5.jpg")


def test_txt_list_resolves_relative_paths(tree, tmp_path):
    lst = tree / "list.txt"
    lst.write_text("# comment\na.jpg\n\nsub/c.webp\n" + str(tree / "f.bmp") + "\n")
    src = open_source(str(lst))
    assert isinstance(src, ListFileSource)
    assert _rows(src) == [
        ("a", str(tree / "a.jpg")),
        ("sub/c", str(tree / "sub/c.webp")),
        ("f", str(tree / "f.bmp")),
    ]


def test_csv_list_with_and_without_ids(tree):
    (tree / "l.csv").write_text("path,id\na.jpg,first\nsub/c.webp,\n")
    assert _rows(open_source(str(tree / "l.csv"))) == [
        ("first", str(tree / "a.jpg")),
        ("sub/c", str(tree / "sub/c.webp")),
    ]
    (tree / "m.csv").write_text("path\nb.PNG\n")
    assert [i for i, _ in _rows(open_source(str(tree / "m.csv")))] == ["b"]


def test_parquet_list(tree):
    pq.write_table(pa.table({"path": ["g.jpeg", "h.tif"], "id": ["G", "H"]}), tree / "l.parquet")
    assert _rows(open_source(str(tree / "l.parquet"))) == [("G", str(tree / "g.jpeg")), ("H", str(tree / "h.tif"))]


def test_list_without_path_column_is_refused(tree):
    (tree / "bad.csv").write_text("file\na.jpg\n")
    with pytest.raises(ValueError, match="'path' column"):
        _rows(open_source(str(tree / "bad.csv")))


def test_paths_outside_the_root_keep_their_full_path():
    assert image_id_for("/elsewhere/x/y.jpg", "/data") == "elsewhere/x/y"
    assert image_id_for("s3://b/k/y.jpg", "s3://b") == "k/y"
    assert image_id_for("/data/references/R000123.jpg", "/data/references") == "R000123"


def test_missing_and_wrong_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="source not found"):
        open_source(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError):
        open_source(str(tmp_path / "nope" / "*.jpg"))
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ValueError, match="not a list file"):
        open_source(str(tmp_path / "x.json"))
    with pytest.raises(ValueError, match="empty"):
        open_source("  ")


def test_listing_numbers_rows_in_parts_and_row_groups(tmp_path):
    root = tmp_path / "many"
    for i in range(300):
        _touch(str(root / f"d{i % 3}" / f"{i:04d}.jpg"))
    listing = write_listing(open_source(str(root)), str(tmp_path / "listing"), part_rows=2 * GROUP_ROWS)
    assert listing.n_rows == 300 and len(listing.parts) == 3
    assert [p.n_rows for p in listing.parts] == [128, 128, 44]
    tbl = pa.concat_tables(pq.read_table(p.uri) for p in listing.parts)
    assert tbl.column("row").to_pylist() == list(range(300))
    group = read_listing_groups(listing.parts[1].uri, 1, 1)
    assert group.column("row").to_pylist() == list(range(128 + 64, 256))


def test_listing_rows_can_start_after_an_existing_index(tree, tmp_path):
    listing = write_listing(open_source(str(tree)), str(tmp_path / "l"), first_row=1000)
    assert listing.first_row == 1000 and listing.end_row == 1008
    assert pq.read_table(listing.parts[0].uri).column("row").to_pylist()[0] == 1000


def test_duplicate_ids_are_marked_keeping_the_first(tmp_path):
    root = tmp_path / "dups"
    for rel in ["a.jpg", "a.png", "a.jpgx.png", "b.jpg", "sub/a.jpg"]:
        _touch(str(root / rel))
    listing = write_listing(open_source(str(root)), str(tmp_path / "l"))
    tbl = pq.read_table(listing.parts[0].uri)
    marks = dict(zip(tbl.column("uri").to_pylist(), tbl.column("duplicate_of").to_pylist()))
    assert listing.n_duplicates == 1
    assert marks[str(root / "a.png")] == str(root / "a.jpg")
    assert marks[str(root / "a.jpg")] is None
    assert marks[str(root / "sub/a.jpg")] is None  # id "sub/a" differs from "a"


def test_s3_folder_source(s3_bucket):
    import s3fs

    fs = s3fs.S3FileSystem()
    for rel in ["x/1.jpg", "x/2.png", "x/sub/3.jpg", "x/skip.txt"]:
        fs.pipe(f"{s3_bucket}/{rel}", b"data")
    src = open_source(f"s3://{s3_bucket}/x")
    assert _rows(src) == [
        ("1", f"s3://{s3_bucket}/x/1.jpg"),
        ("2", f"s3://{s3_bucket}/x/2.png"),
        ("sub/3", f"s3://{s3_bucket}/x/sub/3.jpg"),
    ]
    globbed = open_source(f"s3://{s3_bucket}/x/*.png")
    assert [i for i, _ in _rows(globbed)] == ["2"]
    fs.pipe(f"{s3_bucket}/list.txt", b"x/1.jpg\nx/sub/3.jpg\n")
    assert _rows(open_source(f"s3://{s3_bucket}/list.txt")) == [
        ("x/1", f"s3://{s3_bucket}/x/1.jpg"),
        ("x/sub/3", f"s3://{s3_bucket}/x/sub/3.jpg"),
    ]
    with pytest.raises(FileNotFoundError):
        open_source(f"s3://{s3_bucket}/missing")
