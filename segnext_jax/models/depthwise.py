"""Depth-wise convolution (PyTorch `nn.Conv2d(C, C, k, groups=C)`, stride 1) in interchangeable forms.

- `xla`: `lax.conv_general_dilated` with `feature_group_count=C`, the natural form for GPU and TPU.
- `native`: C++ kernels for CPU called through the XLA FFI (segnext_jax.kernels.depthwise), compiled on first use:
  forward, input gradient (the same kernel with flipped taps) and a weight gradient that XLA:CPU would otherwise
  run as a slow reduction. Float32.
- `shift_add`: a sum of kh*kw shifted slices times the per-channel taps, with a hand-written VJP (input gradient again
  a shift-add with flipped taps, weight gradient one reduction over all taps), in plain XLA. XLA:CPU has no good
  grouped-convolution kernel and this form runs much faster there (benchmarks/README.md): the fallback where
  `native` cannot be built. On TPU it avoids the unfolded input copies of XLA's grouped weight gradient.
- `auto`: what the backend policy (segnext_jax.backend) says for the target platform, chosen when traced: on CPU
  `native` (float32, when it builds) else `shift_add`; `xla` on GPU, `shift_add` on TPU.
- `portable`: `shift_add` on CPU and `xla` elsewhere, chosen by `lax.platform_dependent` when the program runs, for
  serialized programs (`jax.export`) that must not call this package's C++ code.
All take the same HWIO kernel of shape (kh, kw, 1, C) and agree to float32 rounding. Each also computes
GELU(conv(x + input_bias) + bias), any part optional: the block's feed-forward hands its first 1x1 convolution's bias
and its GELU to the depth-wise convolution, which `native` does in the same pass over the (widest) activations.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from segnext_jax import backend
from segnext_jax.kernels import depthwise as native_kernels
from segnext_jax.models import layers
from segnext_jax.models.layers import DType, conv_kernel_init

IMPLEMENTATIONS = ("auto", "xla", "native", "shift_add", "portable")


def resolve_impl(impl: str, dtype: DType = jnp.float32) -> str:
    """The implementation `impl` stands for with inputs of `dtype`: 'auto' is the current backend policy's
    (`segnext_jax.backend.current()`: the target of an enclosing `backend.use`, else the default backend's)."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"depthwise_impl={impl!r} is not one of {IMPLEMENTATIONS}")
    return backend.current().depthwise(dtype) if impl == "auto" else impl


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
    grad = grad.astype(jnp.float32)  # summed over every pixel of the batch: accumulate in float32 (as MXU/conv do)
    products = [window.astype(jnp.float32) * grad for window in _windows(x, kernel_size, pad, grad.shape[1:3])]
    zeros = [jnp.zeros((), jnp.float32)] * len(products)
    taps = jax.lax.reduce(products, zeros, lambda a, b: [u + v for u, v in zip(a, b)], (0, 1, 2))
    return jnp.stack(taps).reshape(*kernel_size, -1)


def _biased(convolve, x, input_bias, bias, gelu):
    """GELU(convolve(x + input_bias) + bias), each part optional: the fused operation composed in plain JAX, the
    input bias added before the convolution pads, as in the kernels."""
    y = convolve(x if input_bias is None else x + input_bias)
    y = y if bias is None else y + bias
    return layers.gelu(y) if gelu else y


def _shift_add_fused(x, taps, pad, *, bias=None, input_bias=None, gelu=False):
    return _biased(lambda u: _shift_add(u, taps, pad), x, input_bias, bias, gelu)


def _shift_add_fused_kernel_grad(x, grad, kernel_size, pad, *, input_bias=None):
    return _shift_add_kernel_grad(x if input_bias is None else x + input_bias, grad, kernel_size, pad)


def _make_depthwise(correlate, kernel_grad):
    """A depth-wise convolution `(x, kernel (kh, kw, 1, C), input_bias, bias, padding, gelu) -> y` from a fused
    correlation `(x, taps, pad, *, bias, input_bias, gelu)` and a weight gradient `(x, grad, kernel_size, pad, *,
    input_bias)`, with its VJP: GELU's derivative at the saved pre-activation z, then the input gradient correlates dz
    with the flipped taps, padded by (k - 1 - p) on each side to map the output grid back onto the input grid; the
    biases' gradients are sums of the input and output gradients. `input_bias` and `bias` may be None."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
    def conv(x, kernel, input_bias, bias, padding, gelu):
        return correlate(x, kernel[:, :, 0, :], padding, bias=bias, input_bias=input_bias, gelu=gelu)

    def fwd(x, kernel, input_bias, bias, padding, gelu):
        z = correlate(x, kernel[:, :, 0, :], padding, bias=bias, input_bias=input_bias)
        return (layers.gelu(z) if gelu else z), (x, kernel, input_bias, bias, z if gelu else None)

    def bwd(padding, gelu, residuals, grad):
        x, kernel, input_bias, bias, z = residuals
        if gelu:
            grad = grad * layers.gelu_grad(z)
        kh, kw = kernel.shape[:2]
        ph, pw = padding
        grad_x = correlate(grad, kernel[::-1, ::-1, 0, :], (kh - 1 - ph, kw - 1 - pw))
        grad_kernel = kernel_grad(x, grad, (kh, kw), padding, input_bias=input_bias).reshape(kernel.shape)
        grad_input_bias = None if input_bias is None else grad_x.sum((0, 1, 2)).astype(input_bias.dtype)
        grad_bias = None if bias is None else grad.sum((0, 1, 2)).astype(bias.dtype)
        return grad_x.astype(x.dtype), grad_kernel.astype(kernel.dtype), grad_input_bias, grad_bias

    conv.defvjp(fwd, bwd)
    return conv


depthwise_conv_shift_add = _make_depthwise(_shift_add_fused, _shift_add_fused_kernel_grad)
depthwise_conv_native = _make_depthwise(native_kernels.forward, native_kernels.kernel_grad)


def _xla_fused(x, kernel, input_bias, bias, padding, gelu):
    return _biased(lambda u: depthwise_conv_xla(u, kernel, padding), x, input_bias, bias, gelu)


def depthwise_conv(
    x: jax.Array,
    kernel: jax.Array,
    padding: tuple[int, int],
    impl: str = "auto",
    *,
    bias: jax.Array | None = None,
    input_bias: jax.Array | None = None,
    gelu: bool = False,
) -> jax.Array:
    """GELU(conv(x + input_bias) + bias) (each part optional) by the chosen implementation (see the module
    docstring): `input_bias` is a preceding 1x1 convolution's bias, added inside the image before the zero padding,
    and the native kernels do all of it in one pass over the activations."""
    kh, kw = kernel.shape[:2]
    padding = tuple(padding)
    if padding[0] > kh - 1 or padding[1] > kw - 1:
        raise ValueError(f"padding {padding} is larger than the kernel {kh}x{kw} allows")
    impl = resolve_impl(impl, x.dtype)
    if impl == "xla":
        return _xla_fused(x, kernel, input_bias, bias, padding, gelu)
    if impl == "native":
        if x.dtype != jnp.float32:
            raise ValueError(f"depthwise_impl='native' computes in float32, not {x.dtype}: use 'auto' or 'shift_add'")
        return depthwise_conv_native(x, kernel, input_bias, bias, padding, gelu)
    if impl == "portable":
        return jax.lax.platform_dependent(
            x,
            kernel,
            input_bias,
            bias,
            cpu=lambda *args: depthwise_conv_shift_add(*args, padding, gelu),
            default=lambda *args: _xla_fused(*args, padding, gelu),
        )
    return depthwise_conv_shift_add(x, kernel, input_bias, bias, padding, gelu)


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

    def __call__(self, x: jax.Array, *, input_bias: jax.Array | None = None, gelu: bool = False) -> jax.Array:
        """conv(x + input_bias) + bias, then GELU if `gelu`: the block's feed-forward passes fc1's bias and its GELU
        here, so that the native kernels do bias, convolution and activation in one pass."""
        x = x.astype(self.dtype)
        if input_bias is not None:
            input_bias = input_bias.astype(self.dtype)
        kernel, bias = self.kernel[...].astype(self.dtype), self.bias[...].astype(self.dtype)
        return depthwise_conv(x, kernel, self.padding, self.impl, bias=bias, input_bias=input_bias, gelu=gelu)


def set_implementation(model: nnx.Module, impl: str) -> None:
    """Sets the implementation of every depth-wise convolution in `model` (e.g. 'portable' before `jax.export`)."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"depthwise_impl={impl!r} is not one of {IMPLEMENTATIONS}")
    for _, module in model.iter_modules():
        if isinstance(module, DepthwiseConv2d):
            module.impl = impl
