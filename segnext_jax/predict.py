"""Segment images with a SegNeXt checkpoint: label maps, colour overlays with a legend, optionally logits.

    python -m segnext_jax.predict --checkpoint=PATH --input=IMAGE_OR_FOLDER --output=FOLDER

PATH is a training workdir, a model directory (`python -m weights_conversion X.pth DIR`) or a PyTorch `.pth`; paths
may be relative to the working directory. For every image (a folder is searched recursively) FOLDER gets
`labels/<name>.png` (class indices, 8-bit; 16-bit above 256 classes), `overlays/<name>.png` (palette colours over the
image, with a legend of the classes present) and, with --save-logits, `logits/<name>.npy` ((H, W, K) float32,
appended band by band, so never whole in memory: H x W x K x 4 bytes on disk; `probs/` with class probabilities under
multi-scale or flip). Everything is at the image's own size.

Images go through the reference's test pipeline (`segnext_jax.evaluation.inference`): keep-ratio resize to the test
scale (the checkpoint's config, else the dataset's, else none), padding to a multiple of 32, whole-image or
sliding-window inference, logits resized back; multi-scale + flip averages class probabilities. An image whose
network input exceeds --max-pixels goes through sliding windows instead. Image i (sorted order) draws its NMF bases
from `fold_in(key(seed), i)`, so results do not depend on the batch size. Up to --batch-size images of one size go
through the network together; a smaller group runs at its own size (never filled up with copies). The resize back,
the argmax and the logits written run in bands of rows (`inference.infer_labels`), so memory follows the network
input's size, not the image's.

Unreadable files, and images over --max-image-pixels (width x height, read from the file's header; default PIL's
decompression-bomb limit), are reported by name and skipped (exit status 1 once all others are done); grey and
RGBA images are converted to RGB.

Python: `Segmenter.from_checkpoint(path)(image)` -> (H, W) label map of a uint8 image (`segnext_jax.serving`).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from segnext_jax import console, paths
from segnext_jax.data import datasets, loading
from segnext_jax.evaluation import inference
from segnext_jax.serving.folder import MAX_IMAGE_FLAG, predict_folder, summary_lines
from segnext_jax.serving.loading import CHECKPOINT_ERRORS
from segnext_jax.serving.segmenter import DEFAULT_MAX_PIXELS, DatasetMismatchError, Segmenter


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m segnext_jax.predict", description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--checkpoint", required=True, help="training workdir, model directory or PyTorch .pth")
    parser.add_argument("--input", required=True, help="an image or a folder of images (searched recursively)")
    parser.add_argument("--output", required=True, help="folder for labels/, overlays/ and logits/")
    parser.add_argument("--step", default="latest", help="workdir checkpoint: 'latest', 'best' or a step number")
    parser.add_argument("--dataset", choices=sorted(datasets.DATASETS), help="class names and palette to use")
    parser.add_argument("--mode", choices=inference.MODES, help="default: the checkpoint's evaluation mode, or whole")
    parser.add_argument("--crop-size", type=int, nargs=2, metavar=("H", "W"), help="sliding-window size")
    parser.add_argument("--stride", type=int, nargs=2, metavar=("H", "W"), help="sliding-window stride")
    parser.add_argument("--test-scale", type=int, nargs=2, metavar=("LONG", "SHORT"), help="keep-ratio resize bound")
    parser.add_argument("--no-resize", action="store_true", help="segment images at their own size")
    parser.add_argument("--scales", type=float, nargs="+", help="test-time resize ratios, e.g. 0.5 0.75 1 1.5")
    parser.add_argument("--flip", action="store_true", help="also average the horizontally flipped prediction")
    parser.add_argument(
        "--save-logits", action="store_true", help="also write (H, W, K) float32 .npy scores (H x W x K x 4 bytes)"
    )
    parser.add_argument("--seed", type=int, help="seed of the NMF bases (default: the checkpoint's, or 0)")
    parser.add_argument("--batch-size", type=int, default=4, help="images of one size per accelerator call")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="larger inputs: sliding window")
    parser.add_argument(
        MAX_IMAGE_FLAG,
        type=int,
        default=loading.DEFAULT_MAX_IMAGE_PIXELS,
        help="larger images (width x height, from the file header) are skipped; default: %(default)s",
    )
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if args.no_resize and args.test_scale:
        parser.error("--no-resize and --test-scale exclude each other")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns 0, or 1 when a file was skipped or the input/checkpoint is unusable."""
    console.quiet_library_noise()
    args = parse_args(argv)
    chosen = {
        "mode": args.mode,
        "crop_size": args.crop_size,
        "stride": args.stride,
        "test_scale": args.test_scale,
        "scales": args.scales,
        "flip": args.flip or None,
        "seed": args.seed,
        "max_pixels": args.max_pixels,
    }
    options = {name: value for name, value in chosen.items() if value is not None}
    if args.no_resize:
        options["test_scale"] = None
    step = int(args.step) if args.step.isdigit() else args.step
    checkpoint = paths.resolve(args.checkpoint)
    if not paths.is_url(checkpoint) and not os.path.exists(checkpoint):
        print(f"error: --checkpoint {args.checkpoint}: no such file or directory", file=sys.stderr)
        return 1
    try:
        segmenter = Segmenter.from_checkpoint(checkpoint, dataset=args.dataset, step=step, **options)
        summary = predict_folder(
            segmenter,
            args.input,
            args.output,
            batch_size=args.batch_size,
            save_logits=args.save_logits,
            max_image_pixels=args.max_image_pixels,
        )
    except (*CHECKPOINT_ERRORS, DatasetMismatchError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)  # the user's input; anything else is our bug: traceback
        return 1
    scores_dir = ("probs" if segmenter.augmented else "logits") if args.save_logits else None
    print("\n".join(summary_lines(summary, os.fspath(args.output), scores_dir)))
    return 1 if summary["skipped"] else 0


if __name__ == "__main__":
    sys.exit(console.reporting_bugs(main)())
