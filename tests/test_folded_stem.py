"""The stem's W-folded computation (TPU's policy, `StemConv.lane_fold`) against the plain one, run on CPU: the same
outputs, parameter and input gradients, and BatchNorm statistics."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from segnext_jax import backend
from segnext_jax.models import mscan

FOLDED = dataclasses.replace(backend.policy_for("cpu"), fold_stem=True)


def loss_and_grads(graphdef, state, images):
    def loss(state, images):
        stem = nnx.merge(graphdef, state, copy=True)
        features = stem(images)
        return jnp.sum(features * jnp.cos(features)), (features, nnx.state(stem, nnx.BatchStat))

    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(state, images)


@pytest.mark.parametrize(
    ("channels", "shape", "fold"),
    [
        (64, (2, 64, 96, 3), 4),  # S, B, L: 32 then 64 channels
        (32, (1, 33, 48, 3), 8),  # T: 16 then 32; an odd height
        (64, (1, 32, 36, 3), 1),  # a width that the fold does not divide: the plain computation
    ],
)
def test_folded_stem_equals_the_plain_one(channels, shape, fold):
    stem = mscan.StemConv(3, channels, dtype=jnp.float32, rngs=nnx.Rngs(0))
    assert stem.lane_fold(shape[2]) == fold
    graphdef, state = nnx.split(stem)
    images = jax.random.normal(jax.random.key(1), shape)
    (plain_loss, (plain, plain_stats)), plain_grads = loss_and_grads(graphdef, state, images)
    with backend.use(FOLDED):
        (loss, (folded, stats)), grads = loss_and_grads(graphdef, state, images)
    assert folded.shape == plain.shape == (shape[0], -(-shape[1] // 4), shape[2] // 4, channels)
    np.testing.assert_allclose(folded, plain, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(loss, plain_loss, rtol=1e-5)
    for new, old in zip(jax.tree.leaves(stats), jax.tree.leaves(plain_stats), strict=True):
        np.testing.assert_allclose(new, old, rtol=1e-6, atol=1e-7)
    flat_grads = jax.tree_util.tree_leaves_with_path(plain_grads)
    for (path, old), new in zip(flat_grads, jax.tree.leaves(grads), strict=True):
        name = jax.tree_util.keystr(path)
        if "[0]['proj'][0]['bias']" in name or "[0]['proj'][3]['bias']" in name:
            # a bias followed by BatchNorm has no effect: both gradients are rounding noise around zero
            assert np.max(np.abs(new)) < 1e-3 and np.max(np.abs(old)) < 1e-3
            continue
        np.testing.assert_allclose(new, old, rtol=2e-5, atol=2e-5 * np.max(np.abs(old)), err_msg=name)


def test_folded_stem_in_bfloat16_is_close():
    stem = mscan.StemConv(3, 64, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    images = jax.random.normal(jax.random.key(2), (2, 64, 64, 3))
    plain = stem(images)
    with backend.use(FOLDED):
        folded = stem(images)
    assert folded.dtype == jnp.bfloat16
    np.testing.assert_allclose(folded.astype(np.float32), plain.astype(np.float32), atol=0.1)


def test_folded_stem_in_evaluation_mode_uses_the_running_statistics():
    stem = mscan.StemConv(3, 64, dtype=jnp.float32, rngs=nnx.Rngs(0))
    stem(jax.random.normal(jax.random.key(3), (2, 64, 64, 3)) * 2 + 1)  # running statistics away from (0, 1)
    stem.eval()
    images = jax.random.normal(jax.random.key(4), (1, 64, 64, 3))
    plain = stem(images)
    with backend.use(FOLDED):
        folded = stem(images)
    np.testing.assert_allclose(folded, plain, rtol=1e-5, atol=1e-5)
