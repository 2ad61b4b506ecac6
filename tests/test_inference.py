"""Whole, sliding-window and multi-scale + flip inference equal MMSegmentation 1.2.2's test step.

The reference is mmseg's own `EncoderDecoder` (with its `SegDataPreProcessor` padding to a multiple of 32),
`test_step` and `SegTTAModel` fed by mmseg's `TestTimeAug` pipeline; both sides use the same NMF bases.
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from mmengine.config import ConfigDict
from oracle import REFERENCE_VARIANTS, build_reference, fix_reference_bases, import_mmseg, reference_state_dict

from segnext_jax import models
from segnext_jax.data.transforms import normalize
from segnext_jax.evaluation import inference
from segnext_jax.models.layers import resize_bilinear
from segnext_jax.serving.pytorch import load_state_dict

NUM_CLASSES = 7
RTOL = 2e-5
TINY = models.Variant((32, 32, 64, 64), (1, 1, 1, 1), 0.1, 64, 8)


def relative_error(ours, reference) -> float:
    ours, reference = np.asarray(ours), np.asarray(reference)
    assert ours.shape == reference.shape
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def reference_segmentor(variant: str, test_cfg: dict):
    """mmseg's EncoderDecoder (+ data preprocessor) holding the oracle's random weights; and our model with them."""
    import_mmseg()
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS

    init_default_scope("mmseg")
    embed_dims, depths, channels, rank = REFERENCE_VARIANTS[variant]
    backbone, head = build_reference(variant, NUM_CLASSES, seed=3)
    segmentor = MODELS.build(
        dict(
            type="EncoderDecoder",
            data_preprocessor=dict(
                type="SegDataPreProcessor",
                mean=[123.675, 116.28, 103.53],
                std=[58.395, 57.12, 57.375],
                bgr_to_rgb=False,  # images are given as RGB here
                pad_val=0,
                seg_pad_val=255,
                test_cfg=dict(size_divisor=32),
            ),
            backbone=dict(type="MSCAN", embed_dims=embed_dims, depths=depths, mlp_ratios=[8, 8, 4, 4]),
            decode_head=dict(
                type="LightHamHead",
                in_channels=embed_dims[1:],
                in_index=[1, 2, 3],
                channels=channels,
                ham_channels=channels,
                num_classes=NUM_CLASSES,
                norm_cfg=dict(type="GN", num_groups=32, requires_grad=True),
                ham_kwargs=dict(MD_S=1, MD_R=rank, train_steps=6, eval_steps=7, inv_t=100, rand_init=True),
            ),
            test_cfg=ConfigDict(test_cfg),
        )
    )
    segmentor.backbone.load_state_dict(backbone.state_dict())
    segmentor.decode_head.load_state_dict(head.state_dict())
    segmentor.eval()
    model = models.create(variant, NUM_CLASSES, rngs=nnx.Rngs(0), depthwise_impl="xla")
    load_state_dict(model, reference_state_dict(backbone, head))
    model.eval()
    return segmentor, model


def fixed_bases(batch: int, variant: str) -> torch.Tensor:
    _, _, channels, rank = REFERENCE_VARIANTS[variant]
    return F.normalize(torch.rand(batch, channels, rank, generator=torch.Generator().manual_seed(5)), dim=1)


@contextlib.contextmanager
def one_torch_thread():
    """PyTorch on one thread: on 2 busy cores (pytest -n 2) its 2-thread kernels ran 15x slower, spinning."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def reference_test_step(segmentor, images: np.ndarray, ori_shape: tuple[int, int]) -> np.ndarray:
    """seg_logits (N, H, W, K) of mmseg's test_step on uint8 RGB images (N, h, w, 3) resized from `ori_shape`."""
    from mmseg.structures import SegDataSample

    inputs = [torch.from_numpy(image).permute(2, 0, 1).contiguous() for image in images]
    samples = [SegDataSample(metainfo=dict(ori_shape=ori_shape, img_shape=image.shape[:2])) for image in images]
    with torch.no_grad(), one_torch_thread():
        results = segmentor.test_step(dict(inputs=inputs, data_samples=samples))
    return np.stack([r.seg_logits.data.permute(1, 2, 0).numpy() for r in results])


@pytest.fixture(scope="module")
def tiny_variant():
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(models.VARIANTS, "tiny", TINY)
        patch.setitem(REFERENCE_VARIANTS, "tiny", (list(TINY.embed_dims), list(TINY.depths), 64, 8))
        yield "tiny"


@pytest.fixture(scope="module")
def t_pair():
    """SegNeXt-T as mmseg's segmentor and as ours, with the same weights."""
    return reference_segmentor("t", dict(mode="whole"))


def uint8_images(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, shape).astype(np.uint8)


def test_whole_matches_reference(t_pair):
    """60 x 50 images padded to 64 x 64, logits cropped and resized to a 75 x 41 original size."""
    segmentor, model = t_pair
    segmentor.test_cfg = ConfigDict(mode="whole")
    images = uint8_images((2, 60, 50, 3), seed=0)
    bases = fixed_bases(2, "t")
    fix_reference_bases(segmentor.decode_head, bases)
    expected = reference_test_step(segmentor, images, (75, 41))
    ours = inference.infer_logits(
        model, jnp.asarray(normalize(images)), output_size=(75, 41), nmf_bases=jnp.asarray(bases.numpy())
    )
    assert relative_error(ours, expected) <= RTOL


def test_slide_matches_reference(t_pair):
    """70 x 100 images padded to 96 x 128; 64 x 64 windows every 24 px, the last row and column moved back."""
    segmentor, model = t_pair
    segmentor.test_cfg = ConfigDict(mode="slide", crop_size=(64, 64), stride=(24, 24))
    images = uint8_images((2, 70, 100, 3), seed=1)
    assert len(inference.slide_windows((96, 128), (64, 64), (24, 24))) == 12
    bases = fixed_bases(2, "t")
    fix_reference_bases(segmentor.decode_head, bases)
    expected = reference_test_step(segmentor, images, (70, 100))
    ours = inference.infer_logits(
        model,
        jnp.asarray(normalize(images)),
        mode="slide",
        crop_size=(64, 64),
        stride=(24, 24),
        nmf_bases=jnp.asarray(bases.numpy()),
    )
    assert relative_error(ours, expected) <= RTOL


def test_multiscale_flip_matches_reference_tta(tiny_variant):
    """mmseg's TestTimeAug (Resize(scale_factor=r, keep_ratio=True) x RandomFlip) and SegTTAModel's merge."""
    from mmengine.registry import init_default_scope
    from mmseg.models.segmentors import SegTTAModel
    from mmseg.registry import TRANSFORMS

    segmentor, model = reference_segmentor(tiny_variant, dict(mode="whole"))
    bases = fixed_bases(1, tiny_variant)
    fix_reference_bases(segmentor.decode_head, bases)
    ratios = (1.0, 0.75)  # 50 x 60 and 38 x 45: both padded to 64 x 64, one compiled shape
    image = uint8_images((1, 50, 60, 3), seed=2)
    init_default_scope("mmseg")
    pipeline = TRANSFORMS.build(
        dict(
            type="TestTimeAug",
            transforms=[
                [dict(type="Resize", scale_factor=r, keep_ratio=True) for r in ratios],
                [dict(type="RandomFlip", prob=0.0, direction="horizontal"), dict(type="RandomFlip", prob=1.0)],
                [dict(type="PackSegInputs")],
            ],
        )
    )
    augmented = pipeline(dict(img=image[0], img_path="image.png", ori_shape=(50, 60), img_shape=(50, 60)))
    data = {name: [[item] for item in items] for name, items in augmented.items()}
    with torch.no_grad(), one_torch_thread():
        per_augmentation = [segmentor.test_step({k: v[i] for k, v in data.items()})[0] for i in range(4)]
        merged = SegTTAModel(module=segmentor).test_step(data)[0].pred_sem_seg.data[0].numpy()
    expected = np.mean([r.seg_logits.data.softmax(0).permute(1, 2, 0).numpy() for r in per_augmentation], axis=0)

    probs = inference.infer_multiscale(model, image, scales=ratios, flip=True, nmf_bases=jnp.asarray(bases.numpy()))
    assert probs.shape == (1, 50, 60, NUM_CLASSES)
    np.testing.assert_allclose(probs[0], expected, atol=1e-5)
    top2 = np.sort(np.asarray(probs[0]), axis=-1)[..., -2:]
    decided = top2[..., 1] - top2[..., 0] > 1e-4  # pixels whose argmax rounding cannot flip
    assert decided.mean() > 0.9
    np.testing.assert_array_equal(np.argmax(probs[0], -1)[decided], merged[decided])


def test_network_input_size_follows_both_resize_rules():
    # mmseg 1.x tta_pipeline: Resize(scale_factor=0.75, keep_ratio=True) of a 375 x 500 image -> bound (375, 281).
    assert inference.network_input_size(375, 500, 0.75) == (281, 375)
    # test pipeline Resize(scale=(2048, 512), keep_ratio=True) and the official img_ratios on top of it.
    assert inference.network_input_size(375, 500, 1.0, (2048, 512)) == (512, 683)
    assert inference.network_input_size(375, 500, 0.5, (2048, 512)) == (256, 341)


def test_seeded_inference_is_the_models_own_logits_and_batch_independent(tiny_variant):
    """infer_logits(key) = the model's logits with the documented per-image bases, resized to the input size; an
    image alone (batch 1, the TTA test's compiled shape) gets what it gets inside a batch of 2."""
    model = models.create(tiny_variant, NUM_CLASSES, rngs=nnx.Rngs(1), depthwise_impl="xla")
    model.eval()
    images = jnp.asarray(np.random.RandomState(3).randn(2, 64, 64, 3).astype(np.float32))
    key = jax.random.key(11)
    keys = inference.image_keys(key, 2)
    splits, dim, rank = inference.nmf_bases_shape(model)
    bases = jnp.concatenate([models.draw_nmf_bases(jax.random.fold_in(k, 0), 1, dim, rank, splits) for k in keys])

    expected = nnx.jit(lambda m, x, b: resize_bilinear(m(x, nmf_bases=b), (64, 64)))(model, images, bases)
    first = inference.infer_logits(model, images[:1], key=key)  # one key: image n uses fold_in(key, n)
    second = inference.infer_logits(model, images[1:], key=keys[1:])  # or one key per image
    np.testing.assert_allclose(np.concatenate([first, second]), expected, rtol=1e-6, atol=1e-6)
    other_seed = inference.infer_logits(model, images[:1], key=jax.random.key(12))
    assert not np.allclose(other_seed, first, atol=1e-3)


def test_labels_by_row_bands_equal_the_argmax_of_full_size_scores(tiny_variant, monkeypatch):
    """infer_labels: 50 x 70 images, test scale (64, 32) (network inputs 32 x 45, then 24 x 34 and 32 x 45 for
    ratios 0.75 and 1): full-size scores never exist, only bands of 7 rows (the last one padded); the bands handed
    out are the full-size logits (one augmentation) or probabilities (multi-scale + flip)."""
    model = models.create(tiny_variant, NUM_CLASSES, rngs=nnx.Rngs(1), depthwise_impl="xla")
    model.eval()
    images = uint8_images((2, 50, 70, 3), seed=4)
    band_shapes, band = [], inference._band

    def band_spy(logits, taps, average_probs):
        scores, labels = band(logits, taps, average_probs)
        band_shapes.append(scores.shape)
        return scores, labels

    monkeypatch.setattr(inference, "_band", band_spy)
    key, options = jax.random.key(5), dict(test_scale=(64, 32))
    multiscale = dict(scales=(0.75, 1.0), flip=True)
    full = [
        (dict(), inference.infer_augmented_logits(model, images, key=key, **options)),
        (multiscale, inference.infer_multiscale(model, images, key=key, **multiscale, **options)),
    ]
    bands = []
    for augmentation, expected in full:
        band_shapes.clear()
        bands.clear()
        labels = inference.infer_labels(
            model,
            images,
            key=key,
            band_bytes=4 * 2 * 70 * NUM_CLASSES * 7,
            on_scores=lambda first_row, scores: bands.append((first_row, scores)),
            **augmentation,
            **options,
        )
        assert set(band_shapes) == {(2, 7, 70, NUM_CLASSES)} and len(band_shapes) == 8
        assert [first_row for first_row, _ in bands] == list(range(0, 50, 7)) and bands[-1][1].shape[1] == 1
        scores = np.concatenate([scores for _, scores in bands], axis=1)
        np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(labels, np.argmax(scores, -1))
        top2 = np.sort(np.asarray(expected), axis=-1)[..., -2:]
        decided = top2[..., 1] - top2[..., 0] > 1e-5  # pixels whose argmax rounding cannot flip
        assert decided.mean() > 0.99
        np.testing.assert_array_equal(labels[decided], np.argmax(expected, -1)[decided])


def test_bad_arguments_are_one_line_errors(tiny_variant):
    model = models.create(tiny_variant, NUM_CLASSES, rngs=nnx.Rngs(1), depthwise_impl="xla")
    images = jnp.zeros((1, 32, 32, 3))
    with pytest.raises(ValueError, match="crop_size and stride"):
        inference.infer_logits(model, images, mode="slide")
    with pytest.raises(ValueError, match="choose one of whole, slide"):
        inference.infer_logits(model, images, mode="tiles")
    with pytest.raises(ValueError, match="uint8"):
        inference.infer_multiscale(model, np.zeros((1, 32, 32, 3), np.float32))
