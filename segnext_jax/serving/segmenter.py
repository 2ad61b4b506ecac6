"""`Segmenter`: a SegNeXt with its test pipeline and class presentation, `segmenter(image)` -> (H, W) label map.

`Segmenter.from_checkpoint(path)` loads a training workdir, a model directory or a PyTorch `.pth` (`loading.load`)
and takes its test settings from the recorded training config (else the dataset's). Images go through the
reference's test pipeline (`segnext_jax.evaluation.inference`): keep-ratio resize to the test scale, padding to a
multiple of 32, whole-image or sliding-window inference, logits resized back; multi-scale + flip averages class
probabilities. Image i (its index in a run) draws its NMF bases from `fold_in(key(seed), i)`
(`inference.indexed_keys`), so results do not depend on the batch it is in.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from segnext_jax.data import datasets
from segnext_jax.evaluation import inference
from segnext_jax.serving import drawing, loading

DEFAULT_MAX_PIXELS = 2048 * 2048  # larger network inputs are segmented by sliding windows
DEFAULT_CROP_SIZE = (512, 512)  # sliding-window size when the checkpoint's config gives none


class DatasetMismatchError(ValueError):
    """The dataset asked for (--dataset) has another number of classes than the checkpoint."""


def dataset_for(num_classes: int, name: str | None = None, root: str | None = None) -> datasets.DatasetSpec | None:
    """The dataset named `name` (checked against `num_classes`), else the only one with `num_classes`, else None.

    A folder dataset (`root`: its folder, as recorded in the training config) gives its class names when the folder
    is still there; otherwise None (generic names and colours)."""
    if name == datasets.FOLDER:
        try:
            spec = datasets.get_spec(name, root)
        except (OSError, datasets.DatasetError):  # the folder moved or its class list changed: generic names
            return None
        return spec if spec.num_classes == num_classes else None
    if name is not None:
        spec = datasets.get_spec(name)
        if spec.num_classes != num_classes:
            raise DatasetMismatchError(f"dataset {name!r} has {spec.num_classes} classes, the checkpoint {num_classes}")
        return spec
    matches = [spec for spec in datasets.DATASETS.values() if spec.num_classes == num_classes]
    return matches[0] if len(matches) == 1 else None


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
        self.palette = np.asarray(drawing.default_palette(self.num_classes) if palette is None else palette, np.uint8)
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
        """Loads `path` (workdir, model directory or `.pth`; relative to the working directory); `options` override
        the recorded test settings.

        Class names and palette come from `dataset`, else the dataset the checkpoint was trained on, else the only
        registered dataset with the checkpoint's number of classes; otherwise generic names and random colours.
        """
        model, metadata = loading.load(path, step)
        config = metadata.get("config") or {}
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
            key=inference.indexed_keys(jax.random.key(self.seed), indices),
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
