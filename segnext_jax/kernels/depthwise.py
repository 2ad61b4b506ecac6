"""JAX entry points of the C++ depth-wise convolution kernels for CPU (depthwise_cpu.cc), through the XLA FFI.

`available()` builds and registers them on first use (segnext_jax.kernels.build) and says whether that worked;
`unavailable_reason()` says why not. Setting SEGNEXT_JAX_NATIVE_KERNELS=0 turns them off. Float32 only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

from segnext_jax.kernels import build, partitioning

FORWARD = "segnext_depthwise_forward"
KERNEL_GRAD = "segnext_depthwise_kernel_grad"
KERNELS = build.NativeKernels(
    "depthwise_cpu",
    ((FORWARD, "SegnextDepthwiseForward"), (KERNEL_GRAD, "SegnextDepthwiseKernelGrad")),
    "depth-wise kernels",
    "the slower shift_add form",
)
LIBRARY = KERNELS.library
unavailable_reason = KERNELS.unavailable_reason
available = KERNELS.available


def _forward_call(
    x: jax.Array,
    taps: jax.Array,
    input_bias: jax.Array,
    bias: jax.Array,
    ph: int,
    pw: int,
    use_input_bias: bool,
    gelu: bool,
) -> jax.Array:
    kh, kw, _ = taps.shape
    n, h, w, c = x.shape
    out = jax.ShapeDtypeStruct((n, h + 2 * ph - kh + 1, w + 2 * pw - kw + 1, c), x.dtype)
    return jax.ffi.ffi_call(FORWARD, out, vmap_method="sequential")(
        x, taps, input_bias, bias, ph=np.int64(ph), pw=np.int64(pw), use_input_bias=use_input_bias, gelu=gelu
    )


def _kernel_grad_call(
    x: jax.Array, input_bias: jax.Array, grad: jax.Array, kh: int, kw: int, ph: int, pw: int, use_input_bias: bool
) -> jax.Array:
    out = jax.ShapeDtypeStruct((kh, kw, x.shape[-1]), x.dtype)
    return jax.ffi.ffi_call(KERNEL_GRAD, out, vmap_method="sequential")(
        x,
        input_bias,
        grad,
        kh=np.int64(kh),
        kw=np.int64(kw),
        ph=np.int64(ph),
        pw=np.int64(pw),
        use_input_bias=use_input_bias,
    )


# Under a sharded jit each device runs the kernels on its part of the batch (segnext_jax.kernels.partitioning);
# the weight gradient's per-device parts are summed.
_forward = partitioning.batch_parallel(
    _forward_call,
    batched=(True, False, False, False),
    num_static=4,
    sharding_rule="n h w c, i j c, c, c -> n p q c",
)
_kernel_grad = custom_partitioning(_kernel_grad_call, static_argnums=(3, 4, 5, 6, 7))


def _kernel_grad_partition(kh, kw, ph, pw, use_input_bias, mesh, arg_shapes, result_shape):
    batch = partitioning.batch_axes(arg_shapes[0])
    sharded, replicated = NamedSharding(mesh, PartitionSpec(batch)), NamedSharding(mesh, PartitionSpec())

    def lower(x, input_bias, grad):
        part = _kernel_grad_call(x, input_bias, grad, kh, kw, ph, pw, use_input_bias)
        return part if batch is None else jax.lax.psum(part, batch)

    return mesh, lower, replicated, (sharded, replicated, sharded)


def _kernel_grad_infer(kh, kw, ph, pw, use_input_bias, mesh, arg_shapes, result_shape):
    return NamedSharding(mesh, PartitionSpec())


_kernel_grad.def_partition(
    _kernel_grad_partition,
    infer_sharding_from_operands=_kernel_grad_infer,
    sharding_rule="n h w c, c, n p q c -> i j c",
    reduction_factors=("n",),
    need_replication_factors=("h", "w", "c", "p", "q"),
)


def forward(
    x: jax.Array,
    taps: jax.Array,
    padding: tuple[int, int],
    *,
    bias: jax.Array | None = None,
    input_bias: jax.Array | None = None,
    gelu: bool = False,
) -> jax.Array:
    """Depth-wise cross-correlation of float32 NHWC `x` with `taps` (kh, kw, C), zero padding (ph, pw) per side.

    In the same pass: `input_bias` (C) added to `x` inside the image (a preceding 1x1 convolution's bias, so the
    padding stays zero), `bias` (C) added to the sum, and PyTorch's exact GELU applied to the result if `gelu`.
    """
    KERNELS.require()
    zeros = jnp.zeros(x.shape[-1:], x.dtype)
    use_input_bias = input_bias is not None
    input_bias = zeros if input_bias is None else input_bias.astype(x.dtype)
    bias = zeros if bias is None else bias.astype(x.dtype)
    return _forward(x, taps, input_bias, bias, *padding, use_input_bias, gelu)


def kernel_grad(
    x: jax.Array,
    grad: jax.Array,
    kernel_size: tuple[int, int],
    padding: tuple[int, int],
    *,
    input_bias: jax.Array | None = None,
) -> jax.Array:
    """Gradient (kh, kw, C) of `forward(x, taps, padding, input_bias=input_bias)` (no GELU) with respect to the taps,
    for output gradient `grad`."""
    KERNELS.require()
    use_input_bias = input_bias is not None
    input_bias = jnp.zeros(x.shape[-1:], x.dtype) if input_bias is None else input_bias.astype(x.dtype)
    return _kernel_grad(x, input_bias, grad, *kernel_size, *padding, use_input_bias)
