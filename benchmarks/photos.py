"""Photographs for benchmarks and training, from sources no evaluation of raysearch is reserved for.

Two disjoint groups, so that a descriptor is trained on one and judged on the other:

    train   Debian's gnome-backgrounds, sway-backgrounds, lomiri-wallpapers, lomiri-wallpapers-16.04,
            desktop-base and debian-edu-artwork-* (fetched with `apt-get download`, unpacked with
            `dpkg-deb -x`): photographs and artwork
    train-wide
            the train group and the photographs inside gcompris-qt-data's Qt resource bundles
            (monuments, animals, landscapes, paintings: about 150 pictures of other kinds than
            wallpapers; its cut-outs with transparency and its drawings are left out)
    judge   scikit-image's photographs, lomiri-wallpapers-20.04's photographs and two pictures of
            visp-images-data (its other files are blurred, warped or resized copies of these two, or
            renderings of one calibration scene, which would be copies of each other)

Debian packages are fetched once into a cache folder (default ~/.cache/raysearch-bench/debs); the
repository holds no image. Photographs larger than `max_side` are shrunk (most wallpapers are 4K).

    python benchmarks/photos.py train OUT_DIR     # writes the group as JPEG files, prints the count
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys

import numpy as np
from PIL import Image

TRAIN_PACKAGES = (
    "gnome-backgrounds", "sway-backgrounds", "lomiri-wallpapers", "lomiri-wallpapers-16.04", "desktop-base",
    "debian-edu-artwork-buster", "debian-edu-artwork-emerald", "debian-edu-artwork-homeworld",
    "debian-edu-artwork-softwaves", "debian-edu-artwork-spacefun",
)
# Packages whose pictures sit inside Qt resource bundles (.rcc files) rather than as image files.
RESOURCE_PACKAGES = ("gcompris-qt-data",)
JUDGE_PACKAGES = ("lomiri-wallpapers-20.04", "visp-images-data")
# Of visp-images-data, only these two pictures (see the module docstring).
VISP_KEEP = ("ViSP-images/Klimt/Klimt.", "ViSP-images/Solvay/Solvay_conference_1927_Version2_2126x1463.")
EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
CACHE = os.path.join(os.path.expanduser("~"), ".cache", "raysearch-bench", "debs")
MIN_PIXELS = 300 * 300


def fetch_packages(packages: tuple[str, ...], cache: str = CACHE) -> str:
    """Download and unpack Debian packages into `cache` (once); returns the unpacked root."""
    root = os.path.join(cache, "unpacked")
    os.makedirs(root, exist_ok=True)
    for name in packages:
        done = os.path.join(cache, f"{name}.done")
        if os.path.exists(done):
            continue
        subprocess.run(["apt-get", "download", name], cwd=cache, check=True, capture_output=True)
        debs = sorted(glob.glob(os.path.join(cache, f"{name}_*.deb")))
        if not debs:
            raise RuntimeError(f"apt-get download {name} produced no .deb in {cache}")
        subprocess.run(["dpkg-deb", "-x", debs[-1], os.path.join(root, name)], check=True)
        open(done, "w").close()
    return root


def qt_resources(path: str):
    """(name, bytes) of every file in a Qt binary resource bundle (`rcc` output, format versions
    1-3: a "qres" header, a tree of 14- or 22-byte nodes, a data and a names section; zlib-compressed
    files flagged 1). Written here because no Python package reads the format; zstd-compressed
    files (flag 4, not used by gcompris-qt-data) are skipped."""
    import struct
    import zlib

    with open(path, "rb") as f:
        buf = f.read()
    if buf[:4] != b"qres":
        raise ValueError(f"{path}: not a Qt resource bundle")
    version, tree, data, names = struct.unpack(">iiii", buf[4:20])
    node_size = 14 if version == 1 else 22

    def node_name(offset: int) -> str:
        n = struct.unpack(">H", buf[names + offset:names + offset + 2])[0]
        return buf[names + offset + 6:names + offset + 6 + 2 * n].decode("utf-16-be")

    stack = [(0, "")]
    while stack:
        index, prefix = stack.pop()
        at = tree + index * node_size
        name_offset, flags = struct.unpack(">iH", buf[at:at + 6])
        name = prefix + ("/" + node_name(name_offset) if index else "")
        if flags & 2:  # a directory: its children are consecutive nodes
            count, first = struct.unpack(">ii", buf[at + 6:at + 14])
            stack.extend((first + c, name) for c in range(count))
            continue
        if flags & 4:
            continue
        start = data + struct.unpack(">i", buf[at + 10:at + 14])[0]
        size = struct.unpack(">I", buf[start:start + 4])[0]
        blob = buf[start + 4:start + 4 + size]
        yield name, zlib.decompress(blob[4:]) if flags & 1 else blob


def _load(path, max_side: int, rgb_only: bool = False) -> np.ndarray | None:
    """`path` (a file name or a file object) as RGB uint8, shrunk to `max_side`; None when it is
    not a picture, is smaller than MIN_PIXELS or (`rgb_only`) has transparency or a palette."""
    try:
        with Image.open(path) as img:
            if rgb_only and img.mode != "RGB":
                return None
            img.draft("RGB", (max_side, max_side))
            img = img.convert("RGB")
            if img.width * img.height < MIN_PIXELS:
                return None
            scale = max_side / max(img.size)
            if scale < 1:
                img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BICUBIC)
            return np.asarray(img, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError):
        return None


def package_photographs(packages: tuple[str, ...], max_side: int = 2048, cache: str = CACHE) -> dict[str, np.ndarray]:
    """name -> RGB uint8 photograph for every picture of the packages (at least 300x300 pixels)."""
    root = fetch_packages(packages, cache)
    out: dict[str, np.ndarray] = {}
    for name in packages:
        for path in sorted(glob.glob(os.path.join(root, name, "**", "*"), recursive=True)):
            if not path.lower().endswith(EXTENSIONS):
                continue
            if name == "visp-images-data" and not any(k in path for k in VISP_KEEP):
                continue
            arr = _load(path, max_side)
            if arr is not None:
                stem = os.path.splitext(os.path.relpath(path, os.path.join(root, name)))[0].replace(os.sep, "_")
                out[f"{name}/{stem}"] = arr
    return out


def resource_photographs(packages: tuple[str, ...] = RESOURCE_PACKAGES, max_side: int = 2048,
                         cache: str = CACHE) -> dict[str, np.ndarray]:
    """name -> RGB uint8 photograph for every opaque RGB picture of at least 300x300 pixels in the
    Qt resource bundles of `packages`."""
    import io

    root = fetch_packages(packages, cache)
    out: dict[str, np.ndarray] = {}
    for name in packages:
        for bundle in sorted(glob.glob(os.path.join(root, name, "**", "*.rcc"), recursive=True)):
            for inner, blob in qt_resources(bundle):
                if not inner.lower().endswith(EXTENSIONS):
                    continue
                arr = _load(io.BytesIO(blob), max_side, rgb_only=True)
                if arr is not None:
                    stem = os.path.splitext(inner.strip("/"))[0]
                    out[f"{name}/{stem.removeprefix('gcompris/src/activities/').replace('/', '_')}"] = arr
    return out


def photographs(group: str, max_side: int = 2048, cache: str = CACHE) -> dict[str, np.ndarray]:
    """The photographs of one group: 'train', 'train-wide' or 'judge' (see the module docstring)."""
    if group == "train":
        return package_photographs(TRAIN_PACKAGES, max_side, cache)
    if group == "train-wide":
        return {**package_photographs(TRAIN_PACKAGES, max_side, cache),
                **resource_photographs(RESOURCE_PACKAGES, max_side, cache)}
    if group == "judge":
        from raysearch.samples import sample_photographs

        return {**{f"skimage/{k}": v for k, v in sample_photographs().items()},
                **package_photographs(JUDGE_PACKAGES, max_side, cache)}
    raise ValueError(f"group must be 'train', 'train-wide' or 'judge', got {group!r}")


def write_photographs(photos: dict[str, np.ndarray], folder: str, quality: int = 92) -> list[str]:
    """Save photographs as JPEG files named after them; returns the paths."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for name, arr in photos.items():
        path = os.path.join(folder, name.replace("/", "__") + ".jpg")
        Image.fromarray(arr).save(path, quality=quality)
        paths.append(path)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("group", choices=("train", "train-wide", "judge"))
    ap.add_argument("out")
    ap.add_argument("--max-side", type=int, default=2048)
    args = ap.parse_args()
    paths = write_photographs(photographs(args.group, args.max_side), args.out)
    print(f"{len(paths)} photographs in {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
