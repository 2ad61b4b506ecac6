"""segnext_jax.evaluation.evaluate: the validation loop's scores equal MMSegmentation's IoUMetric computed image by
image, are repeatable (seeded NMF) and are written to WORKDIR/eval."""

import json
import math
import os
import runpy
import sys

import numpy as np
import pytest
import torch
from flax import nnx
from oracle import import_mmseg

sys.path.insert(0, os.path.dirname(__file__))
import data_fakes

from segnext_jax import models
from segnext_jax.data import pipeline, sources
from segnext_jax.evaluation import evaluate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def config():
    config = runpy.run_path(os.path.join(REPO, "configs", "demo.py"))["get_config"]()
    config.data.test_scale = (64, 32)  # the 128 px demo images enter the network at 32 px (output back at 128)
    config.train.sample_predictions = 3
    return config


@pytest.fixture(scope="module")
def model():
    """A random tiny SegNeXt in evaluation mode (its predictions are varied enough to exercise every class)."""
    tiny = models.Variant((32, 32, 64, 64), (1, 1, 1, 1), 0.1, 64, 8)
    model = models.create(tiny, 6, rngs=nnx.Rngs(3), depthwise_impl="xla")
    model.eval()
    return model


@pytest.fixture(scope="module")
def scored(model, config, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("eval"))
    return workdir, evaluate.evaluate(model, config, step=7, workdir=workdir)


def test_scores_equal_mmseg_iou_metric(model, config, scored):
    """The oracle: the validation images predicted in other batches (in reverse order, 8 at a time, so no batch and
    no padding is as in evaluate()) and scored with mmseg's IoUMetric.intersect_and_union / total_area_to_metrics.
    Each image's NMF bases come from its index alone, so up to float rounding in the network the predictions, and
    the scores, are the same (a key drawn per batch position instead would change aAcc by about 1e-3)."""
    import_mmseg()
    from mmseg.evaluation import IoUMetric

    source = sources.open_source("demo", None, "val")
    indices = np.arange(len(source.records))[::-1]
    areas = []
    for start in range(0, len(indices), 8):
        batch = indices[start : start + 8]
        examples = [source.load(source.records[i]) for i in batch]
        images = np.stack([example["image"] for example in examples])
        predictions = np.asarray(evaluate.predict(model, images, batch, config))
        for example, prediction in zip(examples, predictions):
            label = torch.tensor(example["label"])
            areas.append(IoUMetric.intersect_and_union(torch.tensor(prediction), label, 6, 255))
    totals = [sum(area) for area in zip(*areas)]
    expected = IoUMetric.total_area_to_metrics(*totals, metrics=["mIoU"])
    _, results = scored
    assert results["aAcc"] == pytest.approx(float(expected["aAcc"]), abs=1e-4)
    assert results["mIoU"] == pytest.approx(float(np.nanmean(expected["IoU"])), abs=1e-4)
    assert results["mAcc"] == pytest.approx(float(np.nanmean(expected["Acc"])), abs=1e-4)
    np.testing.assert_allclose(list(results["IoU"].values()), expected["IoU"], atol=1e-4)
    assert 0.05 < results["aAcc"] < 0.95 and len({v for v in results["IoU"].values() if v > 0}) > 1


def test_scores_are_repeatable_and_written(model, config, scored):
    workdir, results = scored
    assert evaluate.evaluate(model, config, step=7) == results  # the NMF bases are seeded per image
    with open(os.path.join(workdir, "eval", "step_7.json")) as f:
        record = json.load(f)
    assert record["step"] == 7 and record["dataset"] == "demo" and record["eval"]["mode"] == "whole"
    for name in ("aAcc", "mIoU", "mAcc"):
        assert record[name] == results[name]
    assert record["IoU"] == {k: (None if math.isnan(v) else v) for k, v in results["IoU"].items()}
    overlays = sorted(os.listdir(os.path.join(workdir, "eval", "step_7")))
    assert overlays == ["demo_val_00000.png", "demo_val_00001.png", "demo_val_00002.png"]


def test_mixed_sizes_score_as_one_image_at_a_time_and_draw_the_first_images(model, tmp_path):
    """Images are batched by size, so they may run out of order (sizes A B A B with batches of 2: images 0 and 2
    first); the scores equal those of one image at a time and the overlays are still of the split's first images."""
    sizes = [(32, 40), (40, 32), (32, 40), (40, 32)]
    masks = {f"v{i}": data_fakes.random_label(*size, 0, 6, seed=i) for i, size in enumerate(sizes)}
    root = data_fakes.make_folder(str(tmp_path / "data"), {"val": masks}, [f"class {k}" for k in range(6)])
    config = runpy.run_path(os.path.join(REPO, "configs", "demo.py"))["get_config"]()
    config.data.dataset, config.data.root, config.data.test_scale = "folder", root, (64, 32)
    config.eval.batch_size, config.train.sample_predictions = 2, 2
    paired = evaluate.evaluate(model, config, step=1, workdir=str(tmp_path / "paired"))
    config.eval.batch_size = 1
    alone = evaluate.evaluate(model, config, step=1)
    for name in ("aAcc", "mIoU", "mAcc"):
        assert paired[name] == pytest.approx(alone[name], abs=1e-6)
    assert sorted(os.listdir(tmp_path / "paired" / "eval" / "step_1")) == ["v0.png", "v1.png"]


def test_image_over_the_configured_pixel_limit_stops_evaluation_in_one_line(model, tmp_path):
    """config.data.max_image_pixels reaches evaluation's own reader: the first validation image, 56 x 40 pixels, is
    over a limit of 2000 (read before the model runs)."""
    root = data_fakes.make_ade20k(str(tmp_path / "ade"), num_train=1, num_val=2)
    config = runpy.run_path(os.path.join(REPO, "configs", "demo.py"))["get_config"]()
    config.data.dataset, config.data.root, config.data.max_image_pixels = "ade20k", root, 2000
    image = f"{root}/images/validation/ADE_val_00000000.jpg"
    reason = "56 x 40 = 2,240 pixels, over the limit of 2,000 (config.data.max_image_pixels)"
    with pytest.raises(pipeline.BadDataError) as stopped:
        evaluate.evaluate(model, config, step=0)
    assert str(stopped.value) == f"bad evaluation example: {image}: {reason}"
