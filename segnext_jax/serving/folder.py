"""A folder of images segmented into files: label maps, colour overlays with a legend, optionally scores.

For every image (a folder is searched recursively) the output folder gets `labels/<name>.png` (class indices, 8-bit;
16-bit above 256 classes), `overlays/<name>.png` and, with `save_logits`, `logits/<name>.npy` ((H, W, K) float32,
appended band by band, so never whole in memory; `probs/` with class probabilities under multi-scale or flip).
Image i (sorted order) is index i of the run (its NMF seed). Up to `batch_size` images of one size go through the
network together; a smaller group runs at its own size (never filled up with copies). Unreadable files and images
over the pixel limit are skipped, with their reasons.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import cv2
import numpy as np
from tqdm import tqdm

from segnext_jax import paths
from segnext_jax.data import loading
from segnext_jax.serving import drawing
from segnext_jax.serving.batching import batches_by_size
from segnext_jax.serving.segmenter import Segmenter

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MAX_IMAGE_FLAG = "--max-image-pixels"  # the command-line flag named when an image is skipped for its size


def list_images(path: str) -> tuple[Path, list[Path]]:
    """(root, image files relative to it): the file itself, or every image under a folder, sorted; a relative `path`
    is relative to the working directory (errors name `path` as given)."""
    root = Path(paths.resolve(path))
    if root.is_file():
        return root.parent, [Path(root.name)]
    if not root.is_dir():
        raise FileNotFoundError(f"--input {path}: no such file or folder")
    files = sorted(p.relative_to(root) for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise FileNotFoundError(f"--input {path}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    return root, files


@dataclasses.dataclass
class _Item:
    index: int
    name: Path
    image: np.ndarray


def _read(root: Path, names: list[Path], skipped: dict[str, str], max_image_pixels: int) -> Iterator[_Item]:
    """Decoded images in order; unreadable ones and those over `max_image_pixels` (checked from the header, before
    decoding) are recorded in `skipped` (name -> reason) instead."""
    for index, name in enumerate(names):
        try:
            data, _ = loading.read_bytes(str(root / name), str(name))
            image = loading.decode_image(data, str(name), max_image_pixels=max_image_pixels, setting=MAX_IMAGE_FLAG)
            yield _Item(index, name, image)
        except loading.BadExampleError as error:
            skipped[str(name)] = error.reason


def _open_scores(output: Path, item: _Item, segmenter: Segmenter) -> BinaryIO:
    """An image's `.npy` under logits/ (probs/ when augmented), open after its (H, W, K) float32 header: the rows
    are appended as they are computed."""
    path = output / ("probs" if segmenter.augmented else "logits") / f"{item.name.with_suffix('')}.npy"
    path.parent.mkdir(parents=True, exist_ok=True)
    file = open(path, "wb")  # closed by predict_folder
    shape = (*item.image.shape[:2], segmenter.num_classes)
    np.lib.format.write_array_header_1_0(file, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return file


def _append_rows(files: list[BinaryIO], first_row: int, scores: np.ndarray) -> None:
    """Appends a band of rows (they come top to bottom) of every image's scores to its open `.npy`."""
    for file, image_scores in zip(files, scores, strict=True):
        file.write(image_scores.tobytes())


def _write_outputs(output: Path, item: _Item, labels: np.ndarray, segmenter: Segmenter) -> None:
    stem = item.name.with_suffix("")
    for kind in ("labels", "overlays"):
        (output / kind / stem).parent.mkdir(parents=True, exist_ok=True)
    dtype = np.uint8 if segmenter.num_classes <= 256 else np.uint16
    cv2.imwrite(str(output / "labels" / f"{stem}.png"), labels.astype(dtype))
    picture = drawing.overlay_with_legend(item.image, labels, segmenter.class_names, segmenter.palette)
    cv2.imwrite(str(output / "overlays" / f"{stem}.png"), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))


def predict_folder(
    segmenter: Segmenter,
    input_path: str,
    output: str,
    *,
    batch_size: int = 1,
    save_logits: bool = False,
    max_image_pixels: int = loading.DEFAULT_MAX_IMAGE_PIXELS,
) -> dict[str, Any]:
    """Segments every image of `input_path` into `output` (relative paths: to the working directory); images over
    `max_image_pixels` are skipped. Returns a summary (counts, skipped files with reasons, time)."""
    start = time.perf_counter()
    root, names = list_images(input_path)
    output_dir = Path(paths.resolve(output))
    skipped: dict[str, str] = {}
    done = slid = 0
    items = _read(root, names, skipped, max_image_pixels)
    with tqdm(total=len(names), unit="image", disable=len(names) == 1) as progress:
        for batch in batches_by_size(items, batch_size, lambda item: item.image.shape):
            images = np.stack([item.image for item in batch])
            files = [_open_scores(output_dir, item, segmenter) for item in batch] if save_logits else []
            append = functools.partial(_append_rows, files) if files else None
            try:
                labels = segmenter.label_batch(images, [item.index for item in batch], append)
            finally:
                for file in files:
                    file.close()
            for item, item_labels in zip(batch, labels, strict=True):
                _write_outputs(output_dir, item, item_labels, segmenter)
            done, slid = done + len(batch), slid + len(batch) * segmenter.uses_slide(*images.shape[1:3])
            progress.update(done + len(skipped) - progress.n)
        progress.update(len(names) - progress.n)  # files skipped after the last batch
    return {"written": done, "sliding_window": slid, "skipped": skipped, "seconds": time.perf_counter() - start}


def summary_lines(summary: dict[str, Any], output: str, scores_dir: str | None) -> list[str]:
    """What the run wrote (`scores_dir`: 'logits', 'probs' or None) and skipped, for the console."""
    kinds = ["labels", "overlays"] + ([scores_dir] if scores_dir else [])
    lines = [
        f"segmented {summary['written']} image(s) in {summary['seconds']:.1f} s "
        f"({summary['sliding_window']} by sliding window) -> {output}/{{{','.join(kinds)}}}"
    ]
    if summary["skipped"]:
        lines.append(f"skipped {len(summary['skipped'])} file(s):")
        lines += [f"  {name}: {reason}" for name, reason in summary["skipped"].items()]
    return lines
