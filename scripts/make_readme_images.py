"""Makes the README's example: docs/demo_input.png (a demo validation image) and docs/demo_overlay.png (the
prediction's colour overlay with its legend), through the same `Segmenter` as `python -m segnext_jax.predict`.

    python scripts/make_readme_images.py --checkpoint=workdir/demo

The checkpoint is any the predict command takes, trained on the demo data (configs/demo.py). Both pictures are
enlarged `--zoom` times (nearest neighbour) so the 128 x 128 scene is visible on the page.
"""

import argparse
import os

import cv2
import numpy as np

from segnext_jax import Segmenter
from segnext_jax.data import demo
from segnext_jax.serving.drawing import overlay_with_legend


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="workdir, model directory or .pth trained on demo data")
    parser.add_argument("--index", type=int, default=0, help="demo validation image to show")
    parser.add_argument("--zoom", type=int, default=2, help="enlargement of the saved pictures")
    parser.add_argument("--output", default="docs", help="folder for demo_input.png and demo_overlay.png")
    args = parser.parse_args()

    segmenter = Segmenter.from_checkpoint(args.checkpoint, dataset="demo")
    image = demo.generate("val", args.index)["image"]
    labels = segmenter(image, index=args.index)
    zoom = np.ones((args.zoom, args.zoom, 1), np.uint8)
    image, labels = np.kron(image, zoom), np.kron(labels, zoom[..., 0])
    picture = overlay_with_legend(image, labels, segmenter.class_names, segmenter.palette)
    os.makedirs(args.output, exist_ok=True)
    for name, rgb in (("demo_input.png", image), ("demo_overlay.png", picture)):
        cv2.imwrite(os.path.join(args.output, name), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        print(f"wrote {os.path.join(args.output, name)}")


if __name__ == "__main__":
    main()
