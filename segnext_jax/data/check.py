"""Checks a dataset before training: `python -m segnext_jax.data.check --dataset=NAME --root=PATH`.

Every file of the chosen splits is decoded and checked exactly as the pipelines do it (see `loading`): corrupt or
truncated images, missing label files, image/label size mismatches, 16-bit / colour / 1-bit labels and label
values that are neither a class nor 255 are reported, plus label files that no listed image uses. Each bad file is
printed on a line of its own as `path: reason` and the exit status is 1; a clean dataset prints one summary line
and exits 0. A missing root prints how to prepare the data and exits 2.
"""

import argparse
import concurrent.futures
import os
import sys

from segnext_jax.data import datasets, sources


def check_split(
    name: str, root: str | None, split: str, source: str = "files", num_threads: int = 8
) -> tuple[int, list[str]]:
    """Returns (number of examples checked, sorted `path: reason` reports) for one split."""
    data = sources.open_source(name, root, split, source)
    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
        problems = [line for lines in pool.map(data.problems, data.records) for line in lines]
    if source == "files" and name != "demo":
        unmatched = datasets.unmatched_labels(data.spec, datasets.resolve_root(data.spec, root), split, data.records)
        problems += [f"{path}: label file has no matching image" for path in unmatched]
    return len(data.records), sorted(problems)


def main(argv: list[str] | None = None) -> int:
    """Runs the check; returns the exit status (0 clean, 1 bad files found, 2 data not found)."""
    parser = argparse.ArgumentParser(prog="python -m segnext_jax.data.check", description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, choices=sorted(datasets.DATASETS))
    parser.add_argument("--root", default=None, help="dataset root (files) or TFDS data_dir (tfds); default: spec's")
    parser.add_argument("--splits", default="train,val", help="comma-separated splits to check")
    parser.add_argument("--source", default="files", choices=sources.SOURCES)
    parser.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    total, problems = 0, []
    try:
        for split in args.splits.split(","):
            count, split_problems = check_split(args.dataset, args.root, split, args.source, args.threads)
            total += count
            problems += split_problems
    except (FileNotFoundError, KeyError) as error:
        print(str(error).strip('"'), file=sys.stderr)
        return 2
    for line in problems:
        print(line)
    if problems:
        print(f"{len(problems)} bad file(s) among {total} examples of {args.dataset} ({args.splits})", file=sys.stderr)
        return 1
    print(f"{args.dataset} ({args.splits}) is clean: {total} examples checked")
    return 0


if __name__ == "__main__":
    sys.exit(main())
