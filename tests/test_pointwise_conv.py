"""The 1x1 convolution's hand-written VJP (segnext_jax.models.layers.pointwise_conv): the gradients of a plain
matrix product, with the kernel's gradient contracted on the operands as they lie (no transposed copy of a P-pixel
array, which XLA:CPU made of JAX's own rule), and the model's 1x1 convolutions use it."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from segnext_jax.models import layers, mscan


def two_products_loss(product):
    """A loss over two 1x1 convolutions with a nonlinearity between them, as in a block's feed-forward."""

    def loss(x, w1, w2):
        return jnp.sum(jnp.sin(product(jnp.tanh(product(x, w1)), w2) + x))

    return loss


def operands(pixels=(2, 16, 16), channels=(8, 32), dtype=jnp.float32):
    rng = np.random.default_rng(0)
    cin, cout = channels
    x = jnp.asarray(rng.standard_normal((*pixels, cin)), dtype)
    w1 = jnp.asarray(rng.standard_normal((cin, cout)) * 0.2, dtype)
    w2 = jnp.asarray(rng.standard_normal((cout, cin)) * 0.2, dtype)
    return x, w1, w2


@pytest.mark.parametrize("dtype, rtol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_gradients_equal_those_of_a_plain_matrix_product(dtype, rtol):
    args = operands(dtype=dtype)
    ours = jax.jit(jax.value_and_grad(two_products_loss(layers.pointwise_conv), argnums=(0, 1, 2)))(*args)
    plain = jax.jit(jax.value_and_grad(two_products_loss(jnp.dot), argnums=(0, 1, 2)))(*args)
    np.testing.assert_allclose(np.float32(ours[0]), np.float32(plain[0]), rtol=rtol)
    for got, expected in zip(ours[1], plain[1], strict=True):
        assert got.dtype == expected.dtype and got.shape == expected.shape
        scale = np.abs(np.float32(expected)).max()
        np.testing.assert_allclose(np.float32(got), np.float32(expected), rtol=0, atol=rtol * scale)


def pixel_sized_copies(product, dtype=jnp.float32) -> list[str]:
    """The transposes and copies of P or more elements (a whole activation or gradient) in the compiled gradient."""
    args = operands(pixels=(2, 32, 32), channels=(8, 64), dtype=dtype)
    pixels = 2 * 32 * 32
    program = jax.jit(jax.grad(two_products_loss(product), argnums=(0, 1, 2))).lower(*args).compile().as_text()
    instructions = re.findall(r"^\s*(?:ROOT )?%\S+ = \w+\[([\d,]*)\]\S* (?:transpose|copy)\(", program, re.M)
    return [dims for dims in instructions if np.prod([int(d) for d in dims.split(",") if d]) >= pixels]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernel_gradient_reads_the_activations_in_place(dtype):
    # JAX's own rule makes XLA:CPU copy an output gradient transposed (the reason for the hand-written VJP: if XLA
    # stops doing this, the first assertion fails and the VJP can go)
    assert pixel_sized_copies(jnp.dot, dtype)
    assert pixel_sized_copies(layers.pointwise_conv, dtype) == []


def test_model_1x1_convolutions_use_it(monkeypatch):
    calls = []
    monkeypatch.setattr(layers, "pointwise_conv", lambda x, kernel: calls.append(kernel.shape) or jnp.dot(x, kernel))
    block = mscan.MSCABlock(8, 4, 0.0, depthwise_impl="xla", dtype=jnp.float32, rngs=nnx.Rngs(0))
    block(jnp.ones((1, 8, 8, 8)))
    # attention: proj_1, the gating unit's conv3, proj_2; feed-forward: fc1, fc2
    assert sorted(calls) == sorted([(8, 8)] * 3 + [(8, 32), (32, 8)])
    calls.clear()
    layers.Conv2d(8, 16, 3, stride=2, padding=1, rngs=nnx.Rngs(0))(jnp.ones((1, 8, 8, 8)))
    layers.Conv2d(8, 16, 1, stride=2, rngs=nnx.Rngs(0))(jnp.ones((1, 8, 8, 8)))
    assert calls == []
