"""Building blocks with PyTorch's semantics in NHWC: convolutions, norms, activations, stochastic layers, resize.

Flax's own layers differ from PyTorch's in defaults that matter for exact parity (epsilons, BatchNorm momentum and
its biased running variance, tanh-approximate GELU, 'SAME' padding), so SegNeXt uses these instead.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

DType = Any


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def conv_kernel_init(key: jax.Array, shape: tuple[int, ...], groups: int = 1, std: float | None = None) -> jax.Array:
    """The reference's conv init: normal(0, sqrt(2 / fan_out)), fan_out = kh * kw * out_channels // groups.

    Eagerly it is drawn with numpy from a generator seeded by `key`: jax.random would compile one program per kernel
    shape, which made building a model take 15+ seconds. Under a trace (`nnx.eval_shape`, `jax.jit`) it uses
    jax.random, so values differ from an eager build with the same key; shapes and distribution do not.
    """
    kh, kw, _, out_channels = shape
    if std is None:
        std = math.sqrt(2.0 / (kh * kw * out_channels // groups))
    if isinstance(key, jax.core.Tracer):
        return std * jax.random.normal(key, shape, jnp.float32)
    generator = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
    return jnp.asarray(std * generator.standard_normal(shape, np.float32))


@jax.custom_vjp
def pointwise_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """A 1x1 convolution as a matrix product: `x` (..., Cin) times `kernel` (Cin, Cout), of one dtype.

    The kernel's gradient is written as one product of 2-D views, (P, Cin)^T (P, Cout) over the P pixels, which XLA
    contracts where the operands lie. JAX's own rule contracts the 4-D arrays into (Cout, Cin) and transposes the
    result; XLA:CPU turns that into a transposed copy of the whole output gradient and a slow Eigen product on AVX2
    CPUs (benchmarks/README.md).
    """
    return jnp.dot(x, kernel)


def _pointwise_conv_fwd(x: jax.Array, kernel: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return jnp.dot(x, kernel), (x, kernel)


def _pointwise_conv_bwd(residuals: tuple[jax.Array, jax.Array], grad: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, kernel = residuals
    x_pixels = x.reshape(-1, x.shape[-1])
    grad_pixels = grad.reshape(-1, grad.shape[-1])
    kernel_grad = jax.lax.dot_general(x_pixels, grad_pixels, (((0,), (0,)), ((), ())))
    return jnp.dot(grad, kernel.T).astype(x.dtype), kernel_grad.astype(kernel.dtype)


pointwise_conv.defvjp(_pointwise_conv_fwd, _pointwise_conv_bwd)


class Conv2d(nnx.Module):
    """A dense 2-D convolution (PyTorch `nn.Conv2d`, groups=1) in NHWC with an HWIO kernel and explicit padding.

    1x1 stride-1 convolutions run as matrix products, which XLA:CPU executes several times faster.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int] = 1,
        *,
        stride: int = 1,
        padding: int | tuple[int, int] = 0,
        use_bias: bool = True,
        init_std: float | None = None,
        dtype: DType = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kh, kw = _pair(kernel_size)
        self.stride = stride
        self.padding = _pair(padding)
        self.dtype = dtype
        self.kernel = nnx.Param(conv_kernel_init(rngs.params(), (kh, kw, in_channels, out_channels), std=init_std))
        self.bias = nnx.Param(jnp.zeros((out_channels,), jnp.float32)) if use_bias else None

    def __call__(self, x: jax.Array, *, add_bias: bool = True) -> jax.Array:
        """The convolution; `add_bias=False` leaves the bias for the caller to fuse into what follows."""
        kernel = self.kernel[...].astype(self.dtype)
        x = x.astype(self.dtype)
        if kernel.shape[:2] == (1, 1) and self.stride == 1 and self.padding == (0, 0):
            y = pointwise_conv(x, kernel[0, 0])
        else:
            ph, pw = self.padding
            y = jax.lax.conv_general_dilated(
                x,
                kernel,
                window_strides=(self.stride, self.stride),
                padding=((ph, ph), (pw, pw)),
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
            )
        if add_bias and self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y

    def folded_stride2(self, x: jax.Array, fold_out: int) -> jax.Array:
        """This 3x3 stride-2 convolution (padding 1) on a W-folded input (N, H, W / (2 f), 2 f * Cin), giving the
        W-folded output (N, ceil(H / 2), W / (2 f), f * Cout), f = `fold_out`: the same values, laid out so that
        narrow channels fill TPU's 128-lane tiles (see `StemConv`). Folded position p holds pixels p*f ... p*f+f-1
        of the output and the 2 f input pixels from which their taps start, so each output position reads its own
        input position and the one before: a (3, 2) kernel, stride (2, 1), built from this one's taps and zeros."""
        kh, kw, _, _ = self.kernel.shape
        if (kh, kw, self.stride, self.padding) != (3, 3, 2, (1, 1)):
            raise ValueError(
                f"folded_stride2 needs a 3x3 stride-2 padding-1 convolution, not {kh}x{kw} stride {self.stride} "
                f"padding {self.padding}"
            )
        kernel = _folded_kernel(self.kernel[...].astype(self.dtype), 2 * fold_out, fold_out)
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), kernel, (2, 1), ((1, 1), (1, 0)), dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return y + jnp.tile(self.bias[...].astype(self.dtype), fold_out) if self.bias is not None else y


def _folded_kernel(kernel: jax.Array, fold_in: int, fold_out: int) -> jax.Array:
    """A 3-wide stride-2 HWIO kernel as the (kh, 2, fold_in * Cin, fold_out * Cout) kernel of `folded_stride2`:
    output pixel k of folded position p reads input columns 2 (p f + k) - 1 + j, j < 3, i.e. pixel m of folded
    position p - 1 + dw where j = fold_in (dw - 1) + m - 2 k + 1; every other (dw, m, k) is zero."""
    kh, kw, cin, cout = kernel.shape
    dw, m, k = np.meshgrid(np.arange(2), np.arange(fold_in), np.arange(fold_out), indexing="ij")
    j = fold_in * (dw - 1) + m - 2 * k + 1
    taps = kernel[:, np.clip(j, 0, kw - 1)]  # (kh, 2, fold_in, fold_out, Cin, Cout)
    taps = jnp.where(((j >= 0) & (j < kw))[None, ..., None, None], taps, jnp.zeros((), kernel.dtype))
    return taps.transpose(0, 1, 2, 4, 3, 5).reshape(kh, 2, fold_in * cin, fold_out * cout)


class BatchNorm2d(nnx.Module):
    """PyTorch's `nn.BatchNorm2d` over the last axis: eps 1e-5, momentum 0.1, and the running variance updated with
    the unbiased batch variance (normalisation itself uses the biased one), statistics in float32.

    Under `jax.jit` with a batch-sharded input the statistics are those of the global batch (SyncBN).
    """

    def __init__(self, num_features: int, *, eps: float = 1e-5, momentum: float = 0.1):
        self.eps = eps
        self.momentum = momentum
        self.use_running_average = False
        self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))

    def __call__(self, x: jax.Array, *, fold: int = 1) -> jax.Array:
        """Normalises `x`; `fold` > 1 reads its last axis as `fold` pixels of C channels each (a W-folded layout)."""
        xf = x.astype(jnp.float32)
        if self.use_running_average:
            mean, var = self.mean[...], self.var[...]
        else:
            pixels = xf.reshape(*x.shape[:-1], fold, x.shape[-1] // fold) if fold > 1 else xf
            axes = tuple(range(pixels.ndim - 1))
            mean = jnp.mean(pixels, axes)
            var = jnp.mean(jnp.square(pixels - mean), axes)
            count = math.prod(pixels.shape[:-1])
            unbiased = var * (count / max(count - 1, 1))
            m = self.momentum
            self.mean[...] = jax.lax.stop_gradient((1 - m) * self.mean[...] + m * mean)
            self.var[...] = jax.lax.stop_gradient((1 - m) * self.var[...] + m * unbiased)
        mean, rstd = jnp.tile(mean, fold), jnp.tile(jax.lax.rsqrt(var + self.eps), fold)
        y = (xf - mean) * rstd * jnp.tile(self.scale[...], fold) + jnp.tile(self.bias[...], fold)
        return y.astype(x.dtype)


class LayerNorm(nnx.Module):
    """PyTorch's `nn.LayerNorm(C)` over the last axis, eps 1e-5, computed in float32."""

    def __init__(self, num_features: int, *, eps: float = 1e-5):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, -1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), -1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]
        return y.astype(x.dtype)


class GroupNorm(nnx.Module):
    """PyTorch's `nn.GroupNorm(num_groups, C)` for NHWC input, eps 1e-5, computed in float32."""

    def __init__(self, num_groups: int, num_features: int, *, eps: float = 1e-5):
        if num_features % num_groups:
            raise ValueError(f"GroupNorm: {num_features} channels do not split into {num_groups} groups")
        self.num_groups = num_groups
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        n, h, w, c = x.shape
        xf = x.astype(jnp.float32).reshape(n, h, w, self.num_groups, c // self.num_groups)
        mean = jnp.mean(xf, (1, 2, 4), keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), (1, 2, 4), keepdims=True)
        y = ((xf - mean) * jax.lax.rsqrt(var + self.eps)).reshape(n, h, w, c)
        return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


def gelu(x: jax.Array) -> jax.Array:
    """PyTorch's default `nn.GELU()`: its exact erf form 0.5 x (1 + erf(x / sqrt 2)), not Flax's tanh approximation.

    Written out rather than `jax.nn.gelu(approximate=False)`, whose erfc has no XLA op: JAX expands it into ~90
    element-wise operations, in the forward and again in the gradient, where XLA's erf is one."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * np.sqrt(0.5).astype(x.dtype)))


def gelu_grad(x: jax.Array) -> jax.Array:
    """d gelu(x) / dx = Phi(x) + x phi(x), for hand-written VJPs."""
    half = np.sqrt(0.5).astype(x.dtype)
    return 0.5 * (1.0 + jax.lax.erf(x * half)) + x * jnp.exp(-0.5 * x * x) * (half / np.sqrt(np.pi)).astype(x.dtype)


class GELU(nnx.Module):
    """Parameter-free GELU module, so that `proj` sequences keep the reference's indices (StemConv's proj.2)."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return gelu(x)


class DropRate(nnx.Variable):
    """A fixed drop probability held as state rather than structure, so that blocks differing only in their stochastic
    depth rate share one structure and can run under `jax.lax.scan`."""


class _RandomDrop(nnx.Module):
    """Zeroes slices of the input with probability `rate` and scales the kept ones by 1 / (1 - rate); identity when
    deterministic (`model.eval()`). Subclasses choose which slices share one draw.

    Random keys come from `rngs` given at call time (an `nnx.Rngs`, or a key), else from the module's own stream.
    """

    def __init__(self, rate: float | DropRate, *, rngs: nnx.Rngs | None = None):
        self.rate = rate
        self.deterministic = False
        self.rngs = rngs["dropout"].fork() if rngs is not None else nnx.data(None)

    def mask_shape(self, x: jax.Array) -> tuple[int, ...]:
        raise NotImplementedError

    def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | jax.Array | None = None) -> jax.Array:
        rate = self.rate[...] if isinstance(self.rate, DropRate) else self.rate
        if self.deterministic or (isinstance(rate, float) and rate == 0.0):
            return x
        if isinstance(rngs, nnx.Rngs):
            key = rngs["dropout"]()
        elif rngs is not None:
            key = rngs
        elif self.rngs is not None:
            key = self.rngs()
        else:
            raise ValueError(
                f"{type(self).__name__} in training mode needs random numbers: build the model with rngs= or pass rngs="
            )
        keep = 1.0 - rate
        mask = jax.random.bernoulli(key, keep, self.mask_shape(x))
        return jnp.where(mask, x / keep, 0).astype(x.dtype)


class DropPath(_RandomDrop):
    """Stochastic depth per sample (mmcv `DropPath`): a whole residual branch is dropped for a sample."""

    def __init__(self, rate: float, *, rngs: nnx.Rngs | None = None):
        super().__init__(DropRate(jnp.asarray(rate, jnp.float32)), rngs=rngs)

    def mask_shape(self, x: jax.Array) -> tuple[int, ...]:
        return (x.shape[0],) + (1,) * (x.ndim - 1)


class Dropout2d(_RandomDrop):
    """PyTorch's `nn.Dropout2d` for NHWC: whole channels are dropped per sample."""

    def mask_shape(self, x: jax.Array) -> tuple[int, ...]:
        return (x.shape[0], 1, 1, x.shape[-1])


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Bilinear resize of NHWC `x` to `size` (h, w), equal to PyTorch's `F.interpolate(..., 'bilinear',
    align_corners=False)` in both directions (no antialiasing when shrinking)."""
    if tuple(x.shape[1:3]) == tuple(size):
        return x
    return jax.image.resize(x, (x.shape[0], *size, x.shape[-1]), "bilinear", antialias=False)
