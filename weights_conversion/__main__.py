"""Command line: a PyTorch `.pth` (or JSeg `.pkl`) to an orbax model directory, or a model directory back to a `.pth`.

    python -m weights_conversion INPUT.pth OUTPUT_DIR [--variant auto|t|s|b|l] [--num-classes N] [--reinit-head]
        [--nmf-bases random|fixed[:SEED]]
    python -m weights_conversion MODEL_DIR OUTPUT.pth

The direction follows the input: a file is read as a PyTorch `.pth` or a JSeg (Jittor) `.pkl` checkpoint (any
published layout) and written with `segnext_jax.checkpoints.save_model` (`--nmf-bases=fixed:SEED` gives the model
stored NMF bases drawn from SEED, default 0, which no checkpoint file has; see `segnext_jax.models.create`); a
directory or URL (a `save_model` directory, or a training workdir: its latest step) is restored with `restore_model`
and written as an mmseg-named `.pth`. An existing OUTPUT is never overwritten; missing folders above it are created.
A bad input (no such file, not a checkpoint, a tensor of the wrong shape, other variant or classes) or an output that
cannot be created is a one-line error and exit status 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from flax import nnx

from segnext_jax import checkpoints, console, models, paths
from segnext_jax.models.naming import model_tensors
from segnext_jax.serving.loading import CHECKPOINT_ERRORS
from segnext_jax.serving.pytorch import (
    fill_model,
    logger,
    model_architecture,
    read_pytorch_checkpoint,
    replaces_classifier,
    require_variant,
)
from weights_conversion.convert import save_pytorch_checkpoint

# A backbone-only (ImageNet) checkpoint has no classifier; its model directory gets a randomly initialised
# ADE20K-sized head (only its backbone is meant to be used, config.init.pretrained_kind='backbone').
BACKBONE_ONLY_CLASSES = 150


def is_model_dir(path: str) -> bool:
    """Whether the input `path` is converted to a .pth (a model directory or workdir) rather than read as one."""
    return paths.is_url(path) or os.path.isdir(path)


def nmf_bases_arg(text: str) -> tuple[str, int | None]:
    """argparse type of --nmf-bases: 'random' -> ('random', None); 'fixed' or 'fixed:SEED' -> ('fixed', SEED or 0)."""
    if text == "random":
        return "random", None
    if text == "fixed":
        return "fixed", 0
    seed = text.removeprefix("fixed:")
    if seed != text and seed.isdigit():
        return "fixed", int(seed)
    raise argparse.ArgumentTypeError(f"{text!r}: give random, fixed or fixed:SEED (SEED an integer >= 0)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m weights_conversion",
        description="Convert a PyTorch SegNeXt/MSCAN .pth (or JSeg .pkl) to an orbax model directory, or a model "
        "directory to .pth.",
    )
    parser.add_argument(
        "input", help="a .pth or JSeg .pkl file (to orbax), or a model directory / training workdir (to .pth)"
    )
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
    parser.add_argument(
        "--nmf-bases",
        type=nmf_bases_arg,
        default=("random", None),
        metavar="random|fixed[:SEED]",
        help="the model's NMF bases (.pth input): random at every call as the reference (default), or fixed: drawn "
        "once from SEED (default 0) and stored with the model, for deterministic outputs",
    )
    args = parser.parse_args(argv)
    options = (args.variant != "auto", args.num_classes is not None, args.reinit_head, args.nmf_bases[0] != "random")
    if is_model_dir(args.input) and any(options):
        parser.error("--variant, --num-classes, --reinit-head and --nmf-bases apply to a .pth / .pkl input only")
    return args


def pytorch_to_orbax(args: argparse.Namespace, source: str, target: str) -> None:
    """Converts the `.pth` `source` into the model directory `target` and prints what it holds.

    `source` and `target` are args.input and args.output resolved; messages name the paths as the user gave them.
    """
    checkpoint = read_pytorch_checkpoint(source)
    variant = checkpoint.variant if args.variant == "auto" else args.variant
    num_classes = args.num_classes if args.num_classes is not None else checkpoint.num_classes
    num_classes = BACKBONE_ONLY_CLASSES if num_classes is None else num_classes
    require_variant(checkpoint, variant)  # refuse before building a model, which takes seconds
    replaces_classifier(checkpoint, num_classes, args.reinit_head)
    model_kwargs = {"variant": variant, "num_classes": num_classes}
    nmf_bases, nmf_seed = args.nmf_bases
    if nmf_bases == "fixed":
        model_kwargs.update(nmf_bases=nmf_bases, nmf_seed=nmf_seed)
    model = models.create(**model_kwargs, rngs=nnx.Rngs(0))
    loaded = fill_model(model, checkpoint, reinit_head=args.reinit_head)
    metadata = {
        "model": model_kwargs,
        "source": source,
        "backbone_only": not checkpoint.has_head,
    }
    checkpoints.save_model(model, target, metadata)
    head = "" if checkpoint.has_head else " (backbone-only checkpoint: randomly initialised decode head)"
    bases = f", fixed NMF bases of seed {nmf_seed}" if nmf_bases == "fixed" else ""
    print(
        f"{args.input}: SegNeXt-{variant.upper()}, {num_classes} classes{head}; {len(loaded)} tensors converted "
        f"-> {args.output}{bases}"
    )


def orbax_to_pytorch(args: argparse.Namespace, source: str, target: str) -> None:
    """Writes the model directory (or workdir) `source` as the mmseg-named `.pth` `target` (both resolved)."""
    model = checkpoints.restore_model(source)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    save_pytorch_checkpoint(model, target)
    if model.fixed_nmf_bases(1) is not None:
        logger.info("%s: its fixed NMF bases are not part of a .pth (the reference draws them at random)", args.input)
    variant, num_classes = model_architecture(model)
    print(
        f"{args.input}: SegNeXt-{variant.upper()}, {num_classes} classes; {len(model_tensors(model))} tensors "
        f"converted -> {args.output}"
    )


def path_problem(args: argparse.Namespace, source: str, target: str) -> str | None:
    """Why args.input / args.output (resolved: `source` / `target`) cannot be converted, or None if they can.

    Checked before the conversion, which takes seconds: the input must exist and the output must not; the nearest
    existing folder above the output must be a folder we may write into (the folders in between are created).
    """
    if not paths.is_url(source) and not os.path.exists(source):
        return f"{args.input}: no such file or directory"
    if os.path.lexists(target):
        return f"{args.output} already exists: choose a new output path"
    if paths.is_url(target):
        return f"{args.output}: a .pth is written to a local path only" if is_model_dir(source) else None
    problem = paths.why_not_creatable(target)
    return f"{args.output}: {problem}" if problem else None


def main(argv: list[str] | None = None) -> int:
    """Runs the conversion; returns the exit status (1 with a one-line error for a bad input or output path)."""
    console.quiet_library_noise()
    args = parse_args(argv)
    source, target = paths.resolve(args.input), paths.resolve(args.output)
    problem = path_problem(args, source, target)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    try:
        if is_model_dir(source):
            orbax_to_pytorch(args, source, target)
        else:
            pytorch_to_orbax(args, source, target)
    except (*CHECKPOINT_ERRORS, OSError) as e:  # a bad input file, or the file system refusing: not our bugs
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    logger.addHandler(logging.StreamHandler(sys.stdout))  # the conversion notes (renamed keys, dropped heads)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # printed once, not again by a handler that absl puts on the root logger
    sys.exit(console.reporting_bugs(main)())
