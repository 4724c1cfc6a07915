"""The data check at scale: a generated ImageFolder of many tiny PNG files, built as a dataset three
times (the layout and every file's header checked; then the same files again, the check remembered;
then after one file changed), each timed.

    python benchmarks/file_check.py --files 100000 --dir /tmp/file_check
"""
from __future__ import annotations

import argparse
import io
import os
import tempfile
import time

import numpy as np
from PIL import Image

from timm_exits.data import ImageFiles


def write_folder(root: str, files: int, classes: int = 100) -> None:
    """``files`` 8 x 8 RGB PNGs in ``classes`` class folders (one encoded image, copied)."""
    encoded = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(encoded, "PNG")
    data = encoded.getvalue()
    for c in range(classes):
        os.makedirs(os.path.join(root, f"class{c:03d}"), exist_ok=True)
    for i in range(files):
        with open(os.path.join(root, f"class{i % classes:03d}", f"{i:07d}.png"), "wb") as f:
            f.write(data)


def timed(what: str, root: str) -> None:
    start = time.perf_counter()
    ImageFiles(root)
    print(f"{what}: {time.perf_counter() - start:.1f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--dir", default=None, help="where to write the folder (default: a temporary folder)")
    args = parser.parse_args()
    root = os.path.join(args.dir or tempfile.mkdtemp(), "train")
    os.environ["TIMM_EXITS_CACHE"] = os.path.join(os.path.dirname(root), "cache")  # a fresh cache
    if not os.path.isdir(root):
        write_folder(root, args.files)
    timed(f"{args.files} files, first build (layout + headers)", root)
    timed("the same files again (the check remembered)", root)
    os.utime(os.path.join(root, "class000", f"{0:07d}.png"))
    timed("after one file changed (checked again)", root)


if __name__ == "__main__":
    main()
