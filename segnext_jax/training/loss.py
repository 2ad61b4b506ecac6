"""The reference's decode-head loss: MMSegmentation 1.2.2's `BaseDecodeHead.loss_by_feat` with
`CrossEntropyLoss(use_sigmoid=False, avg_non_ignore=False)`.

The logits are upsampled to the label size (8x: 512x512 crops give 64x64 logits), so the reference builds a
full-resolution (N, H, W, K) logit tensor, its softmax and their gradients: 315 MB each for two 512x512 images of
ADE20K's 150 classes. When the label size is an integer multiple of the logits' size, the upsampling here is a
fixed interpolation between each logit's 3 x 3 neighbours, one set of weights per output phase (`upsampled_phases`),
which XLA fuses into the cross-entropy's reductions, and the hand-written gradient recomputes it inside one reduction
per neighbour: no full-resolution tensor is written (on a TPU this took the loss from about a quarter of the training
step's memory traffic to a small share); other sizes take `jax.image.resize`. On CPU, C++
kernels (segnext_jax.kernels.cross_entropy) do the upsampling and the cross-entropy pixel by pixel for any size:
XLA:CPU runs the fused form's loops over the full-resolution pixels several times slower (benchmarks/README.md).
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


def interpolation_weights(factor: int) -> np.ndarray:
    """(3, factor): the weights of input positions i - 1, i and i + 1 in output f*i + r, for bilinear upsampling by
    `factor` with half-pixel centres (PyTorch `align_corners=False`): output f*i + r samples input
    i + (2r + 1 - f) / 2f."""
    offset = (2 * np.arange(factor) + 1 - factor) / (2 * factor)
    previous, following = np.maximum(-offset, 0), np.maximum(offset, 0)
    return np.stack([previous, 1 - previous - following, following]).astype(np.float32)


def neighbour_views(x: jax.Array) -> list[list[jax.Array]]:
    """NHWC `x` shifted by -1, 0 and +1 rows ([p]) and columns ([p][q]), edges clamped: slices of one padded array,
    never stacked, so that a fusion consuming them reads `x` once."""
    h, w = x.shape[1:3]
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    return [[padded[:, p : p + h, q : q + w] for q in range(3)] for p in range(3)]


def _phase_weights(factors: tuple[int, int]) -> np.ndarray:
    """(3, 3, fh * fw): the weight of neighbour view (p, q) in output phase a * fw + b."""
    rows, columns = interpolation_weights(factors[0]), interpolation_weights(factors[1])
    return (rows[:, None, :, None] * columns[None, :, None, :]).reshape(3, 3, -1)


def upsampled_phases(views: list[list[jax.Array]], factors: tuple[int, int]) -> jax.Array:
    """(fh * fw, N, h, w, K): the bilinear upsampling by integer `factors` of the array whose `neighbour_views` are
    `views`, output pixel (fh*i + a, fw*j + b) at [a * fw + b, :, i, j]. A sum of nine broadcast products,
    element-wise, so that XLA fuses it into whatever consumes it: the full-resolution tensor is never written. The
    phases share one axis: as two small axes (fh, fw) a TPU would pad the minor one to 128 lanes."""
    weights = _phase_weights(factors)
    terms = [
        jnp.asarray(weights[p, q])[:, None, None, None, None] * views[p][q]
        for p in range(3)
        for q in range(3)
        if weights[p, q].any()
    ]
    return functools.reduce(jnp.add, terms)


def _label_phases(labels: jax.Array, factors: tuple[int, int]) -> jax.Array:
    """(N, H, W) labels as (fh * fw, N, h, w), matching `upsampled_phases`."""
    n, height, width = labels.shape
    (fh, fw) = factors
    phases = labels.reshape(n, height // fh, fh, width // fw, fw).transpose(2, 4, 0, 1, 3)
    return phases.reshape(fh * fw, n, height // fh, width // fw)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _summed_cross_entropy(logits: jax.Array, labels: jax.Array, factors: tuple[int, int], ignore_index: int):
    """Sum over the pixels of `labels` (not `ignore_index`) of the cross-entropy of the upsampled float32 logits."""
    return _summed_cross_entropy_fwd(logits, labels, factors, ignore_index)[0]


def _summed_cross_entropy_fwd(logits, labels, factors, ignore_index):
    phases = _label_phases(labels, factors)
    up = upsampled_phases(neighbour_views(logits), factors)
    log_normaliser = jax.nn.logsumexp(up, axis=-1)
    valid = phases != ignore_index
    classes = jnp.arange(up.shape[-1], dtype=phases.dtype)
    picked = jnp.sum(jnp.where(phases[..., None] == classes, up, 0.0), axis=-1)  # a reduction, not a gather
    total = jnp.sum(jnp.where(valid, log_normaliser - picked, 0.0))
    return total, (logits, phases, log_normaliser)


def _summed_cross_entropy_bwd(factors, ignore_index, residuals, grad):
    """d total / d logits: the softmax minus the one-hot label at every full-resolution pixel, summed per neighbour
    view over the phases with that view's weights (one matrix product with the softmax computed in its operand: no
    full-resolution tensor is written), then the views' own VJP."""
    logits, phases, log_normaliser = residuals
    views, views_vjp = jax.vjp(neighbour_views, logits)
    up = upsampled_phases(views, factors)
    classes = jnp.arange(up.shape[-1], dtype=phases.dtype)
    grad_up = jnp.exp(up - log_normaliser[..., None]) - (phases[..., None] == classes)
    grad_up = jnp.where((phases != ignore_index)[..., None], grad_up * grad, 0.0)
    weights = jnp.asarray(_phase_weights(factors))
    grad_views = jnp.einsum("pqa,anhwk->pqnhwk", weights, grad_up, precision=jax.lax.Precision.HIGHEST)
    (grad_logits,) = views_vjp([[grad_views[p, q] for q in range(3)] for p in range(3)])
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
