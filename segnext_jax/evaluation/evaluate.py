"""Validation: inference as config.eval says over a whole split, one confusion matrix, MMSegmentation's metrics.

The split's examples come from `pipeline.make_eval_dataset` (uint8 images at their original size). Each image goes
through `inference.infer_multiscale`: keep-ratio resize to `config.data.test_scale` times each of
`config.eval.scales` (just 1.0 for the reference's single-scale test), optional flip, whole-image (padded to a
multiple of 32) or sliding-window inference, logits back at the original size; the prediction is the argmax of the
averaged class probabilities. Images of one size are batched together (`serving.batching`); image i of the split
draws its NMF bases from `fold_in(key(config.eval.seed), i)` (`inference.indexed_keys`), so a checkpoint's score is
repeatable whatever the batching or the number of hosts. With several processes each evaluates every
process_count-th image on its own first device and the confusion matrices are summed. A bad example (see
`segnext_jax.data.loading`; images and labels over `config.data.max_image_pixels` included) ends the evaluation with
a one-line `pipeline.BadDataError`.

Outputs: the metrics (fractions, NaN for a class absent from ground truth and prediction),
WORKDIR/eval/step_<N>.json (NaN written as null), a log summary with per-class IoU and accuracy, and for the first
`config.train.sample_predictions` images of process 0 an image | ground truth | prediction overlay
(`serving.drawing.comparison_panel`), as WORKDIR/eval/step_<N>/<name>.png and in TensorBoard.
"""

import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils
from PIL import Image
from tensorboardX import SummaryWriter

from segnext_jax.data import loading, pipeline, sources
from segnext_jax.evaluation import inference, metrics
from segnext_jax.serving import drawing
from segnext_jax.serving.batching import batches_by_size


def predict(model: nnx.Module, images: np.ndarray, indices: np.ndarray, config: ml_collections.ConfigDict) -> jax.Array:
    """Class maps (N, H, W) int32 of uint8 RGB `images` (N, H, W, 3), image `indices` of the split seeding the NMF."""
    probs = inference.infer_multiscale(
        model,
        images,
        scales=tuple(config.eval.scales),
        flip=config.eval.flip,
        key=inference.indexed_keys(jax.random.key(config.eval.seed), indices),
        test_scale=tuple(config.data.test_scale),
        mode=config.eval.mode,
        crop_size=tuple(config.eval.crop_size),
        stride=tuple(config.eval.stride),
    )
    return jnp.argmax(probs, axis=-1).astype(jnp.int32)


def _sum_over_processes(counts: np.ndarray) -> np.ndarray:
    """Sum of every process's int64 `counts`, exact (sent as two int32 halves: jax arrays are 32-bit by default)."""
    if jax.process_count() == 1:
        return counts
    high, low = np.divmod(counts, 2**30)
    gathered = np.asarray(multihost_utils.process_allgather(np.stack([high, low]).astype(np.int32)), np.int64)
    return (gathered[:, 0] << 30).sum(axis=0) + gathered[:, 1].sum(axis=0)


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    return None if isinstance(value, float) and math.isnan(value) else value


def evaluate(
    model: nnx.Module,
    config: ml_collections.ConfigDict,
    *,
    step: int,
    workdir: str | None = None,
    writer: SummaryWriter | None = None,
    split: str = "val",
) -> dict[str, Any]:
    """Scores `model` on `split` of config.data: {'aAcc', 'mIoU', 'mAcc': float, 'IoU', 'Acc': {class: float}}.

    Every process calls it (each with its own copy of the model). Process 0 logs the results and, given `workdir`,
    writes WORKDIR/eval/step_<step>.json and the overlay PNGs; given `writer`, adds them to TensorBoard at `step`.
    """
    source = sources.open_source(
        config.data.dataset, config.data.root, split, config.data.source, config.data.get("reduce_zero_label")
    )
    spec = source.spec  # the folder dataset's spec is read from its root
    palette = np.asarray(spec.palette, np.uint8)
    batch_size = config.eval.batch_size
    examples = pipeline.make_eval_dataset(
        source,
        read_threads=4,
        prefetch=2 * batch_size,
        max_image_pixels=config.data.get("max_image_pixels", loading.DEFAULT_MAX_IMAGE_PIXELS),
    )
    started = time.perf_counter()
    logging.info("evaluating step %d on %d %s images of %s", step, len(source.records), split, spec.name)
    confusion = np.zeros((spec.num_classes, spec.num_classes), np.int64)
    samples = {}  # index -> (name, panel) of this process's first images (batches may leave out of order)
    for batch in batches_by_size(examples, batch_size, lambda example: example["image"].shape):
        padding = [batch[-1]] * (batch_size - len(batch))  # a full batch: one compilation per image size
        images = np.stack([example["image"] for example in batch + padding])
        indices = np.array([example["index"] for example in batch + padding])
        predictions = predict(model, images, indices, config)[: len(batch)]
        labels = np.stack([example["label"] for example in batch])
        confusion += np.asarray(metrics.confusion_matrix(predictions, labels, spec.num_classes), np.int64)
        for example, prediction in zip(batch, np.asarray(predictions)):
            if example["index"] // jax.process_count() < config.train.sample_predictions:
                panel = drawing.comparison_panel(example["image"], example["label"], prediction, palette)
                samples[example["index"]] = (example["name"], panel)
    results = metrics.compute_metrics(_sum_over_processes(confusion), spec.class_names)
    if jax.process_index() == 0:
        ordered = [samples[index] for index in sorted(samples)]
        _report(results, step, split, time.perf_counter() - started, ordered, workdir, writer, config)
    return results


def _report(
    results: dict[str, Any],
    step: int,
    split: str,
    seconds: float,
    samples: list[tuple[str, np.ndarray]],
    workdir: str | None,
    writer: SummaryWriter | None,
    config: ml_collections.ConfigDict,
) -> None:
    """Logs the results and writes them to WORKDIR/eval and TensorBoard."""
    logging.info(
        "step %d %s: mIoU %.4f  mAcc %.4f  aAcc %.4f  (%.0f s)",
        step,
        split,
        results["mIoU"],
        results["mAcc"],
        results["aAcc"],
        seconds,
    )
    for name in results["IoU"]:
        logging.info("  %-24s IoU %.4f  Acc %.4f", name, results["IoU"][name], results["Acc"][name])
    if workdir is not None:
        directory = os.path.join(workdir, "eval")
        os.makedirs(os.path.join(directory, f"step_{step}"), exist_ok=True)
        record = {"step": step, "split": split, "dataset": config.data.dataset, "eval": config.eval.to_dict()}
        with open(os.path.join(directory, f"step_{step}.json"), "w") as f:
            json.dump(_finite_or_none({**record, **results}), f, indent=2)
        for name, panel in samples:
            Image.fromarray(panel).save(os.path.join(directory, f"step_{step}", f"{name.replace('/', '_')}.png"))
    if writer is not None:
        for name in ("mIoU", "mAcc", "aAcc"):
            writer.add_scalar(f"{split}/{name}", results[name], step)
        for name, value in results["IoU"].items():
            if not math.isnan(value):
                writer.add_scalar(f"{split}_IoU/{name}", value, step)
        for name, panel in samples:
            writer.add_image(f"{split}_predictions/{name}", panel, step, dataformats="HWC")
        writer.flush()
