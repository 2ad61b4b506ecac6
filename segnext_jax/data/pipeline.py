"""grain pipelines for training and evaluation (sharding.global_batch turns their host batches into global arrays).

Training (`make_train_dataset`):

    records --seed--> global shuffle per epoch --> repeat --> random_map(load + reference augmentation)
      --> [process_index::process_count] --> iterator: drop bad examples (counted) --> batch(B_host)
      --> mp_prefetch(num_workers) --> count skipped examples

The augmentation's randomness is grain's per-example RNG, seeded by (seed, global position in the repeated stream),
and is drawn before the per-host slice, so an example gets the same augmentation whatever the number of hosts or
workers, and runs are reproducible. Every host must use the same seed and num_workers; each pass over the data
then uses every example once. With num_workers=0 the hosts' batches together are exactly the single-host global
batch; with workers, each worker batches its own slice of the host's stream, so which examples share a batch
depends on num_workers (never an example's augmentation). The iterator is checkpointable (`get_state()` /
`set_state()`, or `grain.checkpoint.CheckpointSave/Restore` in an orbax `Composite`): a restored iterator yields
exactly the batches the uninterrupted one would have, and its `num_skipped` count continues.

Bad examples (see `loading`; images and labels over `max_image_pixels` included): with bad_example='skip' they are
left out, logged (`path: reason`) and counted in `iterator.num_skipped`; with 'stop' the first one raises
`BadDataError` whose message is one line, `bad training example (bad_example='stop'): path: reason`. It reaches the
caller as BadDataError with that message whether the examples are loaded in this process or in prefetch workers.

Evaluation (`make_eval_dataset`) yields this process's share of a split one example at a time, in listing order:
dict(image=uint8 RGB (H, W, 3), label=int32 (H, W), both at the original size with reduce_zero_label applied,
name=str, index=its position in the split). The test-time resize and normalisation belong to the inference code
(`segnext_jax.evaluation.inference.network_input`), which resizes the original image once per test scale.
"""

import functools
from typing import Any

import grain
import jax
import numpy as np
from absl import logging

from segnext_jax.data import loading, sources, transforms

BAD_EXAMPLE_POLICIES = ("skip", "stop")


class BadDataError(RuntimeError):
    """A bad example met with bad_example='stop', or in evaluation; the message is one line ending with the
    `path: reason` report (print it, no traceback needed)."""


def _train_example(record: Any, rng: np.random.Generator, *, load, max_image_pixels: int, **transform_kwargs) -> dict:
    """Loads and augments one record; a bad one becomes dict(error=report) for the batcher to skip or stop on."""
    try:
        example = load(loading.with_size_limit(record, max_image_pixels))
    except loading.BadExampleError as error:
        return {"error": str(error)}
    image, label = transforms.train_transform(example["image"], example["label"], rng, **transform_kwargs)
    return {"image": image, "label": label}


class _DropBadIterator(grain.DatasetIterator):
    """Passes good examples on, each with `skipped` = number of bad ones dropped right before it."""

    def __init__(self, parent: grain.DatasetIterator, policy: str, max_consecutive: int):
        super().__init__(parent)
        self._policy = policy
        self._max_consecutive = max_consecutive

    def __next__(self) -> dict:
        skipped = 0
        while True:
            element = next(self._parent)
            if "error" not in element:
                return dict(element, skipped=np.int64(skipped))
            if self._policy == "stop":
                raise BadDataError(f"bad training example (bad_example='stop'): {element['error']}")
            logging.warning("skipping bad training example %s", element["error"])
            skipped += 1
            if skipped >= self._max_consecutive:
                raise BadDataError(f"{skipped} bad training examples in a row, the last {element['error']}")

    def get_state(self) -> dict:
        return self._parent.get_state()

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state)


class _DropBadDataset(grain.IterDataset):
    """IterDataset of `_DropBadIterator` (runs inside each prefetch worker)."""

    def __init__(self, parent: grain.IterDataset, policy: str, max_consecutive: int):
        super().__init__(parent)
        self._policy = policy
        self._max_consecutive = max_consecutive

    def __iter__(self) -> _DropBadIterator:
        return _DropBadIterator(self._parent.__iter__(), self._policy, self._max_consecutive)


class TrainIterator(grain.DatasetIterator):
    """Iterator of training batches dict(image, label); `num_skipped` counts the bad examples left out so far.

    `close()` (inherited) stops the prefetch worker processes; call it when done.
    """

    def __init__(self, parent: grain.DatasetIterator):
        super().__init__(parent)
        self.num_skipped = 0

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._parent)
        self.num_skipped += int(batch.pop("skipped").sum())
        return batch

    def get_state(self) -> dict:
        """JSON-serialisable state: the pipeline's position and the skipped count."""
        return {"parent": self._parent.get_state(), "num_skipped": self.num_skipped}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self.num_skipped = int(state["num_skipped"])


class _TrainDataset(grain.IterDataset):
    """IterDataset whose iterators are `TrainIterator`s."""

    def __iter__(self) -> TrainIterator:
        return TrainIterator(self._parent.__iter__())


def make_train_dataset(
    name: str,
    root: str | None,
    *,
    crop_size: tuple[int, int],
    scale: tuple[int, int],
    ratio_range: tuple[float, float] = (0.5, 2.0),
    cat_max_ratio: float = 0.75,
    global_batch_size: int,
    seed: int,
    num_workers: int,
    bad_example: str = "skip",
    max_image_pixels: int = loading.DEFAULT_MAX_IMAGE_PIXELS,
    source: str = "files",
    split: str = "train",
    process_index: int | None = None,
    process_count: int | None = None,
    read_threads: int = 2,
    worker_buffer_size: int = 2,
    reduce_zero_label: bool | None = None,
) -> grain.IterDataset:
    """Infinite training batches of this host: dict(image=float32 (B_host, h, w, 3) normalised RGB, label=int32
    (B_host, h, w), 255 = ignore), (h, w) = crop_size, B_host = global_batch_size // process_count.

    Args:
      name, root, source, split: which data (see `sources.open_source`).
      crop_size: (height, width) of the crops; scale, ratio_range, cat_max_ratio: the reference's RandomResize and
        RandomCrop parameters.
      global_batch_size: batch size over all hosts; must be divisible by process_count.
      seed: seeds the per-epoch shuffle and every augmentation.
      num_workers: prefetch processes per host (0: in this process, with `read_threads` threads).
      bad_example: 'skip' (log, count in `iterator.num_skipped`, go on) or 'stop' (raise BadDataError).
      max_image_pixels: images and labels with more pixels (width x height, read from the file's header) are bad
        examples (config.data.max_image_pixels).
      process_index, process_count: this host's shard (default: jax.process_index() / jax.process_count()).
      read_threads: threads loading examples in each worker (or in this process).
      worker_buffer_size: batches each worker prepares ahead.
      reduce_zero_label: the folder dataset's setting (None: its own; see `sources.open_source`).
    """
    if bad_example not in BAD_EXAMPLE_POLICIES:
        raise ValueError(f"bad_example={bad_example!r}: choose one of {', '.join(BAD_EXAMPLE_POLICIES)}")
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size % process_count:
        raise ValueError(f"global_batch_size {global_batch_size} is not divisible by {process_count} processes")
    host_batch_size = global_batch_size // process_count
    data = sources.open_source(name, root, split, source, reduce_zero_label)
    if not len(data.records):
        raise ValueError(f"{name} split {split} under {root} has no examples")
    augment = functools.partial(
        _train_example,
        load=data.load,
        max_image_pixels=max_image_pixels,
        crop_size=tuple(crop_size),
        scale=tuple(scale),
        ratio_range=tuple(ratio_range),
        cat_max_ratio=cat_max_ratio,
        ignore_index=data.spec.ignore_index,
    )
    ds = grain.MapDataset.source(data.records).seed(seed).shuffle().repeat().random_map(augment)
    ds = ds[process_index::process_count]
    read_options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(host_batch_size, 2))
    it_ds = _DropBadDataset(ds.to_iter_dataset(read_options), bad_example, len(data.records))
    it_ds = it_ds.batch(host_batch_size, drop_remainder=True)
    if num_workers > 0:
        it_ds = it_ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=worker_buffer_size)
        )
    return _TrainDataset(it_ds)


def _eval_example(index: int, record: Any, *, load, max_image_pixels: int) -> dict:
    """Loads record `index` of a split; a bad one raises BadDataError."""
    try:
        example = load(loading.with_size_limit(record, max_image_pixels))
    except loading.BadExampleError as error:
        raise BadDataError(f"bad evaluation example: {error}") from None
    return dict(example, label=example["label"].astype(np.int32), index=index)


def make_eval_dataset(
    data: sources.Source,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    read_threads: int = 2,
    prefetch: int = 4,
    max_image_pixels: int = loading.DEFAULT_MAX_IMAGE_PIXELS,
) -> grain.IterDataset:
    """Evaluation examples of the opened split `data`, one at a time: dict(image=uint8 RGB (H, W, 3), label=int32
    (H, W), reduce_zero_label applied, 255 = ignore; name=str; index=int, the example's position in the split).

    A bad example (one over `max_image_pixels` included) raises BadDataError (run `python -m segnext_jax.data.check`
    first). This process reads every process_count-th example from process_index on (default: jax's process index
    and count), so the processes' confusion matrices sum to the split's. `prefetch` examples are decoded ahead by
    `read_threads` threads.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    load = functools.partial(_eval_example, load=data.load, max_image_pixels=max_image_pixels)
    ds = grain.MapDataset.source(data.records).map_with_index(load)[process_index::process_count]
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch))
