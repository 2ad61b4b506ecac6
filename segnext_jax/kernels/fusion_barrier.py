"""A point in a CPU program that XLA's fusion cannot cross, for the gradient of a residual stream
(fusion_barrier_cpu.cc, through the XLA FFI).

XLA:CPU duplicates cheap element-wise producers into each of their consumers. Through a residual stream that compounds:
in the backward pass the stream's gradient after block k is an element-wise sum over every later block, each block's
loop fusion recomputed all of it from the later blocks' saved inputs (SegNeXt-B's stage 3: 24 fusions growing to
747 instructions and 222 operands; what that costs: benchmarks/README.md). `gradient_barrier` is the
identity, and in the backward pass it hands the gradient to an FFI call that aliases its buffer, so the gradient is
written once per block and read from memory after it. `available()` builds the kernel on first use;
SEGNEXT_JAX_NATIVE_KERNELS=0 turns it off.
"""

from __future__ import annotations

import jax

from segnext_jax.kernels import build, partitioning

TARGET = "segnext_fusion_barrier"
KERNELS = build.NativeKernels(
    "fusion_barrier_cpu", ((TARGET, "SegnextFusionBarrier"),), "fusion barrier", "XLA's fusion as it is"
)
unavailable_reason = KERNELS.unavailable_reason
available = KERNELS.available


def _barrier_call(x: jax.Array) -> jax.Array:
    out = jax.ShapeDtypeStruct(x.shape, x.dtype)
    return jax.ffi.ffi_call(TARGET, out, input_output_aliases={0: 0})(x)


# each device passes its own part of the batch through (NHWC activations; the trainer shards the batch only, so
# the other dimensions are taken replicated)
_barrier = partitioning.batch_parallel(_barrier_call, batched=(True,), num_static=0, sharding_rule="n h w c -> n h w c")


def materialize(x: jax.Array) -> jax.Array:
    """`x` itself, computed into memory here rather than fused into (and recomputed by) its consumers. NHWC."""
    KERNELS.require()
    return _barrier(x)


@jax.custom_vjp
def gradient_barrier(x: jax.Array) -> jax.Array:
    """The identity; its gradient is the incoming gradient `materialize`d (see the module's docstring). NHWC."""
    return x


def _gradient_barrier_fwd(x: jax.Array) -> tuple[jax.Array, None]:
    return x, None


def _gradient_barrier_bwd(_: None, grad: jax.Array) -> tuple[jax.Array]:
    return (materialize(grad),)


gradient_barrier.defvjp(_gradient_barrier_fwd, _gradient_barrier_bwd)
