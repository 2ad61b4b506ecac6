"""What a training / evaluation config must satisfy, checked before anything is built or written.

`check(config)` raises `ConfigError` with one line naming the key, its value and what to do; `resolve_paths(config)`
turns its path values into absolute ones; `fill_from_dataset(config)` sets what only the data can tell (the folder
dataset's number of classes). All run where a config enters (the command line, `train.train`), so a typo costs a
second, not a compilation.
"""

import ml_collections
from absl import logging

from segnext_jax import models, paths
from segnext_jax.data import datasets, pipeline, sources
from segnext_jax.evaluation import inference
from segnext_jax.models import depthwise

NONFINITE_POLICIES = ("stop", "skip")


class ConfigError(ValueError):
    """A config value (or a combination of them) that cannot run; the message names the keys and what to do."""


def _choice(config: ml_collections.ConfigDict, key: str, allowed: tuple[str, ...]) -> None:
    value = _get(config, key)
    if value not in allowed:
        raise ConfigError(f"config.{key}={value!r}: choose one of {', '.join(map(str, allowed))}")


def _at_least(config: ml_collections.ConfigDict, key: str, minimum: int) -> None:
    value = _get(config, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"config.{key}={value!r}: must be an integer >= {minimum}")


def _pair(config: ml_collections.ConfigDict, key: str) -> tuple[int, int]:
    value = _get(config, key)
    if len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        raise ConfigError(f"config.{key}={value!r}: must be two positive integers, e.g. \"(512, 512)\"")
    return tuple(value)


def _get(config: ml_collections.ConfigDict, key: str):
    value = config
    for part in key.split("."):
        value = value[part]
    return value


def check(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError for the first value the run cannot use; warns about a crop that will mostly be padding."""
    _choice(config, "model.variant", tuple(models.VARIANTS))
    _choice(config, "model.dtype", tuple(models.DTYPES))
    _choice(config, "model.depthwise_impl", depthwise.IMPLEMENTATIONS)
    _choice(config, "init.pretrained_kind", ("backbone", "model"))
    _choice(config, "data.dataset", datasets.NAMES)
    _choice(config, "data.source", sources.SOURCES)
    _choice(config, "data.bad_example", pipeline.BAD_EXAMPLE_POLICIES)
    _choice(config, "eval.mode", inference.MODES)
    _choice(config, "train.on_nonfinite", NONFINITE_POLICIES)
    _check_folder(config)
    if config.model.num_classes is not None or config.data.dataset != datasets.FOLDER:
        _at_least(config, "model.num_classes", 1)  # the folder dataset's may wait for fill_from_dataset
    for key, minimum in (
        ("data.num_workers", 0),
        ("data.max_image_pixels", 1),
        ("train.global_batch_size", 1),
        ("train.num_steps", 1),
        ("train.grad_accum_steps", 1),
        ("train.log_every", 1),
        ("train.eval_every", 0),
        ("train.checkpoint_every", 1),
        ("train.keep_checkpoints", 1),
        ("train.sample_predictions", 0),
        ("train.max_nonfinite_in_a_row", 1),
        ("eval.batch_size", 1),
    ):
        _at_least(config, key, minimum)
    for key in ("data.crop_size", "data.scale", "data.test_scale", "eval.crop_size", "eval.stride"):
        _pair(config, key)
    first, last = config.train.profile_steps
    if (first, last) != (0, 0) and not 1 <= first <= last:
        raise ConfigError(
            f"config.train.profile_steps={(first, last)!r}: give (first, last) steps with 1 <= first <= last, or (0, 0)"
        )
    if not config.eval.scales or any(scale <= 0 for scale in config.eval.scales):
        raise ConfigError(f"config.eval.scales={tuple(config.eval.scales)!r}: must be positive resize ratios")
    low, high = config.data.ratio_range
    if not 0 < low <= high:
        raise ConfigError(f"config.data.ratio_range={(low, high)!r}: must be (low, high) with 0 < low <= high")
    _check_crop(config)


def _check_folder(config: ml_collections.ConfigDict) -> None:
    """The folder dataset needs its root and is read from files; data.reduce_zero_label is its setting only."""
    reduce_zero_label = config.data.get("reduce_zero_label")
    if config.data.dataset != datasets.FOLDER:
        if reduce_zero_label is not None:
            raise ConfigError(
                f"config.data.reduce_zero_label={reduce_zero_label!r} is for config.data.dataset='folder' only "
                f"({config.data.dataset} has its own): leave it unset"
            )
        return
    if not config.data.root:
        raise ConfigError(
            "config.data.root is required for config.data.dataset='folder': pass --config.data.root=DIR, a folder "
            "with images/{train,val}, masks/{train,val} and classes.txt"
        )
    if config.data.source != "files":
        raise ConfigError(f"config.data.source={config.data.source!r}: the folder dataset is read from 'files'")
    if reduce_zero_label not in (None, True, False):
        raise ConfigError(f"config.data.reduce_zero_label={reduce_zero_label!r}: must be true, false or None")


def _check_crop(config: ml_collections.ConfigDict) -> None:
    """The training crop must fit the largest resized image (keep-ratio bound `scale` x the top of `ratio_range`)."""
    crop, scale, high = config.data.crop_size, config.data.scale, config.data.ratio_range[1]
    short, long = min(scale), max(scale)
    if min(crop) > short * high or max(crop) > long * high:
        raise ConfigError(
            f"config.data.crop_size={tuple(crop)} is larger than any resized training image (config.data.scale="
            f"{tuple(scale)} x ratio_range up to {high}: at most {round(long * high)} x {round(short * high)}), so "
            "every crop would be mostly padding: lower crop_size or raise scale"
        )
    if min(crop) > short or max(crop) > long:
        logging.warning(
            "config.data.crop_size=%s is larger than config.data.scale=%s: crops of images resized with a ratio "
            "below %.2f are padded with the ignore label",
            tuple(crop), tuple(scale), max(min(crop) / short, max(crop) / long),
        )


def resolve_paths(config: ml_collections.ConfigDict) -> None:
    """Makes config.init.pretrained and config.data.root absolute (relative to the working directory), in place."""
    if config.init.pretrained:
        config.init.pretrained = paths.resolve(config.init.pretrained)
    if config.data.root:
        config.data.root = paths.resolve(config.data.root)


def fill_from_dataset(config: ml_collections.ConfigDict) -> None:
    """Sets config.model.num_classes, in place, from the folder dataset's classes when it is None (configs for the
    folder dataset cannot know it); raises ConfigError when the folder cannot be read or has another number of
    classes than a num_classes given. Other datasets are left as they are. Call it after `resolve_paths`."""
    if config.data.dataset != datasets.FOLDER:
        return
    try:
        spec = datasets.get_spec(datasets.FOLDER, config.data.root, config.data.get("reduce_zero_label"))
    except (OSError, ValueError) as error:
        raise ConfigError(str(error)) from None
    if config.model.num_classes is None:
        config.model.num_classes = spec.num_classes
    elif config.model.num_classes != spec.num_classes:
        raise ConfigError(
            f"config.model.num_classes={config.model.num_classes}, but {config.data.root} has {spec.num_classes} "
            f"classes ({', '.join(spec.class_names)}): leave num_classes unset (None) to take the folder's"
        )
