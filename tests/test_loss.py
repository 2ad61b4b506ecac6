"""The loss against the reference decode head's `loss_by_feat` (resize + CrossEntropyLoss of the config)."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from reference_segnext import build, segnext_config

from segnext_jax.training.loss import segmentation_loss, upsample_bilinear

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


@pytest.mark.parametrize("which", ["batch", "batch_integer_scale"])
def test_loss_and_gradient_equal_mmseg(head, which, request):
    logits, labels = request.getfixturevalue(which)
    expected, expected_grad = reference_loss_and_grad(head, logits, labels)
    loss, grad = jax.jit(jax.value_and_grad(segmentation_loss))(jnp.asarray(logits), jnp.asarray(labels))
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), expected_grad, rtol=1e-5, atol=1e-9)


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
    ours = upsample_bilinear(jnp.asarray(x), factors)
    np.testing.assert_allclose(np.asarray(ours), expected.permute(0, 2, 3, 1).numpy(), rtol=1e-6, atol=1e-6)
