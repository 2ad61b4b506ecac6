"""Validation: inference as config.eval says over a whole split, one confusion matrix, MMSegmentation's metrics.

Each image goes through `inference.infer_multiscale` with the uint8 image at its original size: keep-ratio resize to
`config.data.test_scale` times each of `config.eval.scales` (just 1.0 for the reference's single-scale test),
optional flip, whole-image (padded to a multiple of 32) or sliding-window inference, logits back at the original
size; the prediction is the argmax of the averaged class probabilities. Image i of the split draws its NMF bases
from `fold_in(key(config.eval.seed), i)`, so a checkpoint's score is repeatable whatever the batching or the number
of hosts. With several processes each evaluates every process_count-th image on its own first device and the
confusion matrices are summed. A bad example (see `segnext_jax.data.loading`; images and labels over
`config.data.max_image_pixels` included) ends the evaluation with a one-line `pipeline.BadDataError`.

Outputs: the metrics (fractions, NaN for a class absent from ground truth and prediction),
WORKDIR/eval/step_<N>.json (NaN written as null), a log summary with per-class IoU and accuracy, and for the first
`config.train.sample_predictions` images an image | ground truth | prediction overlay, as
WORKDIR/eval/step_<N>/<name>.png and in TensorBoard.
"""

import functools
import json
import math
import os
import time
from collections.abc import Iterator
from typing import Any

import grain
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

OVERLAY_ALPHA = 0.5  # weight of the class colour over the image in the overlays


def _load(index: int, source: sources.Source, max_image_pixels: int) -> dict[str, Any]:
    """Example `index` of the split with its index; a bad one raises a one-line BadDataError."""
    try:
        example = source.load(loading.with_size_limit(source.records[index], max_image_pixels))
    except loading.BadExampleError as error:
        raise pipeline.BadDataError(f"bad evaluation example: {error}") from None
    return dict(example, index=index)


def _batches(examples: Iterator[dict[str, Any]], batch_size: int) -> Iterator[list[dict[str, Any]]]:
    """Consecutive examples grouped by up to `batch_size` of one image size."""
    batch = []
    for example in examples:
        if batch and (len(batch) == batch_size or example["image"].shape != batch[0]["image"].shape):
            yield batch
            batch = []
        batch.append(example)
    if batch:
        yield batch


def predict(model: nnx.Module, images: np.ndarray, indices: np.ndarray, config: ml_collections.ConfigDict) -> jax.Array:
    """Class maps (N, H, W) int32 of uint8 RGB `images` (N, H, W, 3), image `indices` of the split seeding the NMF."""
    keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(config.eval.seed), jnp.asarray(indices))
    probs = inference.infer_multiscale(
        model,
        images,
        scales=tuple(config.eval.scales),
        flip=config.eval.flip,
        key=keys,
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


def overlay(image: np.ndarray, label: np.ndarray, prediction: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """(H, 3W, 3) uint8 panel: image | ground truth | prediction, classes in palette colours blended over the image
    (ignored pixels left as the image)."""

    def paint(classes: np.ndarray) -> np.ndarray:
        known = classes < len(palette)
        colours = palette[np.where(known, classes, 0)].astype(np.float32)
        blended = (1 - OVERLAY_ALPHA) * image + OVERLAY_ALPHA * colours
        return np.where(known[..., None], blended, image).round().astype(np.uint8)

    return np.concatenate([image, paint(label), paint(prediction)], axis=1)


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
    shard = range(jax.process_index(), len(source.records), jax.process_count())
    max_image_pixels = config.data.get("max_image_pixels", loading.DEFAULT_MAX_IMAGE_PIXELS)
    examples = grain.MapDataset.source(shard).map(
        functools.partial(_load, source=source, max_image_pixels=max_image_pixels)
    )
    read_options = grain.ReadOptions(num_threads=4, prefetch_buffer_size=2 * batch_size)
    started = time.perf_counter()
    logging.info("evaluating step %d on %d %s images of %s", step, len(source.records), split, spec.name)
    confusion = np.zeros((spec.num_classes, spec.num_classes), np.int64)
    samples = []
    for batch in _batches(iter(examples.to_iter_dataset(read_options)), batch_size):
        padding = [batch[-1]] * (batch_size - len(batch))  # a full batch: one compilation per image size
        images = np.stack([example["image"] for example in batch + padding])
        indices = np.array([example["index"] for example in batch + padding])
        predictions = predict(model, images, indices, config)[: len(batch)]
        labels = np.stack([example["label"] for example in batch])
        confusion += np.asarray(metrics.confusion_matrix(predictions, labels, spec.num_classes), np.int64)
        for example, prediction in zip(batch, np.asarray(predictions)):
            if len(samples) < config.train.sample_predictions:
                samples.append((example["name"], overlay(example["image"], example["label"], prediction, palette)))
    results = metrics.compute_metrics(_sum_over_processes(confusion), spec.class_names)
    if jax.process_index() == 0:
        _report(results, step, split, time.perf_counter() - started, samples, workdir, writer, config)
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
        step, split, results["mIoU"], results["mAcc"], results["aAcc"], seconds,
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
