"""The reference's decode-head loss (segnext_reference.md §3.4): mmseg `BaseDecodeHead.loss_by_feat` with
`CrossEntropyLoss(use_sigmoid=False, avg_non_ignore=False)`.

The logits are upsampled to the label size (8x: 512x512 crops give 64x64 logits), so the reference builds a
full-resolution (N, H, W, K) logit tensor, its softmax and their gradients: 315 MB each for two 512x512 images of
ADE20K's 150 classes. When the label size is an integer multiple of the logits' size, the upsampling here is a
fixed interpolation between neighbours that XLA fuses into the cross-entropy's reductions, and the hand-written
gradient recomputes it, so no full-resolution tensor is kept; other sizes take `jax.image.resize`. On CPU, C++
kernels (segnext_jax.kernels.cross_entropy) do the upsampling and the cross-entropy pixel by pixel for any size:
XLA:CPU runs the fused form's loops over the full-resolution pixels slowly (about 1 s for the forward and backward
of two 512x512 crops on two cores, the kernels 0.1 s).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from segnext_jax import backend
from segnext_jax.kernels import cross_entropy as native_kernels

IMPLEMENTATIONS = ("auto", "xla", "native")


def _interpolation_weights(factor: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(previous, own, next) input weights of the `factor` outputs of one input position, for bilinear upsampling
    with half-pixel centres (PyTorch `align_corners=False`): output f*i + r samples input i + (2r + 1 - f) / 2f."""
    offset = (2 * np.arange(factor) + 1 - factor) / (2 * factor)
    previous, following = np.maximum(-offset, 0), np.maximum(offset, 0)
    return previous, 1 - previous - following, following


def _upsample_axis(x: jax.Array, axis: int, factor: int) -> jax.Array:
    """Bilinear upsampling of `x` by an integer `factor` along `axis` (1 or 2 of NHWC), edges clamped as PyTorch."""
    if factor == 1:
        return x
    size = x.shape[axis]
    padded = jnp.concatenate(
        [jax.lax.slice_in_dim(x, 0, 1, axis=axis), x, jax.lax.slice_in_dim(x, size - 1, size, axis=axis)], axis=axis
    )
    previous, own, following = (jax.lax.slice_in_dim(padded, start, start + size, axis=axis) for start in range(3))
    outputs = []
    for weights in zip(*_interpolation_weights(factor)):
        terms = [float(w) * v for w, v in zip(weights, (previous, own, following)) if w]
        outputs.append(functools.reduce(jnp.add, terms))
    shape = list(x.shape)
    shape[axis] *= factor
    return jnp.stack(outputs, axis=axis + 1).reshape(shape)


def upsample_bilinear(x: jax.Array, factors: tuple[int, int]) -> jax.Array:
    """NHWC `x` upsampled by integer (fh, fw), equal to `F.interpolate(..., scale_factor, 'bilinear',
    align_corners=False)` (and to `jax.image.resize` to that size) up to float32 rounding."""
    return _upsample_axis(_upsample_axis(x, 1, factors[0]), 2, factors[1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _summed_cross_entropy(logits: jax.Array, labels: jax.Array, factors: tuple[int, int], ignore_index: int):
    """Sum over the pixels of `labels` (not `ignore_index`) of the cross-entropy of the upsampled float32 logits."""
    return _summed_cross_entropy_fwd(logits, labels, factors, ignore_index)[0]


def _summed_cross_entropy_fwd(logits, labels, factors, ignore_index):
    up = upsample_bilinear(logits, factors)
    log_normaliser = jax.nn.logsumexp(up, axis=-1)
    valid = labels != ignore_index
    picked = jnp.take_along_axis(up, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
    total = jnp.sum(jnp.where(valid, log_normaliser - picked, 0.0))
    return total, (logits, labels, log_normaliser)


def _summed_cross_entropy_bwd(factors, ignore_index, residuals, grad):
    logits, labels, log_normaliser = residuals
    up, upsample_vjp = jax.vjp(lambda x: upsample_bilinear(x, factors), logits)
    classes = jnp.arange(up.shape[-1], dtype=labels.dtype)
    grad_up = jnp.exp(up - log_normaliser[..., None]) - (labels[..., None] == classes)
    grad_up = jnp.where((labels != ignore_index)[..., None], grad_up * grad, 0.0)
    (grad_logits,) = upsample_vjp(grad_up)
    return grad_logits, None


_summed_cross_entropy.defvjp(_summed_cross_entropy_fwd, _summed_cross_entropy_bwd)


def resolve_impl(impl: str) -> str:
    """'native' or 'xla' for `impl`: 'auto' is the current backend policy's (`segnext_jax.backend.current()`:
    native on CPU when the kernels build, else xla)."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"loss impl={impl!r} is not one of {IMPLEMENTATIONS}")
    return backend.current().loss_impl if impl == "auto" else impl


def segmentation_loss(logits: jax.Array, labels: jax.Array, ignore_index: int = 255, impl: str = "auto") -> jax.Array:
    """Mean softmax cross-entropy of `logits` (N, h, w, K) upsampled to `labels` (N, H, W) int.

    The logits are resized bilinearly with half-pixel centres (torch `align_corners=False`, no antialias) in
    float32 whatever their dtype. Pixels labelled `ignore_index` contribute 0 but still count in the
    denominator: the loss is averaged over all N*H*W pixels, as the reference does. `impl`: 'native' (the CPU
    kernels), 'xla' or 'auto' (the backend policy's: native on CPU when available), resolved when traced.
    """
    n, h, w, k = logits.shape
    height, width = labels.shape[1:]
    logits = logits.astype(jnp.float32)
    if resolve_impl(impl) == "native":
        return native_kernels.summed_cross_entropy(logits, labels, ignore_index) / labels.size
    if height % h == 0 and width % w == 0:
        total = _summed_cross_entropy(logits, labels, (height // h, width // w), ignore_index)
        return total / labels.size
    logits = jax.image.resize(logits, (n, height, width, k), "bilinear", antialias=False)
    valid = labels != ignore_index
    losses = optax.losses.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, labels, 0))
    return jnp.sum(jnp.where(valid, losses, 0.0)) / labels.size
