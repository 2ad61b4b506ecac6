"""Inference as MMSegmentation 1.2.2 tests a segmentor: whole image, sliding window, multi-scale + flip.

What mmseg does, and so what this module does (mmseg `EncoderDecoder`, `SegDataPreProcessor`,
`BaseSegmentor.postprocess_result`, `SegTTAModel`):
- the uint8 image is resized keep-ratio to the test scale (OpenCV bilinear), flipped for a flip augmentation, and
  normalised (`network_input`: the one test-time preprocessing, evaluation's and prediction's);
- the normalised image is padded bottom/right with 0 to a multiple of `size_divisor` (32 in every SegNeXt config;
  the data preprocessor does this in both modes);
- 'whole': one network call on the padded image; 'slide': windows of `crop_size` every `stride` (mmseg's
  `slide_inference` grid: the last window is moved back inside the image, a crop larger than the image shrinks to
  it, windows are never padded), their logits summed and divided by the number of windows covering each pixel;
- every network call's stride-8 logits are resized bilinearly (align_corners=False) to that call's input size;
- the padding is cropped off, a flipped input's logits are flipped back, and the result is resized bilinearly to
  the output size (mmseg's `ori_shape`);
- multi-scale + flip (`SegTTAModel`) averages the softmax of every augmentation's logits at the output size.

Randomness: SegNeXt's decoder draws random NMF bases at every call. Here every image has its own key, by one rule
(`indexed_keys`): image i of a split or folder run seeded with s uses `fold_in(key(s), i)`, and a batch given a
single `key` uses `fold_in(key, n)` for its n-th image. Network call w of an image uses `fold_in(image key, w)` and
augmentation a of `infer_multiscale` uses `fold_in(image key, a)` as its image key, so results are repeatable and
do not depend on the batch an image is in. `nmf_bases` instead gives every call the same bases (as the reference's
tests fix them), and so does a model built with `nmf_bases='fixed'` (its stored bases).

The network runs in one jitted function per input shape (jax caches it), with the model in evaluation mode.

`infer_labels` gives the label maps without ever holding full-size (N, H, W, K) scores: each augmentation's logits
stay at its network input size, and the resize back, the probability average and the argmax run in bands of output
rows (the scores of each band can be handed on, e.g. appended to a file). Its memory is therefore bounded by the
network inputs' size (the test scale), not the images'.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from segnext_jax.data.transforms import keep_ratio_size, normalize, resize
from segnext_jax.models import draw_nmf_bases
from segnext_jax.models.layers import resize_bilinear

MODES = ("whole", "slide")
MS_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # the reference's multi-scale test ratios
SIZE_DIVISOR = 32  # SegNeXt's data_preprocessor test_cfg: inputs padded to a multiple of 32
BAND_BYTES = 64 * 2**20  # size of the float32 scores of one band of output rows in `infer_labels`

Window = tuple[int, int, int, int]  # (y1, y2, x1, x2)


def slide_windows(size: tuple[int, int], crop_size: tuple[int, int], stride: tuple[int, int]) -> list[Window]:
    """mmseg's `slide_inference` windows (y1, y2, x1, x2) over an image of `size` (height, width), row by row."""
    (h_img, w_img), (h_crop, w_crop), (h_stride, w_stride) = size, crop_size, stride
    h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
    windows = []
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y2 = min(h_idx * h_stride + h_crop, h_img)
            x2 = min(w_idx * w_stride + w_crop, w_img)
            windows.append((max(y2 - h_crop, 0), y2, max(x2 - w_crop, 0), x2))
    return windows


def indexed_keys(key: jax.Array, indices: Sequence[int] | jax.Array) -> jax.Array:
    """The keys of images `indices` (their positions in a split or a folder, or in a batch): `fold_in(key, i)` each.
    An image's NMF bases so follow from its index alone, whatever batch or process it is in."""
    return jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.asarray(indices))


def image_keys(key: jax.Array | None, num_images: int) -> jax.Array:
    """One PRNG key per image: `key` (default `jax.random.key(0)`) folded with 0..n-1, or `key` itself if it
    already holds n keys. Raw uint32 keys are accepted."""
    key = jax.random.key(0) if key is None else jnp.asarray(key)
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    if key.ndim == 0:
        return indexed_keys(key, jnp.arange(num_images))
    if key.shape != (num_images,):
        raise ValueError(f"key: give one key, or one per image ({num_images}); got shape {key.shape}")
    return key


def fold_keys(keys: jax.Array, data: int) -> jax.Array:
    """Every key of `keys` folded with the integer `data` (a window or augmentation index)."""
    return jax.vmap(jax.random.fold_in, (0, None))(keys, data)


def nmf_bases_shape(model: nnx.Module) -> tuple[int, int, int]:
    """(S, D, R) of the model's NMF: splits, channels per split and rank; one image's bases are (S, D, R)."""
    hamburger = model.decode_head.hamburger
    splits = hamburger.ham.num_splits
    return splits, hamburger.ham_in.conv.kernel.shape[-1] // splits, hamburger.ham.rank


def seeded_nmf_bases(model: nnx.Module, seed: int) -> jax.Array:
    """The NMF bases (S, D, R) that `infer_logits(model, images, key=jax.random.key(seed))` draws for the first
    image of `images` (its whole-image network call)."""
    splits, dim, rank = nmf_bases_shape(model)
    (key,) = fold_keys(image_keys(jax.random.key(seed), 1), 0)
    return draw_nmf_bases(key, 1, dim, rank, splits)


def baked_nmf_bases(model: nnx.Module, seed: int | None) -> jax.Array | None:
    """The bases (S, D, R) an exported graph bakes in: those of `seed` if given, else the stored bases of a model
    built with nmf_bases='fixed', else None."""
    if seed is not None:
        return seeded_nmf_bases(model, seed)
    stored = model.fixed_nmf_bases(1)
    return None if stored is None else stored.reshape(nmf_bases_shape(model))


@functools.partial(jax.jit, static_argnums=(1,))
def _draw_bases(keys: jax.Array, shape: tuple[int, int, int]) -> jax.Array:
    splits, dim, rank = shape
    bases = jax.vmap(lambda k: draw_nmf_bases(k, 1, dim, rank, splits))(keys)
    return bases.reshape(-1, dim, rank)


@functools.partial(jax.jit, static_argnums=(0,))
def _network_logits(graphdef: nnx.GraphDef, state: nnx.State, images: jax.Array, bases: jax.Array) -> jax.Array:
    """The segmentor's `encode_decode`: logits resized to the input's size (N, h, w, K), evaluation mode."""
    model = nnx.merge(graphdef, state)
    model.eval()
    return resize_bilinear(model(images, nmf_bases=bases), images.shape[1:3])


@jax.jit
def _accumulate(total: jax.Array, window_logits: jax.Array, y1: jax.Array, x1: jax.Array) -> jax.Array:
    start = (0, y1, x1, 0)
    window = jax.lax.dynamic_slice(total, start, window_logits.shape)
    return jax.lax.dynamic_update_slice(total, window + window_logits, start)


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _finish(
    total: jax.Array, count: jax.Array, size: tuple[int, int], flip: bool, output_size: tuple[int, int]
) -> jax.Array:
    """Sum / count, padding cropped, a flipped input's logits flipped back, resized to `output_size`."""
    logits = (total / count[None, :, :, None])[:, : size[0], : size[1]]
    if flip:
        logits = logits[:, :, ::-1]
    return resize_bilinear(logits, output_size)


def _check_mode(
    mode: str, crop_size: tuple[int, int] | None, stride: tuple[int, int] | None
) -> tuple[tuple[int, int], tuple[int, int]] | None:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: choose one of {', '.join(MODES)}")
    if mode == "whole":
        return None
    if crop_size is None or stride is None:
        raise ValueError("mode='slide' needs crop_size and stride, e.g. crop_size=(512, 512), stride=(341, 341)")
    return (int(crop_size[0]), int(crop_size[1])), (int(stride[0]), int(stride[1]))


def _infer(
    model: nnx.Module,
    images: jax.Array,
    *,
    mode: str,
    crop_size: tuple[int, int] | None,
    stride: tuple[int, int] | None,
    output_size: tuple[int, int] | None,
    size_divisor: int | None,
    keys: jax.Array,
    nmf_bases: jax.Array | None,
    flip: bool,
) -> jax.Array:
    """Logits at `output_size` of normalised (N, H, W, 3) `images`; `flip`: the images are flipped copies."""
    slide = _check_mode(mode, crop_size, stride)
    n, h, w, _ = images.shape
    if nmf_bases is None:
        nmf_bases = model.fixed_nmf_bases(n)  # a model built with nmf_bases='fixed': its stored bases, every call
    output_size = (h, w) if output_size is None else (int(output_size[0]), int(output_size[1]))
    divisor = size_divisor or 1
    padded = (-(-h // divisor) * divisor, -(-w // divisor) * divisor)
    images = jnp.pad(jnp.asarray(images, jnp.float32), ((0, 0), (0, padded[0] - h), (0, padded[1] - w), (0, 0)))
    windows = [(0, padded[0], 0, padded[1])] if slide is None else slide_windows(padded, *slide)
    graphdef, state = nnx.split(model)
    count = np.zeros(padded, np.float32)
    total = jnp.zeros((n, *padded, model.decode_head.conv_seg.kernel.shape[-1]), jnp.float32)
    for index, (y1, y2, x1, x2) in enumerate(windows):
        bases = nmf_bases if nmf_bases is not None else _draw_bases(fold_keys(keys, index), nmf_bases_shape(model))
        window_logits = _network_logits(graphdef, state, images[:, y1:y2, x1:x2], bases)
        total = _accumulate(total, window_logits, y1, x1)
        count[y1:y2, x1:x2] += 1
    return _finish(total, jnp.asarray(count), (h, w), flip, output_size)


def infer_logits(
    model: nnx.Module,
    images: jax.Array,
    *,
    mode: str = "whole",
    crop_size: tuple[int, int] | None = None,
    stride: tuple[int, int] | None = None,
    output_size: tuple[int, int] | None = None,
    size_divisor: int | None = SIZE_DIVISOR,
    key: jax.Array | None = None,
    nmf_bases: jax.Array | None = None,
) -> jax.Array:
    """Logits (N, H_out, W_out, K) float32 of normalised float32 `images` (N, H, W, 3) as mmseg's test step.

    `mode` 'whole' or 'slide' (needs `crop_size` and `stride`, (height, width)); `output_size` (default (H, W)) is
    the size the logits are resized to, e.g. the original image's before the test resize; `size_divisor` pads the
    input to a multiple of it (None: no padding, as configs without a data-preprocessor test_cfg). `key`: one PRNG
    key (per-image keys are derived) or one per image; `nmf_bases` (N*S, D, R) fixes the NMF bases of every call.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be (N, H, W, 3) normalised float32; got shape {images.shape}")
    return _infer(
        model,
        images,
        mode=mode,
        crop_size=crop_size,
        stride=stride,
        output_size=output_size,
        size_divisor=size_divisor,
        keys=image_keys(key, images.shape[0]),
        nmf_bases=nmf_bases,
        flip=False,
    )


def network_input_size(
    height: int, width: int, ratio: float = 1.0, test_scale: tuple[int, int] | None = None
) -> tuple[int, int]:
    """Network input size (height, width) of an image for one test-time scale `ratio`.

    Without `test_scale` it is mmseg 1.x's `Resize(scale_factor=ratio, keep_ratio=True)` of the image itself (the
    `tta_pipeline`); with `test_scale` (long, short) it is the keep-ratio resize into `test_scale` * `ratio`, as the
    single-scale test pipeline (ratio 1) and the official SegNeXt's `MultiScaleFlipAug(img_ratios=...)`.
    """
    if test_scale is None:
        bound = (int(width * ratio + 0.5), int(height * ratio + 0.5))
    else:
        bound = (int(test_scale[0] * ratio), int(test_scale[1] * ratio))
    return keep_ratio_size(height, width, bound)


def network_input(
    images: np.ndarray, *, ratio: float = 1.0, flip: bool = False, test_scale: tuple[int, int] | None = None
) -> np.ndarray:
    """The reference's test preprocessing of uint8 RGB `images` (N, H, W, 3) for one augmentation: keep-ratio resize
    to `network_input_size` (OpenCV bilinear, mmseg's `Resize`), optional horizontal flip, then normalisation;
    float32, unpadded (`infer_logits` pads to a multiple of 32, as mmseg's `SegDataPreProcessor`)."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be (N, H, W, 3) uint8 RGB; got {images.dtype} {images.shape}")
    size = network_input_size(*images.shape[1:3], ratio, test_scale)
    if size != images.shape[1:3]:
        images = np.stack([resize(image, None, size)[0] for image in images])
    if flip:
        images = images[:, :, ::-1]
    return normalize(images)


def infer_augmented_logits(
    model: nnx.Module,
    images: np.ndarray,
    *,
    ratio: float = 1.0,
    flip: bool = False,
    test_scale: tuple[int, int] | None = None,
    output_size: tuple[int, int] | None = None,
    mode: str = "whole",
    crop_size: tuple[int, int] | None = None,
    stride: tuple[int, int] | None = None,
    size_divisor: int | None = SIZE_DIVISOR,
    key: jax.Array | None = None,
    nmf_bases: jax.Array | None = None,
) -> jax.Array:
    """Logits (N, H_out, W_out, K) of uint8 RGB `images` (N, H, W, 3) through the reference's test pipeline for one
    augmentation: `network_input` (resize, optional horizontal flip, normalisation), then as `infer_logits`; the
    output size defaults to the images' own (H, W)."""
    inputs = network_input(images, ratio=ratio, flip=flip, test_scale=test_scale)
    n, h, w = np.shape(images)[:3]
    return _infer(
        model,
        inputs,
        mode=mode,
        crop_size=crop_size,
        stride=stride,
        output_size=(h, w) if output_size is None else output_size,
        size_divisor=size_divisor,
        keys=image_keys(key, n),
        nmf_bases=nmf_bases,
        flip=flip,
    )


def infer_multiscale(
    model: nnx.Module,
    images: np.ndarray,
    *,
    scales: tuple[float, ...] = MS_SCALES,
    flip: bool = True,
    key: jax.Array | None = None,
    **options,
) -> jax.Array:
    """Class probabilities (N, H_out, W_out, K) of uint8 RGB `images` (N, H, W, 3) averaged over test-time
    augmentations, as mmseg's `SegTTAModel`: the mean of softmax(logits) over every scale ratio, each without and
    (if `flip`) with a horizontal flip. `options` are `infer_augmented_logits`'s (test_scale, output_size, mode,
    crop_size, stride, size_divisor, nmf_bases). Augmentation a (scale-major, unflipped first) uses per-image keys
    folded with a."""
    keys = image_keys(key, np.shape(images)[0])
    augmentations = [(ratio, flipped) for ratio in scales for flipped in ((False, True) if flip else (False,))]
    total = None
    for index, (ratio, flipped) in enumerate(augmentations):
        logits = infer_augmented_logits(model, images, ratio=ratio, flip=flipped, key=fold_keys(keys, index), **options)
        probs = jax.nn.softmax(logits, axis=-1)
        total = probs if total is None else total + probs
    return total / len(augmentations)


def _bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each output index of a bilinear resize with align_corners=False (as `resize_bilinear`, PyTorch's rule):
    the two input indices it interpolates and the weight of the second."""
    source = np.maximum((np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5, 0.0)
    first = np.minimum(np.floor(source).astype(np.int32), in_size - 1)
    return first, np.minimum(first + 1, in_size - 1), (source - first).astype(np.float32)


@functools.partial(jax.jit, static_argnums=(2,))
def _band(logits: tuple[jax.Array, ...], taps: tuple[tuple[jax.Array, ...], ...], average_probs: bool):
    """Scores (N, R, W, K) of R output rows and their argmax (N, R) int32: every augmentation's network-size logits
    (N, h, w, K) resized bilinearly by its taps (rows, then columns); one augmentation's logits are kept, several
    augmentations' softmax probabilities averaged."""
    total = 0.0
    for x, (row0, row1, row_weight, col0, col1, col_weight) in zip(logits, taps, strict=True):
        row_weight, col_weight = row_weight[None, :, None, None], col_weight[None, None, :, None]
        rows = x[:, row0] * (1 - row_weight) + x[:, row1] * row_weight
        band = rows[:, :, col0] * (1 - col_weight) + rows[:, :, col1] * col_weight
        total = total + (jax.nn.softmax(band, axis=-1) if average_probs else band)
    scores = total / len(logits) if average_probs else total
    return scores, jnp.argmax(scores, axis=-1).astype(jnp.int32)


def infer_labels(
    model: nnx.Module,
    images: np.ndarray,
    *,
    scales: tuple[float, ...] = (1.0,),
    flip: bool = False,
    key: jax.Array | None = None,
    on_scores: Callable[[int, np.ndarray], None] | None = None,
    band_bytes: int = BAND_BYTES,
    **options,
) -> np.ndarray:
    """Label maps (N, H, W) int32 of uint8 RGB `images` (N, H, W, 3) at their own size, in bounded memory.

    With several augmentations (`flip`, or more than one of `scales`) they are the argmax of `infer_multiscale`'s
    probabilities, else of `infer_augmented_logits(ratio=scales[0])`'s logits, with the same keys (up to float
    rounding: the resize back is computed by row bands of about `band_bytes` of scores). `on_scores(first_row,
    scores)`, if given, receives those probabilities or logits band after band, top to bottom, as float32
    (N, rows, W, K). `options` are `infer_augmented_logits`'s (test_scale, mode, crop_size, stride, size_divisor,
    nmf_bases), except output_size.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be (N, H, W, 3) uint8 RGB; got {images.dtype} {images.shape}")
    n, height, width, _ = images.shape
    keys = image_keys(key, n)
    augmentations = [(ratio, flipped) for ratio in scales for flipped in ((False, True) if flip else (False,))]
    average_probs = len(augmentations) > 1
    logits, row_taps, column_taps = [], [], []
    for index, (ratio, flipped) in enumerate(augmentations):
        size = network_input_size(height, width, ratio, options.get("test_scale"))
        augmentation_keys = fold_keys(keys, index) if average_probs else keys
        logits.append(
            infer_augmented_logits(
                model, images, ratio=ratio, flip=flipped, output_size=size, key=augmentation_keys, **options
            )
        )
        row_taps.append(_bilinear_taps(size[0], height))
        column_taps.append(_bilinear_taps(size[1], width))
    num_classes = logits[0].shape[-1]
    band_rows = int(np.clip(band_bytes // (4 * n * width * num_classes), 1, height))
    labels = np.empty((n, height, width), np.int32)
    for start in range(0, height, band_rows):
        stop = min(start + band_rows, height)
        rows = np.minimum(np.arange(start, start + band_rows), height - 1)  # the last band repeats its last row
        taps = tuple(
            (*(tap[rows] for tap in row_tap), *column_tap)
            for row_tap, column_tap in zip(row_taps, column_taps, strict=True)
        )
        scores, band_labels = _band(tuple(logits), taps, average_probs)
        labels[:, start:stop] = np.asarray(band_labels)[:, : stop - start]
        if on_scores is not None:
            on_scores(start, np.asarray(scores)[:, : stop - start])
    return labels
