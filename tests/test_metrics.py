"""Metrics against mmseg's IoUMetric on the same predictions and labels."""

import numpy as np
import pytest
import torch
from oracle import import_mmseg

from segnext_jax.evaluation.metrics import compute_metrics, confusion_matrix, intersect_and_union

CLASSES = ("wall", "sky", "floor", "tree", "only_predicted", "absent")


@pytest.fixture(scope="module")
def data():
    """4 images of 37x53: labels in classes 0-3 or 255 (ignored, ~15%); predictions in 0-4, right ~60% of the time."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, (4, 37, 53)).astype(np.int32)
    preds = np.where(rng.random(labels.shape) < 0.6, labels, rng.integers(0, 5, labels.shape)).astype(np.int32)
    labels[rng.random(labels.shape) < 0.15] = 255
    return preds, labels


@pytest.fixture(scope="module")
def reference(data):
    """mmseg's IoUMetric fed one image at a time, as in its evaluation loop."""
    import_mmseg()
    from mmseg.evaluation import IoUMetric

    metric = IoUMetric(iou_metrics=["mIoU"])
    metric.dataset_meta = {"classes": CLASSES}
    for pred, label in zip(*data):
        sample = {
            "pred_sem_seg": {"data": torch.from_numpy(pred[None]).long()},
            "gt_sem_seg": {"data": torch.from_numpy(label[None]).long()},
        }
        metric.process({}, [sample])
    return metric


@pytest.fixture(scope="module")
def confusion(data):
    """Accumulated over two device batches of 2 images, summed in int64 on the host."""
    preds, labels = data
    total = np.zeros((len(CLASSES), len(CLASSES)), np.int64)
    for start in (0, 2):
        batch = confusion_matrix(preds[start : start + 2], labels[start : start + 2], num_classes=len(CLASSES))
        total += np.asarray(batch)
    return total


def test_areas_equal_intersect_and_union(reference, confusion):
    expected = [sum(area).numpy() for area in zip(*reference.results)]
    for ours, theirs in zip(intersect_and_union(confusion), expected):
        np.testing.assert_array_equal(ours, theirs)


def test_metrics_equal_iou_metric(reference, confusion):
    ours = compute_metrics(confusion, CLASSES)
    areas = [sum(area) for area in zip(*reference.results)]
    per_class = reference.total_area_to_metrics(*areas, metrics=["mIoU"])
    for key in ("IoU", "Acc"):
        np.testing.assert_allclose([ours[key][name] for name in CLASSES], per_class[key], rtol=1e-6)
    np.testing.assert_allclose(ours["aAcc"], per_class["aAcc"], rtol=1e-6)
    summary = reference.compute_metrics(reference.results)  # percentages rounded to 2 decimals
    assert {key: round(100 * ours[key], 2) for key in ("aAcc", "mIoU", "mAcc")} == summary
    # the undefined cases of the module docstring: NaN where 0/0, and left out of the means
    assert np.isnan(ours["IoU"]["absent"]) and np.isnan(ours["Acc"]["absent"])
    assert ours["IoU"]["only_predicted"] == 0.0 and np.isnan(ours["Acc"]["only_predicted"])
    assert ours["mAcc"] == pytest.approx(np.mean([ours["Acc"][name] for name in CLASSES[:4]]))


def test_ignored_and_out_of_range_labels_are_not_counted():
    labels = np.array([[0, 1, 255, 7]])
    preds = np.array([[0, 0, 1, 1]])
    np.testing.assert_array_equal(np.asarray(confusion_matrix(preds, labels, num_classes=2)), [[1, 0], [1, 0]])


def test_class_names_must_match_the_matrix():
    with pytest.raises(ValueError):
        compute_metrics(np.zeros((3, 3), np.int64), CLASSES)
