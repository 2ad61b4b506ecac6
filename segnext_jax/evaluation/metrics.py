"""Segmentation metrics equal to mmseg's `IoUMetric` (aAcc, mIoU, mAcc, per-class IoU and Acc).

`confusion_matrix` counts one batch on device; sum the batches on the host in int64 (`np.add`), then
`compute_metrics` gives the scores. mmseg sums per-image histograms in float32, which rounds counts above
2**24 per class; here counts are exact integers, otherwise the arithmetic is the same: IoU = intersect /
union and Acc = intersect / area_label per class (0/0 gives NaN: a class absent from both ground truth and
prediction has NaN IoU and Acc, a class only predicted has IoU 0 and Acc NaN), the means skip NaN
(`np.nanmean`), and aAcc = sum(intersect) / sum(area_label). mmseg reports percentages rounded to two
decimals; these are unrounded fractions.
"""

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np


@partial(jax.jit, static_argnames=("num_classes", "ignore_index"))
def confusion_matrix(preds: jax.Array, labels: jax.Array, num_classes: int, ignore_index: int = 255) -> jax.Array:
    """(K, K) int32 pixel counts, row = ground-truth class, column = predicted class, for one batch.

    `preds` and `labels` are integer arrays of the same shape; `preds` must lie in [0, K). Pixels whose label is
    `ignore_index` (or any value outside [0, K)) are not counted.
    """
    preds, labels = preds.astype(jnp.int32), labels.astype(jnp.int32)
    valid = (labels >= 0) & (labels < num_classes) & (labels != ignore_index)
    cells = jnp.where(valid, labels * num_classes + preds, num_classes * num_classes)
    counts = jnp.bincount(cells.ravel(), length=num_classes * num_classes + 1)
    return counts[:-1].reshape(num_classes, num_classes).astype(jnp.int32)


def intersect_and_union(confusion: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-class (area_intersect, area_union, area_pred_label, area_label), as mmseg's `intersect_and_union`."""
    confusion = np.asarray(confusion, dtype=np.int64)
    area_intersect = np.diag(confusion)
    area_label = confusion.sum(axis=1)
    area_pred_label = confusion.sum(axis=0)
    return area_intersect, area_pred_label + area_label - area_intersect, area_pred_label, area_label


def compute_metrics(confusion: np.ndarray, class_names: Sequence[str]) -> dict:
    """{'aAcc', 'mIoU', 'mAcc': float, 'IoU', 'Acc': {class name: float (NaN where undefined)}} as fractions."""
    confusion = np.asarray(confusion)
    if confusion.shape != (len(class_names), len(class_names)):
        raise ValueError(f"confusion matrix of shape {confusion.shape} does not match {len(class_names)} class names")
    area_intersect, area_union, _, area_label = intersect_and_union(confusion)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = area_intersect / area_union
        acc = area_intersect / area_label
        all_acc = area_intersect.sum() / area_label.sum()
    return {
        "aAcc": float(all_acc),
        "mIoU": float(np.nanmean(iou)),
        "mAcc": float(np.nanmean(acc)),
        "IoU": dict(zip(class_names, iou.tolist())),
        "Acc": dict(zip(class_names, acc.tolist())),
    }
