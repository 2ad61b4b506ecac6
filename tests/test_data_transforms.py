"""Each deterministic transform of segnext_jax.data.transforms against MMSegmentation 1.2.2 / mmcv 2.1.

The reference draws from numpy's global RNG; the tests replace those draws by scripted values and give ours a
scripted generator with the same values, then require identical outputs (bit-exact: both sides call the same OpenCV
functions; the reference works on BGR, ours on RGB, compared after flipping the channel order).
"""

import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from oracle import import_mmseg

from segnext_jax.data import transforms
from segnext_jax.evaluation import inference

MEAN = [123.675, 116.28, 103.53]
STD = [58.395, 57.12, 57.375]


@pytest.fixture(scope="module")
def mm():
    """The reference transform modules."""
    import_mmseg()
    import mmcv.transforms as mmcv_transforms
    from mmseg.datasets import transforms as mmseg_transforms
    from mmseg.models.data_preprocessor import SegDataPreProcessor

    return {"mmcv": mmcv_transforms, "mmseg": mmseg_transforms, "preprocessor": SegDataPreProcessor}


def _channel(args: tuple) -> str:
    """The scripted queue an integer draw reads: coin flips (one argument), hue shifts (negative low) or offsets."""
    if len(args) == 1 or args[1] is None:
        return "coin"
    return "hue" if args[0] < 0 else "offset"


class ScriptedRng:
    """Stands in for np.random.Generator: scripted values in call order, integers split by `_channel`."""

    def __init__(self, random=(), coin=(), offset=(), hue=(), uniform=()):
        self.queues = {"random": list(random), "coin": list(coin), "offset": list(offset), "hue": list(hue)}
        self.queues["uniform"] = list(uniform)

    def random(self):
        return self.queues["random"].pop(0)

    def integers(self, low, high=None):
        return self.queues[_channel((low, high))].pop(0)

    def uniform(self, low, high):
        return self.queues["uniform"].pop(0)


class ScriptedNumpyRandom:
    """Replaces the numpy.random functions the reference calls with the same kind of scripts as `ScriptedRng`."""

    def __init__(self, monkeypatch, coin=(), offset=(), hue=(), uniform=(), random_sample=(), choice=()):
        self.queues = {"coin": list(coin), "offset": list(offset), "hue": list(hue), "uniform": list(uniform)}
        self.queues.update(random_sample=list(random_sample), choice=list(choice))
        monkeypatch.setattr(np.random, "randint", lambda *args: self.queues[_channel(args)].pop(0))
        for name in ("uniform", "random_sample", "choice"):
            monkeypatch.setattr(np.random, name, self._pop(name))

    def _pop(self, name):
        return lambda *args, **kwargs: self.queues[name].pop(0)

    def exhausted(self) -> bool:
        return not any(self.queues.values())


def _image(seed: int, height: int, width: int) -> np.ndarray:
    """A smooth-plus-noise RGB test image (exercises interpolation with non-trivial gradients)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = 128 + 90 * np.sin(xx[..., None] / 7.0 + yy[..., None] / 11.0 + np.arange(3))
    return np.clip(base + rng.normal(0, 25, (height, width, 3)), 0, 255).astype(np.uint8)


def _label(seed: int, height: int, width: int, num_classes: int = 6) -> np.ndarray:
    """Blocky labels with some 255 pixels."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, num_classes, (height // 8 + 1, width // 8 + 1)).astype(np.uint8)
    label = np.kron(blocks, np.ones((8, 8), np.uint8))[:height, :width]
    label[rng.random((height, width)) < 0.05] = 255
    return label


def _bgr(rgb: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(rgb[..., ::-1])


@pytest.mark.parametrize(
    "shape, scale",
    [
        ((67, 91), (160, 48)),
        ((120, 45), (100, 100)),
        ((64, 64), (37, 211)),
        ((50, 150), (512, 128)),
        ((52, 77), (100, 100)),
    ],  # the last rounds 67.53 up to 68 rows
)
def test_keep_ratio_resize_equals_mmseg_resize(mm, shape, scale):
    image, label = _image(0, *shape), _label(1, *shape)
    ref = mm["mmseg"].Resize(scale=scale, keep_ratio=True)(
        {"img": _bgr(image), "gt_seg_map": label.copy(), "seg_fields": ["gt_seg_map"]}
    )
    size = transforms.keep_ratio_size(*shape, scale)
    ours_image, ours_label = transforms.resize(image, label, size)
    assert ours_image.shape[:2] == ref["img"].shape[:2] == size
    np.testing.assert_array_equal(ours_image, ref["img"][..., ::-1])
    np.testing.assert_array_equal(ours_label, ref["gt_seg_map"])


@pytest.mark.parametrize("ratio", [0.0, 0.37, 0.999])
def test_random_resize_equals_mmcv_random_resize(mm, monkeypatch, ratio):
    image, label = _image(2, 70, 100), _label(3, 70, 100)
    ScriptedNumpyRandom(monkeypatch, random_sample=[ratio])
    ref = mm["mmcv"].RandomResize(scale=(160, 40), ratio_range=(0.5, 2.0), keep_ratio=True)(
        {"img": _bgr(image), "gt_seg_map": label.copy()}
    )
    ours_image, ours_label = transforms.random_resize(image, label, (160, 40), (0.5, 2.0), ScriptedRng(random=[ratio]))
    np.testing.assert_array_equal(ours_image, ref["img"][..., ::-1])
    np.testing.assert_array_equal(ours_label, ref["gt_seg_map"])


def _three_quarters_label(height: int, width: int) -> np.ndarray:
    """Columns repeating 30 x class 0, 10 x class 1: every 40-wide crop has exactly cat_max_ratio 0.75 (rejected)."""
    return np.tile((np.arange(width) % 40 >= 30).astype(np.uint8), (height, 1))


def _dominated_label(height: int, width: int) -> np.ndarray:
    """Mostly class 0, a band of class 1 at the bottom, a column of ignore: most crops fail cat_max_ratio."""
    label = np.zeros((height, width), np.uint8)
    label[int(height * 0.8) :, :] = 1
    label[:, :5] = 255
    return label


@pytest.mark.parametrize(
    "shape, crop_size, cat_max_ratio, seed, make_label",
    [
        ((96, 80), (40, 40), 0.75, 0, _dominated_label),
        ((96, 80), (40, 40), 0.75, 1, _dominated_label),
        ((96, 80), (64, 32), 0.9, 2, _dominated_label),
        ((96, 80), (40, 40), 1.0, 3, _dominated_label),
        ((30, 50), (40, 40), 0.75, 4, _dominated_label),
        ((50, 120), (40, 40), 0.75, 5, _three_quarters_label),
    ],
)
def test_random_crop_equals_mmseg_with_scripted_offsets(
    mm, monkeypatch, shape, crop_size, cat_max_ratio, seed, make_label
):
    image, label = _image(seed, *shape), make_label(*shape)
    margins = (max(shape[0] - crop_size[0], 0) + 1, max(shape[1] - crop_size[1], 0) + 1)
    offsets = [int(v) % margins[i % 2] for i, v in enumerate(np.random.default_rng(seed).integers(0, 1000, 22))]
    numpy_random = ScriptedNumpyRandom(monkeypatch, offset=offsets)
    ref = mm["mmseg"].RandomCrop(crop_size=crop_size, cat_max_ratio=cat_max_ratio)(
        {"img": _bgr(image), "gt_seg_map": label.copy(), "seg_fields": ["gt_seg_map"]}
    )
    rng = ScriptedRng(offset=offsets)
    offset = transforms.choose_crop(label, crop_size, cat_max_ratio, rng)
    assert len(rng.queues["offset"]) == len(numpy_random.queues["offset"]) < 22  # same number of draws
    np.testing.assert_array_equal(transforms.crop(image, offset, crop_size), ref["img"][..., ::-1])
    np.testing.assert_array_equal(transforms.crop(label, offset, crop_size), ref["gt_seg_map"])


def test_random_flip_equals_mmseg(mm, monkeypatch):
    image, label = _image(5, 33, 47), _label(6, 33, 47)
    ref = mm["mmseg"].RandomFlip(prob=1.0)(
        {"img": _bgr(image), "gt_seg_map": label.copy(), "seg_fields": ["gt_seg_map"]}
    )
    ours_image, ours_label = transforms.random_flip(image, label, 0.5, ScriptedRng(random=[0.1]))
    np.testing.assert_array_equal(ours_image, ref["img"][..., ::-1])
    np.testing.assert_array_equal(ours_label, ref["gt_seg_map"])
    kept = transforms.random_flip(image, label, 0.5, ScriptedRng(random=[0.7]))
    assert kept[0] is image and kept[1] is label


@pytest.mark.parametrize(
    "op, value",
    [
        ("brightness", -20.5),
        ("brightness", 31.2),
        ("contrast", 0.6),
        ("contrast", 1.45),
        ("saturation", 0.55),
        ("saturation", 1.4),
        ("hue", -18),
        ("hue", 17),
        ("hue", 5),
    ],
)
def test_each_photometric_op_equals_mmseg(mm, monkeypatch, op, value):
    image = _image(7, 40, 52)
    image[:4, :4] = 0  # extremes exercise clipping and HSV edge cases
    image[-4:, -4:] = 255
    is_hue = op == "hue"
    ScriptedNumpyRandom(monkeypatch, coin=[1], hue=[value] if is_hue else [], uniform=[] if is_hue else [value])
    ref = getattr(mm["mmseg"].PhotoMetricDistortion(), op)(_bgr(image))
    ours = getattr(transforms, f"adjust_{op}")(image, value)
    np.testing.assert_array_equal(ours, ref[..., ::-1])


@pytest.mark.parametrize("contrast_first", [False, True])
def test_photometric_distortion_order_equals_mmseg(mm, monkeypatch, contrast_first):
    image = _image(8, 36, 44)
    params = transforms.PhotometricParams(
        brightness=12.5, contrast=1.3, contrast_first=contrast_first, saturation=0.7, hue=-9
    )
    # mmseg draws: brightness coin + delta, mode coin, [contrast coin + alpha], saturation coin + alpha, hue coin +
    # shift, [contrast coin + alpha]; mode 1 puts contrast first.
    coin = [1, int(contrast_first)] + ([1] if contrast_first else []) + [1, 1] + ([] if contrast_first else [1])
    uniform = [12.5] + ([1.3] if contrast_first else []) + [0.7] + ([] if contrast_first else [1.3])
    numpy_random = ScriptedNumpyRandom(monkeypatch, coin=coin, hue=[-9], uniform=uniform)
    ref = mm["mmseg"].PhotoMetricDistortion()({"img": _bgr(image)})["img"]
    assert numpy_random.exhausted()
    np.testing.assert_array_equal(transforms.apply_photometric(image, params), ref[..., ::-1])


def _reference_preprocess(mm, bgr_image: np.ndarray, label: np.ndarray, training: bool, size=None, divisor=None):
    """Packs an example and runs SegDataPreProcessor (normalise RGB, pad image 0 / label 255)."""
    from mmseg.datasets.transforms import PackSegInputs

    shape = bgr_image.shape[:2]
    packed = PackSegInputs()({"img": bgr_image, "gt_seg_map": label, "seg_fields": ["gt_seg_map"], "img_shape": shape})
    preprocessor = mm["preprocessor"](
        mean=MEAN,
        std=STD,
        bgr_to_rgb=True,
        pad_val=0,
        seg_pad_val=255,
        size=size,
        test_cfg={"size_divisor": divisor},
    )
    with torch.no_grad():
        out = preprocessor({"inputs": [packed["inputs"]], "data_samples": [packed["data_samples"]]}, training=training)
    return out["inputs"][0].permute(1, 2, 0).numpy(), out["data_samples"][0].gt_sem_seg.data[0].numpy()


def test_normalize_and_pad_equal_seg_data_preprocessor(mm):
    image, label = _image(9, 37, 50), _label(10, 37, 50)
    ref_image, ref_label = _reference_preprocess(mm, _bgr(image), label, training=True, size=(48, 64))
    ours_image, ours_label = transforms.pad(transforms.normalize(image), label, (48, 64))
    assert ours_image.dtype == np.float32 and ours_image.shape == (48, 64, 3)
    np.testing.assert_array_equal(ours_image, ref_image)
    np.testing.assert_array_equal(ours_label, ref_label)


def test_test_preprocessing_equals_mmseg_test_pipeline(mm):
    """Evaluation's and prediction's one preprocessing path, `inference.network_input`: mmseg's test Resize then
    SegDataPreProcessor (whose padding to a multiple of 32 the inference code does)."""
    image, label = _image(11, 75, 100), _label(12, 75, 100)
    resized = mm["mmseg"].Resize(scale=(160, 64), keep_ratio=True)({"img": _bgr(image)})["img"]
    ref_image, _ = _reference_preprocess(mm, resized, label, training=False, divisor=32)
    ours = inference.network_input(image[None], test_scale=(160, 64))[0]
    assert ours.shape == (64, 85, 3) and ref_image.shape == (64, 96, 3)  # the reference pads to a multiple of 32
    np.testing.assert_array_equal(ours, ref_image[: ours.shape[0], : ours.shape[1]])


@pytest.mark.parametrize("contrast_first, flip", [(False, True), (True, False)])
def test_train_transform_equals_mmseg_pipeline(mm, monkeypatch, contrast_first, flip):
    """RandomResize -> RandomCrop(cat_max_ratio) -> RandomFlip -> PhotoMetricDistortion -> SegDataPreProcessor."""
    from mmengine.dataset import Compose

    image, label = _image(13, 60, 90), _dominated_label(60, 90)
    crop_size, ratio, offsets = (48, 48), 0.2, [3, 17, 9, 2, 11, 30, 0, 0, 5, 5, 7, 1] + [0] * 10
    # Photometric: brightness -7.5, contrast 1.2 (first or last), saturation 1.3, no hue shift.
    ref_coin = [1, int(contrast_first)] + ([1] if contrast_first else []) + [1, 0] + ([] if contrast_first else [1])
    numpy_random = ScriptedNumpyRandom(
        monkeypatch,
        random_sample=[ratio],
        offset=offsets,
        coin=ref_coin,
        uniform=[-7.5, 1.2, 1.3] if contrast_first else [-7.5, 1.3, 1.2],
        choice=["horizontal" if flip else None],
    )
    pipeline = Compose(
        [
            mm["mmcv"].RandomResize(scale=(128, 48), ratio_range=(0.5, 2.0), keep_ratio=True),
            mm["mmseg"].RandomCrop(crop_size=crop_size, cat_max_ratio=0.75),
            mm["mmseg"].RandomFlip(prob=0.5),
            mm["mmseg"].PhotoMetricDistortion(),
        ]
    )
    ref = pipeline({"img": _bgr(image), "gt_seg_map": label.copy(), "seg_fields": ["gt_seg_map"]})
    assert not any(numpy_random.queues[name] for name in ("coin", "uniform", "random_sample", "choice"))
    ref_image, ref_label = _reference_preprocess(mm, ref["img"], ref["gt_seg_map"], training=True, size=crop_size)

    # Ours draws: ratio, crop offsets, flip, then brightness coin + delta, contrast_first coin, contrast coin +
    # alpha, saturation coin + alpha, hue coin.
    rng = ScriptedRng(
        random=[ratio, 0.1 if flip else 0.9],
        offset=offsets,
        coin=[1, int(contrast_first), 1, 1, 0],
        uniform=[-7.5, 1.2, 1.3],
    )
    ours_image, ours_label = transforms.train_transform(
        image, label, rng, crop_size=crop_size, scale=(128, 48), ratio_range=(0.5, 2.0), cat_max_ratio=0.75
    )
    assert len(rng.queues["offset"]) == len(numpy_random.queues["offset"]) < len(offsets) - 2  # it redrew
    np.testing.assert_array_equal(ours_image, ref_image)
    np.testing.assert_array_equal(ours_label, ref_label)
