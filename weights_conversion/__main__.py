"""Command line: a PyTorch `.pth` to an orbax model directory, or a model directory back to a `.pth`.

    python -m weights_conversion INPUT.pth OUTPUT_DIR [--variant auto|t|s|b|l] [--num-classes N] [--reinit-head]
    python -m weights_conversion MODEL_DIR OUTPUT.pth

The direction follows the input: a file is read as a PyTorch checkpoint (any published layout) and written with
`segnext_jax.checkpoints.save_model`; a directory (a `save_model` directory, or a training workdir: its latest step)
is restored with `restore_model` and written as an mmseg-named `.pth`. An existing OUTPUT is never overwritten.
"""

from __future__ import annotations

import argparse
import logging
import pickle
import sys
from pathlib import Path

from flax import nnx

from segnext_jax import checkpoints, models
from weights_conversion.convert import (
    fill_model,
    logger,
    model_architecture,
    read_pytorch_checkpoint,
    replaces_classifier,
    require_variant,
    save_pytorch_checkpoint,
)
from weights_conversion.mapping import model_tensors

# A backbone-only (ImageNet) checkpoint has no classifier; its model directory gets a randomly initialised
# ADE20K-sized head (only its backbone is meant to be used, config.init.pretrained_kind='backbone').
BACKBONE_ONLY_CLASSES = 150


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m weights_conversion",
        description="Convert a PyTorch SegNeXt/MSCAN .pth to an orbax model directory, or a model directory to .pth.",
    )
    parser.add_argument("input", help="a .pth file (to orbax), or a model directory / training workdir (to .pth)")
    parser.add_argument("output", help="the model directory (or .pth file) to create; must not exist")
    parser.add_argument(
        "--variant", default="auto", choices=["auto", *models.VARIANTS], help="expected variant (.pth input)"
    )
    parser.add_argument(
        "--num-classes",
        type=int,
        help=f"classes of the decode head (.pth input; default: the checkpoint's, {BACKBONE_ONLY_CLASSES} for a "
        "backbone-only one)",
    )
    parser.add_argument(
        "--reinit-head",
        action="store_true",
        help="accept a decode head with another number of classes than --num-classes: re-initialise conv_seg",
    )
    args = parser.parse_args(argv)
    if Path(args.input).is_dir() and (args.variant != "auto" or args.num_classes is not None or args.reinit_head):
        parser.error("--variant, --num-classes and --reinit-head apply to a .pth input only")
    return args


def pytorch_to_orbax(args: argparse.Namespace) -> None:
    """Converts the `.pth` args.input into the model directory args.output and prints what it holds."""
    checkpoint = read_pytorch_checkpoint(args.input)
    variant = checkpoint.variant if args.variant == "auto" else args.variant
    num_classes = args.num_classes if args.num_classes is not None else checkpoint.num_classes
    num_classes = BACKBONE_ONLY_CLASSES if num_classes is None else num_classes
    require_variant(checkpoint, variant)  # refuse before building a model, which takes seconds
    replaces_classifier(checkpoint, num_classes, args.reinit_head)
    model = models.create(variant, num_classes, rngs=nnx.Rngs(0))
    loaded = fill_model(model, checkpoint, reinit_head=args.reinit_head)
    metadata = {
        "model": {"variant": variant, "num_classes": num_classes},
        "source": str(Path(args.input).resolve()),
        "backbone_only": not checkpoint.has_head,
    }
    checkpoints.save_model(model, args.output, metadata)
    head = "" if checkpoint.has_head else " (backbone-only checkpoint: randomly initialised decode head)"
    print(
        f"{args.input}: SegNeXt-{variant.upper()}, {num_classes} classes{head}; {len(loaded)} tensors converted "
        f"-> {args.output}"
    )


def orbax_to_pytorch(args: argparse.Namespace) -> None:
    """Writes the model directory (or workdir) args.input as the mmseg-named `.pth` args.output."""
    model = checkpoints.restore_model(args.input)
    save_pytorch_checkpoint(model, args.output)
    variant, num_classes = model_architecture(model)
    print(
        f"{args.input}: SegNeXt-{variant.upper()}, {num_classes} classes; {len(model_tensors(model))} tensors "
        f"converted -> {args.output}"
    )


def main(argv: list[str] | None = None) -> int:
    """Runs the conversion; returns the exit status (1 with a one-line error for bad input)."""
    args = parse_args(argv)
    if Path(args.output).exists():
        print(f"error: {args.output} already exists: choose a new output path", file=sys.stderr)
        return 1
    try:
        if Path(args.input).is_dir():
            orbax_to_pytorch(args)
        else:
            pytorch_to_orbax(args)
    except (ValueError, OSError, pickle.UnpicklingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    logger.addHandler(logging.StreamHandler(sys.stdout))  # the conversion notes (renamed keys, dropped heads)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # printed once, not again by a handler that absl puts on the root logger
    sys.exit(main())
