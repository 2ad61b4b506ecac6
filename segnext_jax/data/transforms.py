"""The reference's training and evaluation transforms (MMSegmentation 1.2.2 / mmcv 2.1), in numpy and OpenCV.

Each operation reproduces one reference transform with the same OpenCV calls, so results are bit-identical:
- `random_resize`: mmcv `RandomResize(scale, ratio_range, keep_ratio=True)` (mmseg `Resize`: bilinear image,
  nearest label);
- `choose_crop` + `crop`: mmseg `RandomCrop(crop_size, cat_max_ratio)`;
- `random_flip`: mmseg `RandomFlip(prob)` (horizontal);
- `sample_photometric` + `apply_photometric`: mmseg `PhotoMetricDistortion` (defaults 32, (0.5, 1.5), (0.5, 1.5), 18);
- `normalize` then `pad`: mmseg `SegDataPreProcessor(mean, std, bgr_to_rgb=True, pad_val=0, seg_pad_val=255,
  size=crop)`, which normalises first and pads the normalised image with 0 (bottom/right) and the label with 255;
- the test pipeline (mmseg test `Resize(scale, keep_ratio=True)` with `resize` and `keep_ratio_size`, then
  `normalize`) is `segnext_jax.evaluation.inference.network_input`, with the multi-scale and flip augmentations.

Images are uint8 RGB (H, W, 3) where the reference holds BGR: every operation is channel-order independent or uses
the RGB twin of the reference's OpenCV colour conversion. Labels are uint8 (H, W). Random draws come from an
explicit `np.random.Generator` (grain's per-example RNG) with the reference's distributions.
"""

import dataclasses

import cv2
import numpy as np

IMAGENET_MEAN = np.array([123.675, 116.28, 103.53], np.float32)
IMAGENET_STD = np.array([58.395, 57.12, 57.375], np.float32)


def keep_ratio_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """(height, width) after mmcv's keep-ratio rescale: the largest size within (long, short) = max/min of `scale`."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def resize(image: np.ndarray, label: np.ndarray | None, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray | None]:
    """Resizes the image bilinearly and the label (if any) by nearest neighbour to size (height, width)."""
    dsize = (size[1], size[0])
    image = cv2.resize(image, dsize, interpolation=cv2.INTER_LINEAR)
    if label is not None:
        label = cv2.resize(label, dsize, interpolation=cv2.INTER_NEAREST)
    return image, label


def sample_scale(scale: tuple[int, int], ratio_range: tuple[float, float], rng: np.random.Generator) -> tuple[int, int]:
    """Draws the resize bound scale * r, r ~ U(ratio_range), truncated to ints (mmcv `_random_sample_ratio`)."""
    low, high = ratio_range
    ratio = rng.random() * (high - low) + low
    return int(scale[0] * ratio), int(scale[1] * ratio)


def random_resize(
    image: np.ndarray,
    label: np.ndarray,
    scale: tuple[int, int],
    ratio_range: tuple[float, float],
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Keep-ratio resize to a randomly scaled bound (mmcv `RandomResize(..., keep_ratio=True)`)."""
    bound = sample_scale(scale, ratio_range, rng)
    return resize(image, label, keep_ratio_size(image.shape[0], image.shape[1], bound))


def _crop_offset(shape: tuple[int, ...], crop_size: tuple[int, int], rng: np.random.Generator) -> tuple[int, int]:
    """A uniform top-left corner (y, x) for a crop inside `shape` (0 along an axis shorter than the crop)."""
    margin_h, margin_w = max(shape[0] - crop_size[0], 0), max(shape[1] - crop_size[1], 0)
    return int(rng.integers(0, margin_h + 1)), int(rng.integers(0, margin_w + 1))


def crop_is_diverse(label_crop: np.ndarray, cat_max_ratio: float, ignore_index: int = 255) -> bool:
    """mmseg's acceptance rule: more than one non-ignored class and the largest below `cat_max_ratio` of them."""
    counts = np.bincount(label_crop.ravel(), minlength=256)
    counts[ignore_index] = 0
    counts = counts[counts > 0]
    return len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio


def choose_crop(
    label: np.ndarray,
    crop_size: tuple[int, int],
    cat_max_ratio: float,
    rng: np.random.Generator,
    ignore_index: int = 255,
) -> tuple[int, int]:
    """Top-left (y, x) of mmseg's `RandomCrop`: a uniform offset, redrawn up to 10 times while the crop is not
    `crop_is_diverse` (the 11th draw is kept unchecked), only when cat_max_ratio < 1."""
    offset = _crop_offset(label.shape, crop_size, rng)
    if cat_max_ratio < 1.0:
        for _ in range(10):
            if crop_is_diverse(crop(label, offset, crop_size), cat_max_ratio, ignore_index):
                break
            offset = _crop_offset(label.shape, crop_size, rng)
    return offset


def crop(array: np.ndarray, offset: tuple[int, int], crop_size: tuple[int, int]) -> np.ndarray:
    """array[y:y+h, x:x+w] (smaller near the border when the array is smaller than the crop)."""
    y, x = offset
    return array[y : y + crop_size[0], x : x + crop_size[1]]


def random_flip(
    image: np.ndarray, label: np.ndarray, prob: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Flips image and label left-right with probability `prob`."""
    if rng.random() < prob:
        return image[:, ::-1], label[:, ::-1]
    return image, label


def _convert(image: np.ndarray, alpha: float = 1, beta: float = 0) -> np.ndarray:
    """image * alpha + beta in float32, clipped to [0, 255] and truncated to uint8 (mmseg `convert`)."""
    return np.clip(image.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def adjust_brightness(image: np.ndarray, delta: float) -> np.ndarray:
    """Adds `delta` to every value."""
    return _convert(image, beta=delta)


def adjust_contrast(image: np.ndarray, alpha: float) -> np.ndarray:
    """Multiplies every value by `alpha`."""
    return _convert(image, alpha=alpha)


def adjust_saturation(image: np.ndarray, alpha: float) -> np.ndarray:
    """Multiplies the HSV saturation by `alpha`."""
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    hsv[..., 1] = _convert(hsv[..., 1], alpha=alpha)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def adjust_hue(image: np.ndarray, delta: int) -> np.ndarray:
    """Shifts the HSV hue (OpenCV's 0..179 range) by `delta`, modulo 180."""
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    hsv[..., 0] = (hsv[..., 0].astype(int) + delta) % 180
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


@dataclasses.dataclass(frozen=True)
class PhotometricParams:
    """One draw of PhotoMetricDistortion: each value is None when its operation is skipped."""

    brightness: float | None
    contrast: float | None
    contrast_first: bool
    saturation: float | None
    hue: int | None


def sample_photometric(
    rng: np.random.Generator,
    brightness_delta: int = 32,
    contrast_range: tuple[float, float] = (0.5, 1.5),
    saturation_range: tuple[float, float] = (0.5, 1.5),
    hue_delta: int = 18,
) -> PhotometricParams:
    """Draws mmseg's parameters: each op with probability 1/2; brightness U(-d, d), contrast and saturation
    U(range), hue an integer in [-hue_delta, hue_delta) (numpy `randint`'s exclusive high, as the reference);
    contrast first or last with probability 1/2."""

    def maybe(draw):
        return draw() if rng.integers(2) else None

    return PhotometricParams(
        brightness=maybe(lambda: float(rng.uniform(-brightness_delta, brightness_delta))),
        contrast_first=bool(rng.integers(2)),
        contrast=maybe(lambda: float(rng.uniform(*contrast_range))),
        saturation=maybe(lambda: float(rng.uniform(*saturation_range))),
        hue=maybe(lambda: int(rng.integers(-hue_delta, hue_delta))),
    )


def apply_photometric(image: np.ndarray, params: PhotometricParams) -> np.ndarray:
    """Applies brightness, then contrast (if first), saturation, hue, then contrast (if last), as mmseg does."""
    if params.brightness is not None:
        image = adjust_brightness(image, params.brightness)
    if params.contrast_first and params.contrast is not None:
        image = adjust_contrast(image, params.contrast)
    if params.saturation is not None:
        image = adjust_saturation(image, params.saturation)
    if params.hue is not None:
        image = adjust_hue(image, params.hue)
    if not params.contrast_first and params.contrast is not None:
        image = adjust_contrast(image, params.contrast)
    return image


def normalize(image: np.ndarray) -> np.ndarray:
    """(image - ImageNet mean) / std in float32 on an RGB image (as SegDataPreProcessor computes it in torch)."""
    return (image.astype(np.float32) - IMAGENET_MEAN) / IMAGENET_STD


def pad(
    image: np.ndarray, label: np.ndarray, size: tuple[int, int], ignore_index: int = 255
) -> tuple[np.ndarray, np.ndarray]:
    """Pads bottom/right to at least size (height, width): the image with 0, the label with `ignore_index`."""
    pad_h, pad_w = max(size[0] - image.shape[0], 0), max(size[1] - image.shape[1], 0)
    image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)))
    label = np.pad(label, ((0, pad_h), (0, pad_w)), constant_values=ignore_index)
    return image, label


def train_transform(
    image: np.ndarray,
    label: np.ndarray,
    rng: np.random.Generator,
    *,
    crop_size: tuple[int, int],
    scale: tuple[int, int],
    ratio_range: tuple[float, float] = (0.5, 2.0),
    cat_max_ratio: float = 0.75,
    ignore_index: int = 255,
) -> tuple[np.ndarray, np.ndarray]:
    """The reference training pipeline on one decoded pair: returns (float32 (h, w, 3) normalised, int32 (h, w))
    with (h, w) = crop_size."""
    image, label = random_resize(image, label, scale, ratio_range, rng)
    offset = choose_crop(label, crop_size, cat_max_ratio, rng, ignore_index)
    image, label = crop(image, offset, crop_size), crop(label, offset, crop_size)
    image, label = random_flip(image, label, 0.5, rng)
    image = apply_photometric(np.ascontiguousarray(image), sample_photometric(rng))
    image, label = pad(normalize(image), label, crop_size, ignore_index)
    return image, label.astype(np.int32)
