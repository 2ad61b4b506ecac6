"""Builds the ArrayRecord (TFDS) copy of a dataset for `source='tfds'`, after checking it for bad files.

Usage: python scripts/prepare_tfds.py --dataset=ade20k --root=data/ade/ADEChallengeData2016 --data_dir=DIR

Writes DIR/segnext_segmentation/NAME/1.0.0/*.array_record (every split) without TensorFlow; point
`make_train_dataset(..., root=DIR, source='tfds')` (and the eval dataset) at DIR. Put DIR on storage every host
can read (e.g. a gcsfuse mount) for TPU pods. Refuses to build while `segnext_jax.data.check` reports bad files,
unless --skip_check is given.
"""

import argparse
import sys

from segnext_jax.data import check, datasets, tfds_builders


def main(argv: list[str] | None = None) -> int:
    """Checks then builds; returns the exit status (0 built, 1 bad files found)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, choices=[n for n in sorted(datasets.DATASETS) if n != "demo"])
    parser.add_argument("--root", required=True, help="dataset root in MMSegmentation's layout")
    parser.add_argument("--data_dir", required=True, help="TFDS data_dir to write to")
    parser.add_argument("--skip_check", action="store_true", help="build without checking the files first")
    args = parser.parse_args(argv)
    if not args.skip_check:
        status = check.main([f"--dataset={args.dataset}", f"--root={args.root}"])
        if status:
            print("not building: fix or remove the files reported above (or pass --skip_check)", file=sys.stderr)
            return status
    directory = tfds_builders.build(args.dataset, args.root, args.data_dir)
    print(f"wrote {args.dataset} to {directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
