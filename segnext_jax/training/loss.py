"""The reference's decode-head loss (segnext_reference.md §3.4): mmseg `BaseDecodeHead.loss_by_feat` with
`CrossEntropyLoss(use_sigmoid=False, avg_non_ignore=False)`."""

import jax
import jax.numpy as jnp
import optax


def segmentation_loss(logits: jax.Array, labels: jax.Array, ignore_index: int = 255) -> jax.Array:
    """Mean softmax cross-entropy of `logits` (N, h, w, K) upsampled to `labels` (N, H, W) int.

    The logits are resized bilinearly with half-pixel centres (torch `align_corners=False`, no antialias) in
    float32 whatever their dtype. Pixels labelled `ignore_index` contribute 0 but still count in the
    denominator: the loss is averaged over all N*H*W pixels, as the reference does.
    """
    n, _, _, k = logits.shape
    height, width = labels.shape[1:]
    logits = jax.image.resize(logits.astype(jnp.float32), (n, height, width, k), "bilinear", antialias=False)
    valid = labels != ignore_index
    losses = optax.losses.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, labels, 0))
    return jnp.sum(jnp.where(valid, losses, 0.0)) / labels.size
