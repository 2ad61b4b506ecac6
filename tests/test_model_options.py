"""Model options: seeded NMF bases, bfloat16 compute, the public API's shapes and errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from oracle import build_reference, reference_state_dict

from segnext_jax import backend, models
from segnext_jax.serving.pytorch import load_state_dict

NUM_CLASSES = 19
BF16_TOLERANCE = 0.05  # max |bf16 - f32| / max |f32| on the logits: bf16 keeps 8 bits of mantissa


@nnx.jit
def seeded_forward(model, images, key):
    return model(images, rngs=nnx.Rngs(key))


@pytest.fixture(scope="module")
def state_dict():
    return reference_state_dict(*build_reference("t", NUM_CLASSES, seed=6))


@pytest.fixture(scope="module")
def images():
    return jnp.asarray(np.random.RandomState(1).randn(2, 64, 80, 3).astype(np.float32))


def make_model(state_dict, **kwargs):
    model = models.create("t", NUM_CLASSES, rngs=nnx.Rngs(0), **kwargs)
    load_state_dict(model, state_dict)
    model.eval()
    return model


def test_seed_gives_identical_logits_and_seeds_differ(state_dict, images):
    model = make_model(state_dict)
    first = np.asarray(seeded_forward(model, images, jax.random.key(3)))
    again = np.asarray(seeded_forward(model, images, jax.random.key(3)))
    other = np.asarray(seeded_forward(model, images, jax.random.key(4)))
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).max() > 1e-4 * np.abs(first).max()


def test_explicit_bases_equal_the_seeded_draw(state_dict, images):
    """`rngs=nnx.Rngs(seed)` draws the bases from the 'nmf' stream; passing that same draw gives the same logits."""
    model = make_model(state_dict)
    key = nnx.Rngs(3)["nmf"]()
    bases = models.draw_nmf_bases(key, 2, 256, 16)
    explicit = nnx.jit(lambda m, x, b: m(x, nmf_bases=b))(model, images, bases)
    seeded = seeded_forward(model, images, jax.random.key(3))
    np.testing.assert_allclose(np.asarray(explicit), np.asarray(seeded), rtol=0, atol=1e-6)


def test_bfloat16_close_to_float32(state_dict, images):
    f32 = np.asarray(seeded_forward(make_model(state_dict), images, jax.random.key(0)))
    model = make_model(state_dict, dtype="bfloat16")
    bf16 = seeded_forward(model, images, jax.random.key(0))
    assert bf16.dtype == jnp.float32  # logits come back in float32
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    error = float(np.abs(np.asarray(bf16) - f32).max() / np.abs(f32).max())
    print(f"bfloat16 vs float32 max relative logit difference: {error:.3e}")
    assert error <= BF16_TOLERANCE
    assert error > 0  # it really computed in bfloat16


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="unknown SegNeXt variant 'x'"):
        models.create("x", 10, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="unknown dtype 'float16'"):
        models.create("t", 10, rngs=nnx.Rngs(0), dtype="float16")
    with pytest.raises(ValueError, match="depthwise_impl='cuda'"):
        models.create("t", 10, rngs=nnx.Rngs(0), depthwise_impl="cuda")


def test_wrong_nmf_bases_shape_is_refused():
    nmf = models.NMF2D(16)
    with pytest.raises(ValueError, match=r"nmf_bases must have shape \(2, 256, 16\)"):
        nmf(jnp.ones((2, 4, 4, 256)), bases=jnp.ones((2, 256, 64)))


def test_inlined_and_scanned_stages_train_alike():
    """A stage runs block after block up to the backend policy's max_inlined_blocks (CPU: 12) and as a scan beyond:
    in training mode (stochastic depth on) both give the same stage outputs and BatchNorm statistics (autodiff of
    either is exact, so their gradients agree too)."""
    variant = models.Variant((16, 16, 32, 32), (3, 1, 2, 1), 0.5, 32, 4)
    images = jnp.asarray(np.random.RandomState(2).randn(2, 32, 32, 3).astype(np.float32))

    def train_forward(limit: int):
        policy = dataclasses.replace(backend.policy_for("cpu"), max_inlined_blocks=limit)
        backbone = models.create(variant, 4, rngs=nnx.Rngs(0)).backbone  # the stages only: the head compiles slowly
        with backend.use(policy):
            features = nnx.jit(lambda m, x: m(x, rngs=nnx.Rngs(5)))(backbone, images)
        return features, nnx.state(backbone, nnx.BatchStat)

    inlined, scanned = train_forward(100), train_forward(0)
    for ours, theirs in zip(jax.tree.leaves(inlined), jax.tree.leaves(scanned)):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-5, atol=1e-6)
