"""The training / evaluation config in one place: every key with its type, default and allowed values (`KEYS`), each
dataset's recipe (`make_config`), and the checks a config must pass before anything is built or written.

A config is an ml_collections ConfigDict: `seed` and the sections model, init, data, train, optimizer and eval, with
exactly the keys of `KEYS`. Every `configs/<dataset>_<variant>.py` returns `make_config(dataset, variant)`; the
command line changes any key (`--config.optimizer.lr=1e-4`). `check(config)` raises `ConfigError` with one line
naming the key, its value and what to do; `resolve_paths(config)` makes its paths absolute; `fill_from_dataset(config)`
sets what only the data can tell (the folder dataset's number of classes). All run where a config enters (the command
line, `train.train`), so a typo costs a second, not a compilation.

config.model holds the keyword arguments of `segnext_jax.models.create`: `create_model` builds the network from it, or
from its JSON record in a checkpoint (`model_record`). Its `variant` is a registered size ('t', 's', 'b', 'l') or a
spec of another, with the fields of `models.Variant` (mlp_ratios optional, default (8, 8, 4, 4)):

    config.model.variant = {"embed_dims": (32, 32, 64, 64), "depths": (1, 1, 1, 1), "drop_path_rate": 0.1,
                            "head_channels": 64, "nmf_rank": 8}

Where the recipe's values come from:
- classes, crop size and resize scales: the dataset registry, `segnext_jax.data.datasets` (the paper's crop sizes,
  MMSegmentation 1.2.2's `configs/_base_/datasets/` scales);
- global batch size and iterations per dataset: the SegNeXt paper (Guo et al., NeurIPS 2022, arXiv:2209.08575, §4
  and its appendix table), in `RECIPES`;
- evaluation: whole images, except sliding windows for Cityscapes (1024 / 768: the official repository's config,
  github.com/Visual-Attention-Network/SegNeXt, `local_configs/segnext/*/segnext.*.1024x1024.city.160k.py`) and
  Pascal Context 59 (480 / 320: every MMSegmentation 1.2.2 Pascal Context model config), in `RECIPES`;
- optimiser and schedule: MMSegmentation 1.2.2's SegNeXt configs (`configs/segnext/segnext_mscan-*_1xb16-adamw-160k_
  ade20k-512x512.py`: AdamW lr 6e-5, betas (0.9, 0.999), weight decay 0.01, decode head lr x10, LinearLR from 1e-6
  over 1500 iterations, then PolyLR power 1 to 0);
- ratio range, cat_max_ratio: MMSegmentation 1.2.2's dataset configs.
"""

import dataclasses
import json
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import ml_collections
import optax
from absl import logging
from flax import nnx
from ml_collections import config_dict

from segnext_jax import models, paths
from segnext_jax.data import datasets, pipeline, sources
from segnext_jax.evaluation import inference
from segnext_jax.models import depthwise, ham_head
from segnext_jax.training import schedule


class ConfigError(ValueError):
    """A config value (or a combination of them) that cannot run; the message names the keys and what to do."""


_VARIANT_FIELDS = tuple(field.name for field in dataclasses.fields(models.Variant))
_REQUIRED_VARIANT_FIELDS = tuple(
    field.name for field in dataclasses.fields(models.Variant) if field.default is dataclasses.MISSING
)


def _as_dict(spec: Any) -> dict[str, Any]:
    return spec.to_dict() if isinstance(spec, ml_collections.ConfigDict) else dict(spec)


def variant_of(variant: str | Mapping[str, Any] | ml_collections.ConfigDict) -> str | models.Variant:
    """`models.create`'s `variant` for a config.model.variant: a registered name as it is, a spec as a models.Variant
    (its lists, as JSON records them, as tuples)."""
    if isinstance(variant, str):
        return variant
    spec = _as_dict(variant)
    return models.Variant(**{name: tuple(v) if isinstance(v, list | tuple) else v for name, v in spec.items()})


def architecture(variant: str | Mapping[str, Any] | ml_collections.ConfigDict) -> models.Variant:
    """The models.Variant a config.model.variant (a registered name or a spec) stands for."""
    variant = variant_of(variant)
    return models.VARIANTS[variant] if isinstance(variant, str) else variant


def variant_name(variant: str | Mapping[str, Any] | ml_collections.ConfigDict) -> str:
    """The registered name of a config.model.variant (a spec equal to a registered variant has its name), else
    'custom'; for messages and per-variant tables."""
    spec = architecture(variant)
    return next((name for name, registered in models.VARIANTS.items() if registered == spec), "custom")


def create_model(model: Mapping[str, Any], *, rngs: nnx.Rngs) -> models.SegNeXt:
    """The network of a config.model section as a dict (`config.model.to_dict()`), or of its JSON record in a
    checkpoint (`model_record`): `models.create` with the variant spec, if any, as a models.Variant."""
    return models.create(**{**model, "variant": variant_of(model["variant"])}, rngs=rngs)


def model_record(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """config.model as checkpoints record it (JSON: tuples become lists), so that a resumed run's model compares
    equal to the recorded one; `create_model` rebuilds the network from it."""
    return json.loads(json.dumps(config.model.to_dict()))


Rule = Callable[[str, Any], None]  # (dotted key, value): raises ConfigError when the value is not allowed


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_pair(name: str, value: Any) -> None:
    if not isinstance(value, tuple | list) or len(value) != 2 or not all(_is_int(v) and v > 0 for v in value):
        raise ConfigError(f'config.{name}={value!r}: must be two positive integers, e.g. "(512, 512)"')


def _ratio_range(name: str, value: Any) -> None:
    numbers = isinstance(value, tuple | list) and len(value) == 2 and all(isinstance(v, int | float) for v in value)
    if not (numbers and 0 < value[0] <= value[1]):
        raise ConfigError(f"config.{name}={value!r}: must be (low, high) with 0 < low <= high")


def _scales(name: str, value: Any) -> None:
    if not (isinstance(value, tuple | list) and value and all(isinstance(v, int | float) and v > 0 for v in value)):
        raise ConfigError(f"config.{name}={value!r}: must be positive resize ratios")


def _profile_steps(name: str, value: Any) -> None:
    pair = isinstance(value, tuple | list) and len(value) == 2 and all(_is_int(v) for v in value)
    if not pair or (tuple(value) != (0, 0) and not 1 <= value[0] <= value[1]):
        raise ConfigError(f"config.{name}={value!r}: give (first, last) steps with 1 <= first <= last, or (0, 0)")


def _variant(name: str, value: Any) -> None:
    """A registered name, or a spec whose every field takes the form of T's (four positive integers, a positive
    integer, or a rate in [0, 1))."""
    if isinstance(value, str):
        if value not in models.VARIANTS:
            raise ConfigError(f"config.{name}={value!r}: choose one of {', '.join(models.VARIANTS)}")
        return
    if not isinstance(value, Mapping | ml_collections.ConfigDict):
        raise ConfigError(f"config.{name}={value!r}: give a registered name or a spec ({', '.join(_VARIANT_FIELDS)})")
    spec = _as_dict(value)
    missing = [field for field in _REQUIRED_VARIANT_FIELDS if field not in spec]
    unknown = sorted(set(spec) - set(_VARIANT_FIELDS))
    if missing or unknown:
        problem = f"missing {', '.join(missing)}" if missing else f"unknown {', '.join(unknown)}"
        raise ConfigError(
            f"config.{name}: a variant spec has the fields {', '.join(_VARIANT_FIELDS)} (mlp_ratios optional): "
            f"{problem}"
        )
    example = models.VARIANTS["t"]
    for field, given in spec.items():
        form = getattr(example, field)
        if isinstance(form, tuple):
            ok = isinstance(given, tuple | list) and len(given) == len(form)
            ok, wanted = ok and all(_is_int(v) and v > 0 for v in given), f"{len(form)} positive integers"
        elif isinstance(form, float):
            ok, wanted = isinstance(given, int | float) and 0 <= given < 1, "a rate in [0, 1)"
        else:
            ok, wanted = _is_int(given) and given > 0, "a positive integer"
        if not ok:
            raise ConfigError(f"config.{name}.{field}={given!r}: must be {wanted}")


RECIPE = object()  # the default of a key that make_config sets per dataset (and variant)


@dataclasses.dataclass(frozen=True)
class Key:
    """One config key: its type, default (`RECIPE`: set per dataset by `make_config`) and meaning, and the values it
    allows: one of `choices`, an integer >= `minimum`, whatever `rule` accepts (instead of the type check), or None
    when `optional`."""

    type: type
    default: Any
    doc: str
    choices: tuple = ()
    minimum: int | None = None
    rule: Rule | None = None
    optional: bool = False


KEYS: dict[str, Key] = {
    "seed": Key(int, 0, "seeds parameter init, the data order and augmentation, drop path, dropout and NMF bases"),
    # config.model: exactly the keyword arguments of segnext_jax.models.create (`create_model`)
    "model.variant": Key(str, RECIPE, "a registered size ('t', 's', 'b', 'l') or a spec (module docstring)",
                         rule=_variant),
    "model.num_classes": Key(int, RECIPE, "the dataset's; None (folder dataset only): its class list's, set by "
                             "fill_from_dataset", minimum=1, optional=True),
    "model.drop_path_rate": Key(float, None, "stochastic depth; None: the variant's (0.1 T/S/B, 0.3 L)", optional=True),
    "model.dropout_ratio": Key(float, 0.1, "dropout before the decode head's classifier"),
    "model.dtype": Key(str, "float32", "compute dtype (parameters stay float32)", choices=tuple(models.DTYPES)),
    "model.depthwise_impl": Key(str, "auto", "depth-wise convolution form (segnext_jax.models.depthwise); 'auto': the "
                                "backend policy's", choices=depthwise.IMPLEMENTATIONS),
    "model.nmf_one_step_grad": Key(bool, False, "True: gradient through the last NMF step only (the paper's option)"),
    "model.nmf_bases": Key(str, "random", "'random': fresh NMF bases per image and call (the reference); 'fixed': "
                           "one stored set", choices=ham_head.NMF_BASES),
    "model.nmf_seed": Key(int, None, "seed of the 'fixed' bases; None: the init key", optional=True),
    "init.pretrained": Key(str, RECIPE, "'' (random init) or a converted checkpoint directory (python -m "
                           "weights_conversion IN.pth OUT_DIR), relative to the working directory; the recipes start "
                           "from the ImageNet MSCAN backbone pretrained/mscan_{t,s,b,l}"),
    "init.pretrained_kind": Key(str, "backbone", "'backbone': load the encoder only; 'model': the whole segmentor",
                                choices=("backbone", "model")),
    "data.dataset": Key(str, RECIPE, "a registry name or 'folder' (your own data)", choices=datasets.NAMES),
    "data.root": Key(str, None, "None: the dataset's usual place (MMSegmentation's data/ layout)", optional=True),
    "data.source": Key(str, "files", "'files': the prepared directory; 'tfds': ArrayRecord (scripts/prepare_tfds.py)",
                       choices=sources.SOURCES),
    "data.crop_size": Key(tuple, RECIPE, "(height, width) of the random training crop", rule=_positive_pair),
    "data.scale": Key(tuple, RECIPE, "keep-ratio resize bound (long, short) before cropping", rule=_positive_pair),
    "data.ratio_range": Key(tuple, (0.5, 2.0), "the training resize bound is scale * U(ratio_range)",
                            rule=_ratio_range),
    "data.cat_max_ratio": Key(float, 0.75, "a crop is re-drawn (up to 10 times) while one class covers more than this"),
    "data.test_scale": Key(tuple, RECIPE, "keep-ratio resize bound (long, short) of evaluation images",
                           rule=_positive_pair),
    "data.num_workers": Key(int, 4, "data loading processes per host; 0 loads in the training process", minimum=0),
    "data.bad_example": Key(str, "skip", "an unreadable or inconsistent example: 'skip' it (logged, counted) or "
                            "'stop' the run", choices=pipeline.BAD_EXAMPLE_POLICIES),
    "data.max_image_pixels": Key(int, 89_478_485, "larger images / labels (width x height) are bad examples (PIL's "
                                 "limit)", minimum=1),
    "data.reduce_zero_label": Key(bool, None, "folder dataset only: mask value 0 is unlabelled and 1..N the classes; "
                                  "None: the folder's own setting (classes.json, default false)", optional=True),
    "train.global_batch_size": Key(int, RECIPE, "images per optimiser step, over all devices and hosts", minimum=1),
    "train.num_steps": Key(int, RECIPE, "optimiser steps (the reference's iterations)", minimum=1),
    "train.grad_accum_steps": Key(int, 1, "micro-batches per step, each of global_batch_size / grad_accum_steps "
                                  "images", minimum=1),
    "train.log_every": Key(int, 50, "steps between console / TensorBoard scalars (MMSegmentation's logger interval)",
                           minimum=1),
    "train.eval_every": Key(int, 16_000, "steps between validations (MMSegmentation 1.x val_interval); 0: never",
                            minimum=0),
    "train.checkpoint_every": Key(int, 2_000, "steps between checkpoints (SIGTERM also saves at once)", minimum=1),
    "train.keep_checkpoints": Key(int, 3, "latest checkpoints kept, plus the one with the best validation mIoU",
                                  minimum=1),
    "train.sample_predictions": Key(int, 4, "validation images logged as image | ground truth | prediction",
                                    minimum=0),
    "train.on_nonfinite": Key(str, "stop", "a step whose loss, gradients or learning rate are not finite changes "
                              "nothing and 'stop's the run (nothing non-finite is saved) or is 'skip'ped, until "
                              "max_nonfinite_in_a_row such steps follow each other", choices=("stop", "skip")),
    "train.max_nonfinite_in_a_row": Key(int, 5, "skipped non-finite steps in a row that stop the run", minimum=1),
    "train.profile_steps": Key(tuple, (0, 0), "(first, last) step traced by jax.profiler into WORKDIR/profile; "
                               "(0, 0): none", rule=_profile_steps),
    "optimizer.lr": Key(float, 6e-5, "AdamW's base learning rate (backbone)"),
    "optimizer.b1": Key(float, 0.9, "AdamW's beta1"),
    "optimizer.b2": Key(float, 0.999, "AdamW's beta2"),
    "optimizer.eps": Key(float, 1e-8, "AdamW's epsilon (torch.optim.AdamW's default)"),
    "optimizer.weight_decay": Key(float, 0.01, "decoupled; 0 for parameters whose name contains 'norm' "
                                  "(segnext_jax.training.optimizer)"),
    "optimizer.head_lr_mult": Key(float, 10.0, "learning-rate multiplier of every decode_head parameter"),
    "optimizer.warmup_steps": Key(int, 1500, "linear warm-up length", minimum=0),
    "optimizer.warmup_ratio": Key(float, 1e-6, "warm-up starts at lr * warmup_ratio"),
    "optimizer.power": Key(float, 1.0, "poly decay exponent"),
    "optimizer.min_lr": Key(float, 0.0, "poly decay end value: the reference's 0 only", choices=(0.0,)),
    "optimizer.schedule": Key(str, "mmseg", "'mmseg': LinearLR then PolyLR (MMSegmentation 1.x); 'official': the "
                              "official repository's (segnext_jax.training.schedule)", choices=schedule.FORMS),
    "eval.mode": Key(str, RECIPE, "'whole': each image padded to a multiple of 32; 'slide': windows of eval.crop_size",
                     choices=inference.MODES),
    "eval.crop_size": Key(tuple, RECIPE, "sliding-window size (height, width)", rule=_positive_pair),
    "eval.stride": Key(tuple, RECIPE, "sliding-window stride (height, width)", rule=_positive_pair),
    "eval.scales": Key(tuple, (1.0,), "test_scale multipliers; (0.5, 0.75, 1.0, 1.25, 1.5, 1.75) for multi-scale",
                       rule=_scales),
    "eval.flip": Key(bool, False, "also average the horizontally flipped prediction"),
    "eval.seed": Key(int, 0, "seeds the NMF bases, so a checkpoint's score is repeatable"),
    "eval.batch_size": Key(int, 1, "images per evaluation step; whole mode pads each image alone (as the reference)",
                           minimum=1),
}  # fmt: skip


class Recipe(NamedTuple):
    """How the paper trains and evaluates on a registry dataset, beyond the registry's facts (classes, crop size,
    resize scales)."""

    global_batch_size: int
    num_steps: int
    slide_stride: tuple[int, int] | None  # sliding-window evaluation with this stride; None: whole images


RECIPES: dict[str, Recipe] = {
    "ade20k": Recipe(16, 160_000, None),
    "cityscapes": Recipe(8, 160_000, (768, 768)),
    "coco_stuff164k": Recipe(16, 80_000, None),
    "pascal_context_59": Recipe(16, 80_000, (320, 320)),
    "pascal_voc12_aug": Recipe(16, 80_000, None),
    "isaid": Recipe(16, 160_000, None),
    "demo": Recipe(8, 400, None),  # the built-in procedural data; configs/demo.py shortens the run
}


def make_config(dataset: str, variant: str) -> ml_collections.ConfigDict:
    """The reference recipe of SegNeXt-`variant` ('t', 's', 'b', 'l') on `dataset` (a key of RECIPES): every key of
    KEYS at its default, the per-dataset ones from the registry (segnext_jax.data.datasets) and RECIPES.

    config.model is not type-safe (ml_collections' type check on assignment), so that model.variant can take a spec
    as well as a name; `check` checks the type of every key.
    """
    if dataset not in RECIPES:
        raise ConfigError(f"make_config: unknown dataset {dataset!r}: choose one of {', '.join(RECIPES)}")
    if variant not in models.VARIANTS:
        raise ConfigError(f"make_config: unknown variant {variant!r}: choose one of {', '.join(models.VARIANTS)}")
    facts, recipe = datasets.DATASETS[dataset], RECIPES[dataset]
    per_dataset = {
        "model.variant": variant,
        "model.num_classes": facts.num_classes,
        "init.pretrained": f"pretrained/mscan_{variant}",
        "data.dataset": dataset,
        "data.crop_size": facts.crop_size,
        "data.scale": facts.scale,
        "data.test_scale": facts.test_scale,
        "train.global_batch_size": recipe.global_batch_size,
        "train.num_steps": recipe.num_steps,
        "eval.mode": "whole" if recipe.slide_stride is None else "slide",
        "eval.crop_size": facts.crop_size,
        # unused by whole-image evaluation: two thirds of the window, should eval.mode become 'slide'
        "eval.stride": recipe.slide_stride or tuple(2 * side // 3 for side in facts.crop_size),
    }
    config = ml_collections.ConfigDict()
    for name, key in KEYS.items():
        section, _, leaf = name.rpartition(".")
        if section and section not in config:
            config[section] = ml_collections.ConfigDict(type_safe=section != "model")
        value = per_dataset[name] if key.default is RECIPE else key.default
        (config[section] if section else config)[leaf] = config_dict.placeholder(key.type) if value is None else value
    return config


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _get(config: ml_collections.ConfigDict, name: str) -> Any:
    value = config
    for part in name.split("."):
        value = value[part]
    return value


def _check_keys(config: ml_collections.ConfigDict) -> None:
    """Exactly the keys of KEYS: none missing (a config not built by make_config), none unknown."""
    found = set()
    for section in config.keys():
        if isinstance(config[section], ml_collections.ConfigDict):
            found.update(f"{section}.{key}" for key in config[section].keys())
        else:
            found.add(section)
    missing, unknown = sorted(KEYS.keys() - found), sorted(found - KEYS.keys())
    if missing:
        raise ConfigError(f"config.{missing[0]} is missing: start the config from configuration.make_config")
    if unknown:
        raise ConfigError(f"config.{unknown[0]} is not a config key (see segnext_jax.configuration.KEYS): remove it")


def _has_type(value: Any, kind: type) -> bool:
    if isinstance(value, bool):
        return kind is bool
    return isinstance(value, int | float) if kind is float else isinstance(value, kind)


def _check_key(name: str, key: Key, value: Any) -> None:
    if value is None and key.optional:
        return
    if key.rule is not None:
        key.rule(name, value)
    elif key.choices:
        if value not in key.choices:
            raise ConfigError(f"config.{name}={value!r}: choose one of {', '.join(map(str, key.choices))}")
    elif not _has_type(value, key.type) or (key.minimum is not None and value < key.minimum):
        at_least = f" >= {key.minimum}" if key.minimum is not None else ""
        raise ConfigError(f"config.{name}={value!r}: must be {_TYPE_NAMES[key.type]}{at_least}")


def check(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError for the first value the run cannot use; warns about a crop that will mostly be padding."""
    _check_keys(config)
    for name, key in KEYS.items():
        _check_key(name, key, _get(config, name))
    _check_folder(config)
    if config.model.num_classes is None and config.data.dataset != datasets.FOLDER:
        raise ConfigError(
            "config.model.num_classes=None: must be an integer >= 1 (only the folder dataset reads it from its data)"
        )
    _check_schedule(config)
    _check_crop(config)


def _check_folder(config: ml_collections.ConfigDict) -> None:
    """The folder dataset needs its root and is read from files; data.reduce_zero_label is its setting only."""
    reduce_zero_label = config.data.reduce_zero_label
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


def _check_schedule(config: ml_collections.ConfigDict) -> None:
    """The learning-rate schedule can be built for this run's length (`schedule.make_schedule`'s conditions)."""
    opt = config.optimizer
    try:
        make_lr_schedule(config)
    except ValueError as error:
        raise ConfigError(
            f"config.train.num_steps={config.train.num_steps}, config.optimizer.warmup_steps={opt.warmup_steps}, "
            f"warmup_ratio={opt.warmup_ratio}, schedule={opt.schedule!r}: {error} "
            "(lower config.optimizer.warmup_steps or raise config.train.num_steps)"
        ) from None


def make_lr_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Factor of config.optimizer.lr at each optimiser step (0-based), over config.train.num_steps."""
    opt = config.optimizer
    return schedule.make_schedule(
        config.train.num_steps,
        warmup_iters=opt.warmup_steps,
        warmup_ratio=opt.warmup_ratio,
        power=opt.power,
        form=opt.schedule,
    )


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
            tuple(crop),
            tuple(scale),
            max(min(crop) / short, max(crop) / long),
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
        spec = datasets.get_spec(datasets.FOLDER, config.data.root, config.data.reduce_zero_label)
    except (OSError, ValueError) as error:
        raise ConfigError(str(error)) from None
    if config.model.num_classes is None:
        config.model.num_classes = spec.num_classes
    elif config.model.num_classes != spec.num_classes:
        raise ConfigError(
            f"config.model.num_classes={config.model.num_classes}, but {config.data.root} has {spec.num_classes} "
            f"classes ({', '.join(spec.class_names)}): leave num_classes unset (None) to take the folder's"
        )
