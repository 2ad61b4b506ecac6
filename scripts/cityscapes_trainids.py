"""Writes Cityscapes `*_gtFine_labelTrainIds.png` (19 classes, 255 = ignore) next to every `*_gtFine_labelIds.png`.

Usage: python scripts/cityscapes_trainids.py --root=data/cityscapes [--threads=8]

The pipelines read trainIds, as MMSegmentation does; its own converter rebuilds them from the polygon JSON files
with cityscapesscripts, this script maps the labelIds PNGs shipped in gtFine_trainvaltest.zip through the same
table (cityscapesscripts' `labels.py`), needing no extra package.
"""

import argparse
import concurrent.futures
import os
import sys

import numpy as np
from PIL import Image

from segnext_jax.data import datasets

_SUFFIX = "_gtFine_labelIds.png"


def convert(label_ids_path: str) -> str:
    """Converts one labelIds PNG; returns the path written."""
    with Image.open(label_ids_path) as image:
        if image.mode not in ("L", "P"):
            raise ValueError(f"{label_ids_path}: mode {image.mode}, expected 8-bit labelIds")
        train_ids = datasets.cityscapes_train_ids(np.asarray(image))
    out_path = label_ids_path[: -len(_SUFFIX)] + "_gtFine_labelTrainIds.png"
    Image.fromarray(train_ids).save(out_path)
    return out_path


def main(argv: list[str] | None = None) -> int:
    """Converts every labelIds file under ROOT/gtFine; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="Cityscapes root holding gtFine/ and leftImg8bit/")
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args(argv)
    gt_dir = os.path.join(args.root, "gtFine")
    paths = sorted(
        os.path.join(dirpath, name) for dirpath, _, names in os.walk(gt_dir) for name in names if name.endswith(_SUFFIX)
    )
    if not paths:
        print(f"no *{_SUFFIX} under {gt_dir}: unzip gtFine_trainvaltest.zip into {args.root}", file=sys.stderr)
        return 1
    with concurrent.futures.ThreadPoolExecutor(args.threads) as pool:
        written = list(pool.map(convert, paths))
    print(f"wrote {len(written)} *_gtFine_labelTrainIds.png files under {gt_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
