"""JAX entry points of the C++ upsampled cross-entropy kernels for CPU (cross_entropy_cpu.cc), through the XLA FFI.

The training loss upsamples the logits to the label size before the softmax cross-entropy; these kernels do both per
pixel, so no full-resolution tensor is written (training.loss uses them on CPU). `available()` builds and registers
them on first use; SEGNEXT_JAX_NATIVE_KERNELS=0 turns them off. Float32 logits, int32 labels.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from segnext_jax.kernels import build, partitioning

FORWARD = "segnext_upsampled_cross_entropy_forward"
BACKWARD = "segnext_upsampled_cross_entropy_backward"
KERNELS = build.NativeKernels(
    "cross_entropy_cpu",
    ((FORWARD, "SegnextUpsampledCrossEntropyForward"), (BACKWARD, "SegnextUpsampledCrossEntropyBackward")),
    "cross-entropy kernels",
    "XLA's loss",
)
unavailable_reason = KERNELS.unavailable_reason
available = KERNELS.available


def _forward_call(logits: jax.Array, labels: jax.Array, ignore_index: int) -> tuple[jax.Array, jax.Array]:
    n, height, width = labels.shape
    out = (jax.ShapeDtypeStruct((n, height), jnp.float32), jax.ShapeDtypeStruct((n, height, width), jnp.float32))
    return jax.ffi.ffi_call(FORWARD, out, vmap_method="sequential")(logits, labels, ignore_index=np.int64(ignore_index))


def _backward_call(logits: jax.Array, labels: jax.Array, lse: jax.Array, ignore_index: int) -> jax.Array:
    out = jax.ShapeDtypeStruct(logits.shape, jnp.float32)
    return jax.ffi.ffi_call(BACKWARD, out, vmap_method="sequential")(
        logits, labels, lse, ignore_index=np.int64(ignore_index)
    )


_forward = partitioning.batch_parallel(
    _forward_call, batched=(True, True), num_static=1, sharding_rule="n a b k, n y x -> n y, n y x"
)
_backward = partitioning.batch_parallel(
    _backward_call, batched=(True, True, True), num_static=1, sharding_rule="n a b k, n y x, n y x -> n a b k"
)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def summed_cross_entropy(logits: jax.Array, labels: jax.Array, ignore_index: int) -> jax.Array:
    """Sum over the pixels of `labels` (N, H, W) that are not `ignore_index` of the softmax cross-entropy of float32
    NHWC `logits` resized bilinearly to (H, W) (PyTorch's `align_corners=False`). A label outside [0, K) that is not
    `ignore_index` makes the call fail."""
    return _summed_fwd(logits, labels, ignore_index)[0]


def _summed_fwd(logits, labels, ignore_index):
    KERNELS.require()
    if not -(2**31) <= ignore_index < 2**31:
        raise ValueError(f"ignore_index={ignore_index} does not fit the kernels' int32 labels")
    labels = labels.astype(jnp.int32)
    row_loss, lse = _forward(logits, labels, ignore_index)
    return jnp.sum(row_loss), (logits, labels, lse)


def _summed_bwd(ignore_index, residuals, grad):
    logits, labels, lse = residuals
    return _backward(logits, labels, lse, ignore_index) * grad, None


summed_cross_entropy.defvjp(_summed_fwd, _summed_bwd)
