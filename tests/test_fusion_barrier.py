"""The fusion barrier (segnext_jax.kernels.fusion_barrier): an exact identity in value and gradient, under jit and a
batch-sharded jit; it stops XLA:CPU from recomputing a residual stream's gradient in every block's fusion; the
model's blocks use it exactly where the native kernels run them."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from segnext_jax.kernels import fusion_barrier
from segnext_jax.models import depthwise, mscan


def test_fusion_barrier_builds_on_this_machine():
    assert fusion_barrier.unavailable_reason() is None


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_materialize_returns_its_input(dtype):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 7, 3)), dtype)
    np.testing.assert_array_equal(np.asarray(fusion_barrier.materialize(x)), np.asarray(x))
    # under jit the result may take the operand's buffer (donated) or a copy of it (not donated)
    for donate in ((), (0,)):
        doubled = jax.jit(lambda x: fusion_barrier.materialize(x * 2), donate_argnums=donate)(x + 0)
        np.testing.assert_array_equal(np.asarray(doubled), np.asarray(x * 2))


def test_gradient_barrier_passes_the_gradient_through_unchanged():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 4, 4, 6)), jnp.float32)

    def loss(x, barrier):
        y = barrier(jnp.sin(x)) * x
        return jnp.sum(barrier(y) ** 3)

    with_barrier = jax.jit(jax.value_and_grad(lambda x: loss(x, fusion_barrier.gradient_barrier)))
    value, grad = with_barrier(x)
    expected_value, expected_grad = jax.jit(jax.value_and_grad(lambda x: loss(x, lambda v: v)))(x)
    assert value == expected_value
    # the barrier itself is exact; XLA fuses the rest differently around it (FMA contraction): float32 rounding
    np.testing.assert_allclose(np.asarray(grad), np.asarray(expected_grad), rtol=1e-6, atol=0)
    program = with_barrier.lower(x).compile().as_text()
    assert program.count(f'custom_call_target="{fusion_barrier.TARGET}"') == 2  # in the backward pass only
    forward = jax.jit(lambda x: loss(x, fusion_barrier.gradient_barrier)).lower(x).as_text()
    assert fusion_barrier.TARGET not in forward


def largest_fusion(program: str) -> int:
    """The instruction count of the largest fused computation in a compiled HLO text."""
    bodies = re.findall(r"^%fused_computation[\w.]* .*?\n((?:  .*\n)*?)}", program, re.M)
    return max(body.count("\n") for body in bodies)


def residual_stream_backward_fusion(depth: int, barrier) -> int:
    """The largest fusion XLA:CPU compiles for the gradient of `depth` blocks of x + keep * (f(x - mean x) @ w) / p
    (a block's shape: a normalisation, a matrix product, stochastic depth, a residual addition)."""

    def loss(x, weights, keep):
        for weight in weights:
            x = barrier(x)
            h = jnp.tanh(x - x.mean(-1, keepdims=True)) @ weight
            x = x + jnp.where(keep, h / 0.9, 0.0)
        return jnp.sum(x * x)

    x, keep = jnp.ones((2, 8, 8, 16)), jnp.ones((2, 1, 1, 1), bool)
    weights = [jnp.full((16, 16), 0.1)] * depth
    return largest_fusion(jax.jit(jax.grad(loss)).lower(x, weights, keep).compile().as_text())


def test_barrier_keeps_the_residual_streams_backward_fusions_from_growing_with_depth():
    # without it each block's fusion recomputes the gradient of all later blocks (the reason the barrier exists: if
    # XLA stops doing this, the first assertion fails and the barrier can go)
    assert residual_stream_backward_fusion(8, lambda x: x) > residual_stream_backward_fusion(2, lambda x: x) + 20
    assert residual_stream_backward_fusion(8, fusion_barrier.gradient_barrier) == residual_stream_backward_fusion(
        2, fusion_barrier.gradient_barrier
    )


def test_barrier_under_a_batch_sharded_jit_runs_on_each_devices_part():
    from jax.sharding import NamedSharding, PartitionSpec

    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    x = jnp.asarray(np.random.default_rng(2).standard_normal((8, 6, 5, 4)), jnp.float32)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(jnp.cos(fusion_barrier.gradient_barrier(x * x)))))
    expected = grad(x)
    x_sharded = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
    np.testing.assert_array_equal(np.asarray(grad(x_sharded)), np.asarray(expected))
    program = grad.lower(x_sharded).compile().as_text()
    operands = re.findall(r"(f32\[\d+,6,5,4\])\S* custom-call\(", program)
    assert operands == ["f32[1,6,5,4]"] and "all-gather" not in program


@pytest.mark.parametrize("impl, barriers", [("native", 2), ("xla", 0), ("portable", 0)])
def test_blocks_use_the_barrier_where_the_native_kernels_run_them(impl, barriers):
    block = mscan.MSCABlock(8, 2, 0.1, depthwise_impl="auto", dtype=jnp.float32, rngs=nnx.Rngs(0))
    depthwise.set_implementation(block, impl)  # the block follows its depth-wise convolutions (e.g. for export)
    graphdef, state = nnx.split(block)

    def grads(state, x):
        def loss(block, x):
            return jnp.sum(block(x, rngs=jax.random.key(0)) ** 2)

        return nnx.grad(loss, argnums=(0, 1))(nnx.merge(graphdef, state), x)

    program = jax.jit(grads).lower(state, jnp.ones((2, 8, 8, 8))).compile().as_text()
    assert program.count(f'custom_call_target="{fusion_barrier.TARGET}"') == barriers
