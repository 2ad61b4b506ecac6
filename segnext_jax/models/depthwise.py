"""Depth-wise convolution (PyTorch `nn.Conv2d(C, C, k, groups=C)`, stride 1) in interchangeable forms.

- `xla`: `lax.conv_general_dilated` with `feature_group_count=C`, the natural form for GPU and TPU.
- `native`: C++ kernels for CPU called through the XLA FFI (segnext_jax.kernels.depthwise), compiled on first use:
  forward, input gradient (the same kernel with flipped taps) and a weight gradient that XLA:CPU would otherwise
  run as a slow reduction. Float32.
- `shift_add`: a sum of kh*kw shifted slices times the per-channel taps, with a hand-written VJP (input gradient again
  a shift-add with flipped taps, weight gradient one reduction over all taps), in plain XLA. XLA:CPU has no good
  grouped-convolution kernel and this form runs 20-100x faster there; the fallback where `native` cannot be built.
- `auto`: on CPU `native` (float32, when it builds) else `shift_add`; `xla` elsewhere; chosen when traced.
- `portable`: `shift_add` on CPU and `xla` elsewhere, chosen by `lax.platform_dependent` when the program runs, for
  serialized programs (`jax.export`) that must not call this package's C++ code.
All take the same HWIO kernel of shape (kh, kw, 1, C) and agree to float32 rounding.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from segnext_jax.kernels import depthwise as native_kernels
from segnext_jax.models.layers import DType, conv_kernel_init

IMPLEMENTATIONS = ("auto", "xla", "native", "shift_add", "portable")


def resolve_impl(impl: str, dtype: DType = jnp.float32) -> str:
    """The implementation `impl` stands for on the default backend for inputs of `dtype` ('auto' resolved)."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"depthwise_impl={impl!r} is not one of {IMPLEMENTATIONS}")
    if impl != "auto":
        return impl
    if jax.default_backend() != "cpu":
        return "xla"
    return "native" if jnp.dtype(dtype) == jnp.float32 and native_kernels.available() else "shift_add"


def depthwise_conv_xla(x: jax.Array, kernel: jax.Array, padding: tuple[int, int]) -> jax.Array:
    """Depth-wise convolution of NHWC `x` with a (kh, kw, 1, C) kernel as an XLA grouped convolution."""
    ph, pw = padding
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(1, 1),
        padding=((ph, ph), (pw, pw)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[-1],
    )


def _windows(x: jax.Array, kernel_size: tuple[int, int], pad: tuple[int, int], out_size: tuple[int, int]):
    """The kh*kw shifted (N, out_h, out_w, C) views of `x` zero-padded by `pad`, tap (0, 0) first."""
    (kh, kw), (ph, pw), (out_h, out_w) = kernel_size, pad, out_size
    xp = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    return [xp[:, i : i + out_h, j : j + out_w, :] for i in range(kh) for j in range(kw)]


def _shift_add(x: jax.Array, taps: jax.Array, pad: tuple[int, int]) -> jax.Array:
    """Cross-correlation of NHWC `x` with per-channel `taps` (kh, kw, C), zero padding `pad` on each side."""
    kh, kw, _ = taps.shape
    out_size = (x.shape[1] + 2 * pad[0] - kh + 1, x.shape[2] + 2 * pad[1] - kw + 1)
    windows = _windows(x, (kh, kw), pad, out_size)
    return functools.reduce(jnp.add, [window * tap for window, tap in zip(windows, taps.reshape(kh * kw, -1))])


def _shift_add_kernel_grad(x: jax.Array, grad: jax.Array, kernel_size: tuple[int, int], pad: tuple[int, int]):
    """d out / d taps (kh, kw, C): per tap, the sum over batch and positions of its input window times `grad`, all
    taps in one (variadic) reduction so that XLA reads the operands once."""
    products = [window * grad for window in _windows(x, kernel_size, pad, grad.shape[1:3])]
    zeros = [jnp.zeros((), grad.dtype)] * len(products)
    taps = jax.lax.reduce(products, zeros, lambda a, b: [u + v for u, v in zip(a, b)], (0, 1, 2))
    return jnp.stack(taps).reshape(*kernel_size, -1)


def _make_depthwise(correlate, kernel_grad):
    """A depth-wise convolution `(x, kernel (kh, kw, 1, C), padding) -> y` from a correlation `(x, taps, pad)` and a
    weight gradient `(x, grad, kernel_size, pad)`, with its VJP: the input gradient correlates the output gradient
    with the flipped taps, padded by (k - 1 - p) on each side to map the output grid back onto the input grid."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
    def conv(x: jax.Array, kernel: jax.Array, padding: tuple[int, int]) -> jax.Array:
        return correlate(x, kernel[:, :, 0, :], padding)

    def fwd(x, kernel, padding):
        return conv(x, kernel, padding), (x, kernel)

    def bwd(padding, residuals, grad):
        x, kernel = residuals
        kh, kw = kernel.shape[:2]
        ph, pw = padding
        grad_x = correlate(grad, kernel[::-1, ::-1, 0, :], (kh - 1 - ph, kw - 1 - pw))
        grad_kernel = kernel_grad(x, grad, (kh, kw), padding).reshape(kernel.shape)
        return grad_x.astype(x.dtype), grad_kernel.astype(kernel.dtype)

    conv.defvjp(fwd, bwd)
    return conv


depthwise_conv_shift_add = _make_depthwise(_shift_add, _shift_add_kernel_grad)
depthwise_conv_native = _make_depthwise(native_kernels.forward, native_kernels.kernel_grad)


def depthwise_conv(x: jax.Array, kernel: jax.Array, padding: tuple[int, int], impl: str = "auto") -> jax.Array:
    """Depth-wise convolution by the chosen implementation (see the module docstring)."""
    kh, kw = kernel.shape[:2]
    padding = tuple(padding)
    if padding[0] > kh - 1 or padding[1] > kw - 1:
        raise ValueError(f"padding {padding} is larger than the kernel {kh}x{kw} allows")
    impl = resolve_impl(impl, x.dtype)
    if impl == "xla":
        return depthwise_conv_xla(x, kernel, padding)
    if impl == "native":
        if x.dtype != jnp.float32:
            raise ValueError(f"depthwise_impl='native' computes in float32, not {x.dtype}: use 'auto' or 'shift_add'")
        return depthwise_conv_native(x, kernel, padding)
    if impl == "portable":
        return jax.lax.platform_dependent(
            x,
            kernel,
            cpu=lambda x, k: depthwise_conv_shift_add(x, k, padding),
            default=lambda x, k: depthwise_conv_xla(x, k, padding),
        )
    return depthwise_conv_shift_add(x, kernel, padding)


class DepthwiseConv2d(nnx.Module):
    """`nn.Conv2d(C, C, (kh, kw), padding=(ph, pw), groups=C, bias=True)` in NHWC; `impl` picks the algorithm."""

    def __init__(
        self,
        channels: int,
        kernel_size: tuple[int, int],
        *,
        padding: tuple[int, int],
        impl: str = "auto",
        dtype: DType = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if impl not in IMPLEMENTATIONS:
            raise ValueError(f"depthwise_impl={impl!r} is not one of {IMPLEMENTATIONS}")
        self.padding = tuple(padding)
        self.impl = impl
        self.dtype = dtype
        kh, kw = kernel_size
        self.kernel = nnx.Param(conv_kernel_init(rngs.params(), (kh, kw, 1, channels), groups=channels))
        self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        y = depthwise_conv(x, self.kernel[...].astype(self.dtype), self.padding, self.impl)
        return y + self.bias[...].astype(self.dtype)


def set_implementation(model: nnx.Module, impl: str) -> None:
    """Sets the implementation of every depth-wise convolution in `model` (e.g. 'portable' before `jax.export`)."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"depthwise_impl={impl!r} is not one of {IMPLEMENTATIONS}")
    for _, module in model.iter_modules():
        if isinstance(module, DepthwiseConv2d):
            module.impl = impl
