"""Segment images with a SegNeXt checkpoint: label maps, colour overlays with a legend, optionally logits.

    python -m segnext_jax.predict --checkpoint=PATH --input=IMAGE_OR_FOLDER --output=FOLDER

PATH is a training workdir, a model directory (`python -m weights_conversion X.pth DIR`) or a PyTorch `.pth`; paths
may be relative to the working directory. For every image (a folder is searched recursively) FOLDER gets
`labels/<name>.png` (class indices, 8-bit; 16-bit above 256 classes), `overlays/<name>.png` (palette colours over the
image, with a legend of the classes present) and, with --save-logits, `logits/<name>.npy` ((H, W, K) float32, appended
band by band, so never whole in memory: H x W x K x 4 bytes on disk; `probs/` with class probabilities under
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

Python: `Segmenter.from_checkpoint(path)(image)` -> (H, W) label map of a uint8 image.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import cv2
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from segnext_jax import checkpoints, console, paths
from segnext_jax.data import datasets, loading
from segnext_jax.evaluation import inference

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
DEFAULT_MAX_PIXELS = 2048 * 2048  # larger network inputs are segmented by sliding windows
DEFAULT_CROP_SIZE = (512, 512)  # sliding-window size when the checkpoint's config gives none
OVERLAY_ALPHA = 0.5  # weight of the class colour over the image
MAX_IMAGE_FLAG = "--max-image-pixels"  # the flag named when an image is skipped for its size


class DatasetMismatchError(ValueError):
    """The dataset asked for (--dataset) has another number of classes than the checkpoint."""


def load_checkpoint(path: str, step: int | str = "latest") -> tuple[nnx.Module, dict[str, Any]]:
    """(model in eval mode, the training config as a dict or {}) of a workdir, model directory or `.pth` file
    (a relative path is relative to the working directory)."""
    path = paths.resolve(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path}: no such file or directory")
    if Path(path).is_file():
        from weights_conversion import load_pytorch_checkpoint

        return load_pytorch_checkpoint(path), {}
    model, metadata = checkpoints.load(path, step)
    return model, metadata.get("config") or {}


def dataset_for(num_classes: int, name: str | None = None, root: str | None = None) -> datasets.DatasetSpec | None:
    """The dataset named `name` (checked against `num_classes`), else the only one with `num_classes`, else None.

    A folder dataset (`root`: its folder, as recorded in the training config) gives its class names when the folder
    is still there; otherwise None (generic names and colours)."""
    if name == datasets.FOLDER:
        try:
            spec = datasets.get_spec(name, root)
        except (OSError, ValueError):
            return None
        return spec if spec.num_classes == num_classes else None
    if name is not None:
        spec = datasets.get_spec(name)
        if spec.num_classes != num_classes:
            raise DatasetMismatchError(f"dataset {name!r} has {spec.num_classes} classes, the checkpoint {num_classes}")
        return spec
    matches = [spec for spec in datasets.DATASETS.values() if spec.num_classes == num_classes]
    return matches[0] if len(matches) == 1 else None


def default_palette(num_classes: int) -> np.ndarray:
    """Distinct-looking random colours (fixed seed) for classes of an unknown dataset."""
    return np.random.default_rng(0).integers(0, 256, (num_classes, 3)).astype(np.uint8)


def to_rgb(image: np.ndarray, name: str = "image") -> np.ndarray:
    """A uint8 (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) image as (H, W, 3) RGB (grey replicated, alpha dropped)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"{name}: expected uint8 pixels, got {image.dtype}: convert to 0..255 uint8 first")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{name}: expected an (H, W), (H, W, 3) or (H, W, 4) image, got shape {image.shape}")
    return np.ascontiguousarray(np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image[..., :3])


@dataclasses.dataclass(frozen=True)
class Scores:
    """One batch's predictions: `scores` (N, H, W, K) logits, or class probabilities when `are_probs`."""

    scores: jax.Array
    are_probs: bool
    slide: bool  # sliding windows were used (asked for, or the image exceeded max_pixels)

    def labels(self) -> np.ndarray:
        return np.asarray(jnp.argmax(self.scores, axis=-1).astype(jnp.int32))

    def probs(self) -> jax.Array:
        return self.scores if self.are_probs else jax.nn.softmax(self.scores, axis=-1)


class Segmenter:
    """A SegNeXt model with its test pipeline and class presentation: `segmenter(image)` -> (H, W) label map.

    Options (the checkpoint's training config supplies defaults in `from_checkpoint`): `mode` 'whole' or 'slide'
    with `crop_size` / `stride` (default stride: 2/3 of the crop); `test_scale` (long, short) keep-ratio resize
    bound, None for none; `scales` resize ratios and `flip` for test-time augmentation; `seed` for the NMF bases;
    `max_pixels`: a larger network input uses sliding windows.
    """

    def __init__(
        self,
        model: nnx.Module,
        *,
        class_names: Sequence[str] | None = None,
        palette: np.ndarray | Sequence[Sequence[int]] | None = None,
        mode: str = "whole",
        crop_size: tuple[int, int] = DEFAULT_CROP_SIZE,
        stride: tuple[int, int] | None = None,
        test_scale: tuple[int, int] | None = None,
        scales: Sequence[float] = (1.0,),
        flip: bool = False,
        seed: int = 0,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        if mode not in inference.MODES:
            raise ValueError(f"mode={mode!r}: choose one of {', '.join(inference.MODES)}")
        self.model = model
        self.num_classes = int(model.decode_head.conv_seg.kernel.shape[-1])
        self.class_names = tuple(class_names or (f"class {i}" for i in range(self.num_classes)))
        self.palette = np.asarray(default_palette(self.num_classes) if palette is None else palette, np.uint8)
        if len(self.class_names) != self.num_classes or self.palette.shape != (self.num_classes, 3):
            raise ValueError(f"class_names and palette must give {self.num_classes} classes (the model's)")
        self.mode = mode
        self.crop_size = tuple(crop_size)
        self.stride = tuple(stride) if stride is not None else tuple(int(c * 2 / 3) for c in self.crop_size)
        self.test_scale = tuple(test_scale) if test_scale is not None else None
        self.scales = tuple(float(s) for s in scales)
        self.flip = flip
        self.seed = seed
        self.max_pixels = max_pixels

    @classmethod
    def from_checkpoint(
        cls, path: str, *, dataset: str | None = None, step: int | str = "latest", **options: Any
    ) -> Segmenter:
        """Loads `path` (workdir, model directory or `.pth`); `options` override the recorded test settings.

        Class names and palette come from `dataset`, else the dataset the checkpoint was trained on, else the only
        registered dataset with the checkpoint's number of classes; otherwise generic names and random colours.
        """
        model, config = load_checkpoint(paths.resolve(path), step)
        num_classes = int(model.decode_head.conv_seg.kernel.shape[-1])
        data = config.get("data", {})
        spec = dataset_for(num_classes, dataset or data.get("dataset"), data.get("root"))
        recorded = _recorded_settings(config, spec)
        if spec is not None:
            recorded.update(class_names=spec.class_names, palette=spec.palette)
        return cls(model, **{**recorded, **options})

    @property
    def augmented(self) -> bool:
        """Whether predictions average several augmentations (then they are probabilities, not logits)."""
        return self.flip or len(self.scales) > 1

    def uses_slide(self, height: int, width: int) -> bool:
        """Whether an image of this size goes through sliding windows (asked for, or its input exceeds max_pixels)."""
        size = inference.network_input_size(height, width, max(self.scales), self.test_scale)
        return self.mode == "slide" or size[0] * size[1] > self.max_pixels

    def _options(self, images: np.ndarray, indices: Sequence[int]) -> dict[str, Any]:
        """The inference options of a batch: test scale, mode and windows, per-image keys from `indices`."""
        return dict(
            test_scale=self.test_scale,
            mode="slide" if self.uses_slide(*images.shape[1:3]) else "whole",
            crop_size=self.crop_size,
            stride=self.stride,
            key=jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(self.seed), jnp.asarray(indices)),
        )

    def predict_batch(self, images: np.ndarray, indices: Sequence[int]) -> Scores:
        """Full-size scores for uint8 RGB `images` (N, H, W, 3) of one size; `indices` seed each image's NMF bases.
        They take N x H x W x K floats: `label_batch` needs far less memory for large images."""
        options = self._options(images, indices)
        if self.augmented:
            scores = inference.infer_multiscale(self.model, images, scales=self.scales, flip=self.flip, **options)
        else:
            scores = inference.infer_augmented_logits(self.model, images, ratio=self.scales[0], **options)
        return Scores(scores, self.augmented, options["mode"] == "slide")

    def label_batch(
        self,
        images: np.ndarray,
        indices: Sequence[int],
        on_scores: Callable[[int, np.ndarray], None] | None = None,
    ) -> np.ndarray:
        """Label maps (N, H, W) int32 of uint8 RGB `images` (N, H, W, 3) of one size, computed by bands of rows
        without full-size scores in memory (`inference.infer_labels`); `indices` seed each image's NMF bases.
        `on_scores(first_row, scores)` receives the logits (probabilities when `augmented`) band after band, as
        float32 (N, rows, W, K)."""
        return inference.infer_labels(
            self.model,
            images,
            scales=self.scales,
            flip=self.flip,
            on_scores=on_scores,
            **self._options(images, indices),
        )

    def __call__(
        self, image: np.ndarray, *, return_probs: bool = False, index: int = 0
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Label map (H, W) int32 of a uint8 image (grey, RGB or RGBA) at its own size; with `return_probs` also the
        class probabilities (H, W, K) float32. `index` selects the image's NMF seed (as in a folder run)."""
        if not return_probs:
            return self.label_batch(to_rgb(image)[None], [index])[0]
        scores = self.predict_batch(to_rgb(image)[None], [index])
        return scores.labels()[0], np.asarray(scores.probs()[0])


def _recorded_settings(config: dict[str, Any], spec: datasets.DatasetSpec | None) -> dict[str, Any]:
    """Segmenter options from a training config (as recorded in a workdir) or, lacking one, the dataset's."""
    evaluation, data = config.get("eval", {}), config.get("data", {})
    settings: dict[str, Any] = {}
    if "test_scale" in data:
        settings["test_scale"] = tuple(data["test_scale"])
    elif spec is not None:
        settings["test_scale"] = spec.test_scale
    if evaluation.get("mode") == "slide":
        settings.update(mode="slide", crop_size=tuple(evaluation["crop_size"]), stride=tuple(evaluation["stride"]))
    elif "crop_size" in evaluation:
        settings["crop_size"] = tuple(evaluation["crop_size"])
    if "seed" in evaluation:
        settings["seed"] = int(evaluation["seed"])
    return settings


def colorize(labels: np.ndarray, image: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """The palette colour of every pixel's class blended over the image (uint8 RGB)."""
    blended = (1 - OVERLAY_ALPHA) * image.astype(np.float32) + OVERLAY_ALPHA * palette[labels].astype(np.float32)
    return blended.round().astype(np.uint8)


def legend(classes: Sequence[int], names: Sequence[str], palette: np.ndarray, width: int) -> np.ndarray:
    """A white (h, width, 3) RGB panel listing `classes` as colour swatches with their names, wrapped into rows."""
    font, scale, thickness, row_height, pad = cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1, 18, 6
    entries = []
    for c in classes:
        text_width = cv2.getTextSize(names[c], font, scale, thickness)[0][0]
        entries.append((c, min(12 + 4 + text_width + 12, width - 2 * pad)))
    rows, x = 0, pad
    positions = []
    for c, entry_width in entries:
        if x + entry_width > width - pad and x > pad:
            rows, x = rows + 1, pad
        positions.append((c, x, pad + rows * row_height))
        x += entry_width
    panel = np.full((2 * pad + (rows + 1) * row_height, width, 3), 255, np.uint8)
    for c, x, y in positions:
        cv2.rectangle(panel, (x, y + 2), (x + 11, y + 13), tuple(int(v) for v in palette[c]), -1)
        cv2.rectangle(panel, (x, y + 2), (x + 11, y + 13), (0, 0, 0), 1)
        cv2.putText(panel, names[c], (x + 16, y + 12), font, scale, (0, 0, 0), thickness, cv2.LINE_AA)
    return panel


def overlay_with_legend(image: np.ndarray, labels: np.ndarray, names: Sequence[str], palette: np.ndarray) -> np.ndarray:
    """The colour overlay above a legend of the classes present (most frequent first), uint8 RGB."""
    counts = np.bincount(labels.ravel(), minlength=len(names))
    present = [int(c) for c in np.argsort(-counts, kind="stable") if counts[c] > 0]
    width = max(image.shape[1], 200)
    painted = colorize(labels, image, palette)
    painted = np.pad(painted, ((0, 0), (0, width - image.shape[1]), (0, 0)), constant_values=255)
    return np.concatenate([painted, legend(present, names, palette, width)], axis=0)


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


def _batches(items: Iterator[_Item], batch_size: int) -> Iterator[list[_Item]]:
    """Groups of up to `batch_size` images of one size; at most 2 * batch_size images wait for their group."""
    pending: dict[tuple[int, ...], list[_Item]] = {}
    for item in items:
        group = pending.setdefault(item.image.shape, [])
        group.append(item)
        if len(group) == batch_size:
            yield pending.pop(item.image.shape)
        elif sum(len(g) for g in pending.values()) > 2 * batch_size:
            yield pending.pop(next(iter(pending)))
    yield from pending.values()


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
    picture = overlay_with_legend(item.image, labels, segmenter.class_names, segmenter.palette)
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
    with tqdm(total=len(names), unit="image", disable=len(names) == 1) as progress:
        for batch in _batches(_read(root, names, skipped, max_image_pixels), batch_size):
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
    from weights_conversion import CHECKPOINT_ERRORS

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
    if not os.path.exists(checkpoint):
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
    sys.exit(main())
