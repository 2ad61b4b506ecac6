"""Checks a dataset before training: `python -m segnext_jax.data.check --dataset=NAME --root=PATH`.

Every file of the chosen splits is decoded and checked exactly as the pipelines do it (see `loading`): corrupt or
truncated images, images and labels over --max_image_pixels (width x height read from the file's header; default
PIL's decompression-bomb limit, as config.data.max_image_pixels), missing label files, image/label size mismatches,
16-bit / colour / 1-bit labels and label values that are neither a class nor 255 are reported, plus label files that
no listed image uses. Each bad file is printed on a line of its own as `path: reason` and the exit status is 1; a
clean dataset prints one summary line and exits 0. A missing root prints how to prepare the data and exits 2.

For the folder dataset (`--dataset=folder --root=DIR`, see `datasets`) RGB masks are checked against classes.json's
colours, two images of one name are reported, and a table per split first shows, for every class, the images whose
mask has it and its share of the labelled pixels (of the good examples), so that missing or rare classes show (a
note names classes without any pixel: e.g. binary masks saved as 0/255, whose 255 is the ignore value).
"""

import argparse
import concurrent.futures
import os
import sys

import numpy as np

from segnext_jax import console
from segnext_jax.data import datasets, loading, sources


def check_split(
    name: str,
    root: str | None,
    split: str,
    source: str = "files",
    num_threads: int = 8,
    max_image_pixels: int = loading.DEFAULT_MAX_IMAGE_PIXELS,
    reduce_zero_label: bool | None = None,
) -> tuple[int, list[str]]:
    """Returns (number of examples checked, sorted `path: reason` reports) for one split."""
    count, problems, _ = _check(name, root, split, source, num_threads, max_image_pixels, reduce_zero_label, False)
    return count, problems


def class_statistics(
    root: str,
    split: str,
    num_threads: int = 8,
    max_image_pixels: int = loading.DEFAULT_MAX_IMAGE_PIXELS,
    reduce_zero_label: bool | None = None,
) -> tuple[int, list[str], np.ndarray]:
    """(number of examples, sorted `path: reason` reports, histogram) of a split of the folder dataset at `root`:
    histogram[i, k] is the number of pixels of value k (a class, or 255) in the label of good example i."""
    return _check(datasets.FOLDER, root, split, "files", num_threads, max_image_pixels, reduce_zero_label, True)


def _check(
    name: str,
    root: str | None,
    split: str,
    source: str,
    num_threads: int,
    max_image_pixels: int,
    reduce_zero_label: bool | None,
    histograms: bool,
) -> tuple[int, list[str], np.ndarray]:
    """`check_split`, and with `histograms` the label histograms of the good examples (each decoded once)."""
    data = sources.open_source(name, root, split, source, reduce_zero_label)

    def examine(record) -> tuple[list[str], np.ndarray | None]:
        record = loading.with_size_limit(record, max_image_pixels)
        if not histograms:
            return data.problems(record), None
        try:
            label = data.load(record)["label"]
        except loading.BadExampleError:
            return data.problems(record), None  # every report of the bad example, not just the first
        return [], np.bincount(label.ravel(), minlength=256)

    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
        results = list(pool.map(examine, data.records))
    problems = [line for lines, _ in results for line in lines]
    if source == "files" and name != "demo":
        what = "mask has no matching image" if name == datasets.FOLDER else "label file has no matching image"
        unmatched = datasets.unmatched_labels(data.spec, datasets.resolve_root(data.spec, root), split, data.records)
        problems += [f"{path}: {what}" for path in unmatched]
    if name == datasets.FOLDER:
        problems += [
            f"{image}: has the name of {other} (masks are matched by name): rename one"
            for image, other in datasets.duplicate_names(data.records)
        ]
    counts = np.array([counts for _, counts in results if counts is not None], np.int64).reshape(-1, 256)
    return len(data.records), sorted(problems), counts


def format_statistics(split: str, spec: datasets.DatasetSpec, histograms: np.ndarray) -> list[str]:
    """A table of one split: per class the good examples whose mask has it and its share of the labelled pixels;
    then the share of ignored pixels among all."""
    pixels = histograms.sum(axis=0)
    labelled = max(int(pixels[: spec.num_classes].sum()), 1)
    width = max(len("(ignored)"), *(len(name) for name in spec.class_names))
    lines = [
        f"{split}: classes of {len(histograms)} good example(s)",
        f"  {'class':<{width}}  {'images':>6}  {'pixels':>7}",
    ]
    for index, class_name in enumerate(spec.class_names):
        images = int((histograms[:, index] > 0).sum())
        lines.append(f"  {class_name:<{width}}  {images:>6}  {100 * pixels[index] / labelled:>6.2f}%")
    ignored = 100 * pixels[spec.ignore_index] / max(int(pixels.sum()), 1)
    lines.append(f"  {'(ignored)':<{width}}  {int((histograms[:, spec.ignore_index] > 0).sum()):>6}  {ignored:>6.2f}%")
    absent = [name for index, name in enumerate(spec.class_names) if len(histograms) and not pixels[index]]
    if absent:
        only_zero_and_ignored = not pixels[1 : spec.num_classes].any() and pixels[spec.ignore_index]
        hint = " (masks of 0 and 255? 255 marks ignored pixels: store the classes as 0, 1, ...)"
        lines.append(f"  note: no pixel of {', '.join(absent)} in {split}{hint if only_zero_and_ignored else ''}")
    return lines


def _flag(value: str) -> bool:
    if value.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"{value!r}: expected true or false")
    return value.lower() == "true"


def main(argv: list[str] | None = None) -> int:
    """Runs the check; returns the exit status (0 clean, 1 bad files found, 2 data not found)."""
    parser = argparse.ArgumentParser(prog="python -m segnext_jax.data.check", description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, choices=sorted(datasets.NAMES))
    parser.add_argument("--root", default=None, help="dataset root (files) or TFDS data_dir (tfds); default: spec's")
    parser.add_argument("--splits", default="train,val", help="comma-separated splits to check")
    parser.add_argument("--source", default="files", choices=sources.SOURCES)
    parser.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument(
        "--max_image_pixels",
        type=int,
        default=loading.DEFAULT_MAX_IMAGE_PIXELS,
        help="larger images and labels (width x height) are bad, as config.data.max_image_pixels; default: %(default)s",
    )
    parser.add_argument(
        "--reduce_zero_label",
        type=_flag,
        default=None,
        help="folder dataset: true or false, as config.data.reduce_zero_label; default: its classes.json's (false)",
    )
    args = parser.parse_args(argv)
    total, problems, tables = 0, [], []
    try:
        for split in args.splits.split(","):
            if args.dataset == datasets.FOLDER:
                count, split_problems, histograms = class_statistics(
                    args.root, split, args.threads, args.max_image_pixels, args.reduce_zero_label
                )
                spec = datasets.get_spec(args.dataset, args.root, args.reduce_zero_label)
                tables += format_statistics(split, spec, histograms)
            else:
                count, split_problems = check_split(
                    args.dataset,
                    args.root,
                    split,
                    args.source,
                    args.threads,
                    args.max_image_pixels,
                    args.reduce_zero_label,
                )
            total += count
            problems += split_problems
    except (FileNotFoundError, datasets.DatasetError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for line in tables + problems:
        print(line)
    if problems:
        print(f"{len(problems)} bad file(s) among {total} examples of {args.dataset} ({args.splits})", file=sys.stderr)
        return 1
    print(f"{args.dataset} ({args.splits}) is clean: {total} examples checked")
    return 0


if __name__ == "__main__":
    sys.exit(console.reporting_bugs(main)())
