"""The loss against the reference decode head's `loss_by_feat` (resize + CrossEntropyLoss of the config), in both
implementations (XLA's, and the native CPU kernels), under sharding too."""

import copy
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from reference_segnext import build, segnext_config

from segnext_jax.training.loss import neighbour_views, resolve_impl, segmentation_loss, upsampled_phases

NUM_CLASSES = 5


@pytest.fixture(scope="module")
def head():
    cfg = copy.deepcopy(segnext_config().model.decode_head)
    cfg.num_classes = NUM_CLASSES
    return build(cfg)


def reference_loss_and_grad(head, logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """mmseg's loss (and its gradient) for NHWC `logits` and (N, H, W) `labels`."""
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    samples = [SegDataSample(gt_sem_seg=PixelData(data=torch.from_numpy(label[None]).long())) for label in labels]
    seg_logits = torch.from_numpy(logits.transpose(0, 3, 1, 2).copy()).requires_grad_()
    loss = head.loss_by_feat(seg_logits, samples)["loss_ce"]
    loss.backward()
    return loss.item(), seg_logits.grad.numpy().transpose(0, 2, 3, 1)


def random_batch(seed: int, logits_size: tuple[int, int], labels_size: tuple[int, int]):
    """Two images of random logits and labels, about a fifth of the pixels ignored (255)."""
    rng = np.random.default_rng(seed)
    logits = (3 * rng.standard_normal((2, *logits_size, NUM_CLASSES))).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, (2, *labels_size)).astype(np.int32)
    labels[rng.random(labels.shape) < 0.2] = 255
    return logits, labels


@pytest.fixture(scope="module")
def batch():
    """Odd sizes (9x13 logits, 67x101 labels): a non-integer scale, through jax.image.resize."""
    return random_batch(0, (9, 13), (67, 101))


@pytest.fixture(scope="module")
def batch_integer_scale():
    """Labels 8x the logits' size in both directions, as for training crops (the fused path)."""
    return random_batch(1, (5, 7), (40, 56))


def loss_and_grad(logits, labels, impl: str):
    return jax.jit(jax.value_and_grad(segmentation_loss), static_argnums=(2, 3))(
        jnp.asarray(logits), jnp.asarray(labels), 255, impl
    )


@pytest.mark.parametrize("impl", ["xla", "native"])
@pytest.mark.parametrize("which", ["batch", "batch_integer_scale"])
def test_loss_and_gradient_equal_mmseg(head, which, impl, request):
    logits, labels = request.getfixturevalue(which)
    expected, expected_grad = reference_loss_and_grad(head, logits, labels)
    loss, grad = loss_and_grad(logits, labels, impl)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), expected_grad, rtol=1e-5, atol=1e-9)


def test_native_is_the_cpu_default():
    assert resolve_impl("auto") == "native"
    with pytest.raises(ValueError, match="loss impl='cuda'"):
        resolve_impl("cuda")


def test_native_with_many_classes_and_downsampling_equals_mmseg(head):
    """150 classes (whole SIMD vectors and a tail), labels smaller than the logits in one direction, uint8 labels."""
    rng = np.random.default_rng(3)
    logits = (2 * rng.standard_normal((2, 6, 16, 150))).astype(np.float32)
    labels = rng.integers(0, 150, (2, 21, 11)).astype(np.uint8)
    labels[:, :3] = 255
    wide = copy.deepcopy(head)
    wide.num_classes = 150
    expected, expected_grad = reference_loss_and_grad(wide, logits, labels.astype(np.int64))
    loss, grad = loss_and_grad(logits, labels, "native")
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), expected_grad, rtol=1e-5, atol=1e-9)


def test_native_with_every_pixel_ignored_is_zero(batch_integer_scale):
    logits, labels = batch_integer_scale
    loss, grad = loss_and_grad(logits, np.full_like(labels, 255), "native")
    assert float(loss) == 0.0 and not np.any(np.asarray(grad))


@pytest.mark.parametrize("bad_label", [NUM_CLASSES, -1])
def test_native_rejects_labels_that_are_not_classes(batch_integer_scale, bad_label):
    logits, labels = batch_integer_scale
    labels = labels.copy()
    labels[1, 3, 4] = bad_label
    with pytest.raises(Exception, match=re.escape("neither a class in [0, 5) nor ignore_index 255")):
        jax.block_until_ready(loss_and_grad(logits, labels, "native"))


def test_native_propagates_nan_logits(batch_integer_scale):
    """A NaN in any class of a labelled pixel's logits makes the loss NaN, as XLA's does (divergence stays visible)."""
    logits, labels = batch_integer_scale
    logits = logits.copy()
    logits[0, 2, 3, 1] = np.nan
    for impl in ("xla", "native"):
        assert np.isnan(float(loss_and_grad(logits, labels, impl)[0])), impl


def test_native_under_a_batch_sharded_jit_equals_one_device():
    from jax.sharding import NamedSharding, PartitionSpec

    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rng = np.random.default_rng(4)
    logits = jnp.asarray(rng.standard_normal((8, 4, 5, NUM_CLASSES)).astype(np.float32))
    labels = jnp.asarray(rng.integers(0, NUM_CLASSES, (8, 32, 40)).astype(np.int32))
    step = jax.jit(jax.value_and_grad(lambda x, y: segmentation_loss(x, y, impl="native")))
    expected = step(logits, labels)
    batch = NamedSharding(mesh, PartitionSpec("data"))
    sharded_args = jax.device_put(logits, batch), jax.device_put(labels, batch)
    sharded = step(*sharded_args)
    np.testing.assert_allclose(float(sharded[0]), float(expected[0]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(sharded[1]), np.asarray(expected[1]), rtol=1e-6, atol=1e-9)
    # each device runs the kernels on its own image, not on a gathered batch
    program = step.lower(*sharded_args).compile().as_text()
    assert len(re.findall(r"custom_call_target=\"segnext_upsampled_cross_entropy", program)) == 2
    assert "all-gather" not in program
    assert set(re.findall(r"f32\[(\d+),4,5,5\]", program)) == {"1"}


def test_bfloat16_logits_are_computed_in_float32(head, batch):
    logits, labels = batch
    rounded = np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32))
    expected, _ = reference_loss_and_grad(head, rounded, labels)
    loss = jax.jit(segmentation_loss)(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(labels))
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6)


@pytest.mark.parametrize("factors", [(8, 8), (3, 2), (1, 4)])
def test_integer_upsampling_equals_torch_interpolate(factors):
    x = np.random.default_rng(2).standard_normal((2, 4, 6, 3)).astype(np.float32)
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(x).permute(0, 3, 1, 2), scale_factor=factors, mode="bilinear", align_corners=False
    )
    phases = np.asarray(upsampled_phases(neighbour_views(jnp.asarray(x)), factors))  # (fh * fw, N, h, w, K)
    n, h, w, k = x.shape
    phases = phases.reshape(*factors, n, h, w, k)
    ours = phases.transpose(2, 3, 0, 4, 1, 5).reshape(n, h * factors[0], w * factors[1], k)
    np.testing.assert_allclose(ours, expected.permute(0, 2, 3, 1).numpy(), rtol=1e-6, atol=1e-6)
