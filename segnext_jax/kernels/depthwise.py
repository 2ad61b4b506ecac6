"""JAX entry points of the C++ depth-wise convolution kernels for CPU (depthwise_cpu.cc), through the XLA FFI.

`available()` builds and registers them on first use (segnext_jax.kernels.build) and says whether that worked;
`unavailable_reason()` says why not. Setting SEGNEXT_JAX_NATIVE_KERNELS=0 turns them off. Float32 only.
"""

from __future__ import annotations

import functools
import os

import jax
import numpy as np
from absl import logging

from segnext_jax.kernels import build

LIBRARY = "depthwise_cpu"
FORWARD = "segnext_depthwise_forward"
KERNEL_GRAD = "segnext_depthwise_kernel_grad"
_SYMBOLS = {FORWARD: "SegnextDepthwiseForward", KERNEL_GRAD: "SegnextDepthwiseKernelGrad"}


@functools.cache
def unavailable_reason() -> str | None:
    """None once the kernels are compiled and registered with XLA:CPU, else why they cannot be (one line)."""
    if os.environ.get("SEGNEXT_JAX_NATIVE_KERNELS", "1") == "0":
        return "turned off by SEGNEXT_JAX_NATIVE_KERNELS=0"
    try:
        library = build.load(LIBRARY)
    except build.BuildError as error:
        logging.warning("native CPU depth-wise kernels unavailable, using the slower shift_add form: %s", error)
        return str(error)
    for target, symbol in _SYMBOLS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    return None


def available() -> bool:
    """Whether the native kernels can be used (builds them on the first call)."""
    return unavailable_reason() is None


def _require() -> None:
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"the native CPU depth-wise kernels are unavailable: {reason}")


def forward(x: jax.Array, taps: jax.Array, padding: tuple[int, int]) -> jax.Array:
    """Depth-wise cross-correlation of float32 NHWC `x` with `taps` (kh, kw, C), zero padding (ph, pw) per side."""
    _require()
    kh, kw, _ = taps.shape
    ph, pw = padding
    n, h, w, c = x.shape
    out = jax.ShapeDtypeStruct((n, h + 2 * ph - kh + 1, w + 2 * pw - kw + 1, c), x.dtype)
    return jax.ffi.ffi_call(FORWARD, out, vmap_method="sequential")(x, taps, ph=np.int64(ph), pw=np.int64(pw))


def kernel_grad(x: jax.Array, grad: jax.Array, kernel_size: tuple[int, int], padding: tuple[int, int]) -> jax.Array:
    """Gradient (kh, kw, C) of `forward(x, taps, padding)` with respect to the taps, for output gradient `grad`."""
    _require()
    (kh, kw), (ph, pw) = kernel_size, padding
    out = jax.ShapeDtypeStruct((kh, kw, x.shape[-1]), x.dtype)
    return jax.ffi.ffi_call(KERNEL_GRAD, out, vmap_method="sequential")(
        x, grad, kh=np.int64(kh), kw=np.int64(kw), ph=np.int64(ph), pw=np.int64(pw)
    )
