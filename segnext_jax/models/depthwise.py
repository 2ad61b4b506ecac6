"""Depth-wise convolution (PyTorch `nn.Conv2d(C, C, k, groups=C)`, stride 1) in two interchangeable forms.

- `xla`: `lax.conv_general_dilated` with `feature_group_count=C`, the natural form for GPU and TPU.
- `shift_add`: a sum of kh*kw shifted slices times the per-channel taps, with a hand-written VJP whose input
  gradient is again a shift-add (flipped taps) and whose kernel gradient is one reduction per tap. XLA:CPU has no
  good grouped-convolution kernel, and this form runs about 20x faster there.
- `auto`: `shift_add` on CPU, `xla` elsewhere, chosen when the function is traced.
Both use the same HWIO kernel of shape (kh, kw, 1, C) and agree to float32 rounding.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from segnext_jax.models.layers import DType, conv_kernel_init

IMPLEMENTATIONS = ("auto", "xla", "shift_add")


def resolve_impl(impl: str) -> str:
    """Maps 'auto' to the fast implementation of the default backend."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"depthwise_impl={impl!r} is not one of {IMPLEMENTATIONS}")
    if impl == "auto":
        return "shift_add" if jax.default_backend() == "cpu" else "xla"
    return impl


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


def _shift_add(x: jax.Array, taps: jax.Array, pad: tuple[int, int]) -> jax.Array:
    """Cross-correlation of NHWC `x` with per-channel `taps` (kh, kw, C), zero padding `pad` on each side."""
    kh, kw, _ = taps.shape
    ph, pw = pad
    xp = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    out_h = x.shape[1] + 2 * ph - kh + 1
    out_w = x.shape[2] + 2 * pw - kw + 1
    out = None
    for i in range(kh):
        for j in range(kw):
            term = xp[:, i : i + out_h, j : j + out_w, :] * taps[i, j]
            out = term if out is None else out + term
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def depthwise_conv_shift_add(x: jax.Array, kernel: jax.Array, padding: tuple[int, int]) -> jax.Array:
    """Depth-wise convolution of NHWC `x` with a (kh, kw, 1, C) kernel as shifted multiply-adds."""
    return _shift_add(x, kernel[:, :, 0, :], padding)


def _shift_add_fwd(x, kernel, padding):
    return depthwise_conv_shift_add(x, kernel, padding), (x, kernel)


def _shift_add_bwd(padding, residuals, grad):
    x, kernel = residuals
    kh, kw = kernel.shape[:2]
    ph, pw = padding
    # d out / d x: correlate the output gradient with the flipped taps; the padding that maps the output grid back
    # onto the input grid is (k - 1 - p) on each side.
    grad_x = _shift_add(grad, kernel[::-1, ::-1, 0, :], (kh - 1 - ph, kw - 1 - pw))
    # d out / d kernel[i, j]: the sum over the batch and positions of the matching input window times the gradient.
    xp = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    out_h, out_w = grad.shape[1:3]
    taps = [
        jnp.sum(xp[:, i : i + out_h, j : j + out_w, :] * grad, axis=(0, 1, 2)) for i in range(kh) for j in range(kw)
    ]
    grad_kernel = jnp.stack(taps).reshape(kh, kw, 1, -1).astype(kernel.dtype)
    return grad_x.astype(x.dtype), grad_kernel


depthwise_conv_shift_add.defvjp(_shift_add_fwd, _shift_add_bwd)


def depthwise_conv(x: jax.Array, kernel: jax.Array, padding: tuple[int, int], impl: str = "auto") -> jax.Array:
    """Depth-wise convolution by the chosen implementation ('auto', 'xla' or 'shift_add')."""
    kh, kw = kernel.shape[:2]
    if padding[0] > kh - 1 or padding[1] > kw - 1:
        raise ValueError(f"padding {padding} is larger than the kernel {kh}x{kw} allows")
    if resolve_impl(impl) == "xla":
        return depthwise_conv_xla(x, kernel, padding)
    return depthwise_conv_shift_add(x, kernel, tuple(padding))


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
        resolve_impl(impl)
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
