"""configs/ and segnext_jax.configuration: every file loads through ml_collections' config_flags with the schema's keys,
overrides work, a variant spec builds its model, values equal the reference's.

The recipe is checked against MMSegmentation 1.2.2's own config files (its dataset configs for resize, crop and test
scale; its SegNeXt configs for optimiser, schedule and head; its Pascal Context model configs for sliding-window
evaluation; its dataset classes for the class counts) and against the paper for what MMSegmentation has no config of
(batch sizes and iterations per dataset; Cityscapes evaluation, from the official SegNeXt config).
"""

import dataclasses
import glob
import importlib
import inspect
import json
import os

import jax
import pytest
from absl import flags
from flax import nnx
from ml_collections import config_flags
from mmengine import Config
from oracle import import_mmseg

from segnext_jax import configuration, models

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
# config file prefix -> dataset name in segnext_jax.data.datasets.DATASETS
DATASETS = {
    "ade20k": "ade20k",
    "cityscapes": "cityscapes",
    "coco_stuff": "coco_stuff164k",
    "pascal_context": "pascal_context_59",
    "voc": "pascal_voc12_aug",
    "isaid": "isaid",
}

SECTIONS = {name.split(".")[0] for name in configuration.KEYS if "." in name}
# a small SegNeXt spelled out in the config (the fields of models.Variant)
TINY = dict(embed_dims=(32, 32, 64, 64), depths=(1, 1, 1, 1), drop_path_rate=0.1, head_channels=64, nmf_rank=8)

# The paper (§4 and its appendix): global batch, iterations and crop per dataset.
PAPER = {
    "ade20k": (16, 160_000, (512, 512)),
    "cityscapes": (8, 160_000, (1024, 1024)),
    "coco_stuff": (16, 80_000, (512, 512)),
    "pascal_context": (16, 80_000, (480, 480)),
    "voc": (16, 80_000, (512, 512)),
    "isaid": (16, 160_000, (896, 896)),
}
MMSEG_DATASET_CONFIG = {
    "ade20k": ("ade20k.py", "ADE20KDataset"),
    "cityscapes": ("cityscapes_1024x1024.py", "CityscapesDataset"),
    "coco_stuff": ("coco-stuff164k.py", "COCOStuffDataset"),
    "pascal_context": ("pascal_context_59.py", "PascalContextDataset59"),
    "voc": ("pascal_voc12_aug.py", "PascalVOCDataset"),
    "isaid": ("isaid.py", "iSAIDDataset"),
}


def load(path, *overrides):
    """Parses `--config=path` plus overrides exactly as main.py's absl flags do (locked config)."""
    argv = ["main.py", f"--config={path}", *overrides]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "config file", flag_values=flag_values, lock_config=True, sys_argv=argv
    )
    flag_values(argv)
    return flag_values.config


def dotted_keys(config) -> set[str]:
    """'section.key' for every key of a section, and the top-level keys: as configuration.KEYS names them."""
    keys = set()
    for key in config.keys():
        if key in SECTIONS:
            keys.update(f"{key}.{inner}" for inner in config[key].keys())
        else:
            keys.add(key)
    return keys


@pytest.fixture(scope="module")
def mmseg():
    mmseg = import_mmseg()
    importlib.import_module("mmseg.datasets")
    return mmseg


@pytest.fixture(scope="module")
def mmseg_configs(mmseg):
    return os.path.join(os.path.dirname(mmseg.__file__), ".mim", "configs")


def test_every_dataset_and_variant_has_a_config():
    expected = {f"{d}_{v}.py" for d in DATASETS for v in "tsbl"} | {"demo.py", "folder_t.py"}
    assert {os.path.basename(p) for p in glob.glob(os.path.join(CONFIG_DIR, "*.py"))} == expected


@pytest.mark.parametrize("name", [f"{d}_{v}" for d in DATASETS for v in "tsbl"] + ["demo"])
def test_config_loads_with_the_schema(name):
    config = load(os.path.join(CONFIG_DIR, f"{name}.py"))
    assert dotted_keys(config) == set(configuration.KEYS)
    prefix, variant = ("demo", "t") if name == "demo" else name.rsplit("_", 1)
    assert (config.data.dataset, config.model.variant) == (DATASETS.get(prefix, prefix), variant)


def test_loads_by_relative_path_from_the_repository_root(monkeypatch):
    """`python -m segnext_jax.main --config=configs/ade20k_b.py` run in the repository root."""
    monkeypatch.chdir(os.path.dirname(CONFIG_DIR))
    assert load("configs/ade20k_b.py").model.variant == "b"


def test_model_section_is_exactly_models_create_arguments():
    """Checkpoints rebuild the network with models.create(**config.model)."""
    parameters = set(inspect.signature(models.create).parameters) - {"rngs"}
    assert parameters == {name.removeprefix("model.") for name in configuration.KEYS if name.startswith("model.")}


def test_variant_spec_builds_its_model_and_survives_the_checkpoint_record():
    """config.model.variant as a spec: checked, and built alike from the config and from its JSON record (lists for
    tuples), as models.create builds the models.Variant it spells out."""
    config = load(os.path.join(CONFIG_DIR, "demo.py"))
    config.model.variant = TINY
    configuration.check(config)
    record = configuration.model_record(config)
    assert record["variant"]["depths"] == [1, 1, 1, 1] and json.loads(json.dumps(record)) == record
    assert configuration.architecture(record["variant"]) == models.Variant(**TINY)
    assert configuration.variant_name(record["variant"]) == "custom"
    assert configuration.variant_name(dataclasses.asdict(models.VARIANTS["t"])) == "t"

    def shapes(build):
        return jax.tree.map(lambda x: x.shape, nnx.state(nnx.eval_shape(build)))

    built = shapes(lambda: configuration.create_model(config.model.to_dict(), rngs=nnx.Rngs(0)))
    assert built == shapes(lambda: configuration.create_model(record, rngs=nnx.Rngs(0)))
    assert built == shapes(lambda: models.create(models.Variant(**TINY), 6, rngs=nnx.Rngs(0)))


def test_overrides_from_the_command_line():
    config = load(
        os.path.join(CONFIG_DIR, "ade20k_b.py"),
        "--config.optimizer.lr=1e-4",
        "--config.model.drop_path_rate=0.2",
        "--config.data.crop_size=(256,320)",
        "--config.eval.scales=(0.5,1.0,1.75)",
        "--config.eval.flip=true",
        "--config.data.root=/data/ade",
    )
    assert config.optimizer.lr == 1e-4
    assert config.model.drop_path_rate == 0.2
    assert config.data.crop_size == (256, 320)
    assert config.eval.scales == (0.5, 1.0, 1.75)
    assert config.eval.flip is True
    assert config.data.root == "/data/ade"
    default = load(os.path.join(CONFIG_DIR, "ade20k_b.py"))
    assert default.model.drop_path_rate is None and default.data.root is None  # variant default, dataset default


@pytest.mark.parametrize("override, key", [("--config.optimizer.lrr=1", "lrr"), ("--config.optimzer.lr=1", "optimzer")])
def test_unknown_key_is_an_error_naming_it(override, key):
    with pytest.raises((AttributeError, KeyError), match=key):
        load(os.path.join(CONFIG_DIR, "ade20k_t.py"), override)


def test_config_is_locked():
    config = load(os.path.join(CONFIG_DIR, "voc_s.py"))
    with pytest.raises(AttributeError, match="new_key"):
        config.train.new_key = 1


@pytest.mark.parametrize("dataset", DATASETS)
def test_dataset_recipe_matches_mmsegmentation_and_paper(dataset, mmseg, mmseg_configs):
    config = load(os.path.join(CONFIG_DIR, f"{dataset}_t.py"))
    file_name, dataset_class = MMSEG_DATASET_CONFIG[dataset]
    reference = Config.fromfile(os.path.join(mmseg_configs, "_base_", "datasets", file_name))
    train = {step["type"]: step for step in reference.train_pipeline}
    test = {step["type"]: step for step in reference.test_pipeline}
    assert config.data.scale == train["RandomResize"]["scale"]
    assert config.data.ratio_range == train["RandomResize"]["ratio_range"]
    assert config.data.crop_size == train["RandomCrop"]["crop_size"]
    assert config.data.cat_max_ratio == train["RandomCrop"]["cat_max_ratio"]
    assert config.data.test_scale == test["Resize"]["scale"]
    assert config.model.num_classes == len(getattr(mmseg.datasets, dataset_class).METAINFO["classes"])
    assert (config.train.global_batch_size, config.train.num_steps, config.data.crop_size) == PAPER[dataset]


def test_sliding_window_evaluation_where_the_reference_slides(mmseg_configs):
    context = Config.fromfile(
        os.path.join(mmseg_configs, "deeplabv3", "deeplabv3_r50-d8_4xb4-80k_pascal-context-59-480x480.py")
    ).model.test_cfg
    config = load(os.path.join(CONFIG_DIR, "pascal_context_b.py")).eval
    assert (config.mode, config.crop_size, config.stride) == (context.mode, context.crop_size, context.stride)
    cityscapes = load(os.path.join(CONFIG_DIR, "cityscapes_l.py")).eval  # official SegNeXt: slide 1024 / 768
    assert (cityscapes.mode, cityscapes.crop_size, cityscapes.stride) == ("slide", (1024, 1024), (768, 768))
    for dataset in ("ade20k", "coco_stuff", "voc", "isaid"):
        assert load(os.path.join(CONFIG_DIR, f"{dataset}_s.py")).eval.mode == "whole"


@pytest.mark.parametrize("variant", "tsbl")
def test_optimiser_schedule_and_head_match_mmsegmentation_segnext(variant, mmseg_configs):
    reference = Config.fromfile(
        os.path.join(mmseg_configs, "segnext", f"segnext_mscan-{variant}_1xb16-adamw-160k_ade20k-512x512.py")
    )
    config = load(os.path.join(CONFIG_DIR, f"ade20k_{variant}.py"))
    optimizer = reference.optim_wrapper.optimizer
    assert optimizer.type == "AdamW" and reference.optim_wrapper.get("clip_grad") is None
    assert (config.optimizer.lr, (config.optimizer.b1, config.optimizer.b2)) == (optimizer.lr, optimizer.betas)
    assert config.optimizer.weight_decay == optimizer.weight_decay
    assert config.optimizer.eps == 1e-8  # torch.optim.AdamW's default (the config sets none)
    assert config.optimizer.head_lr_mult == reference.optim_wrapper.paramwise_cfg.custom_keys["head"]["lr_mult"]
    warmup, poly = reference.param_scheduler
    assert (warmup.type, poly.type) == ("LinearLR", "PolyLR")
    assert (config.optimizer.warmup_ratio, config.optimizer.warmup_steps) == (warmup.start_factor, warmup.end)
    assert (config.optimizer.power, config.optimizer.min_lr) == (poly.power, poly.eta_min)
    assert poly.end == reference.train_cfg.max_iters == config.train.num_steps
    assert reference.train_dataloader.batch_size == config.train.global_batch_size  # 1 GPU x 16
    assert reference.train_cfg.val_interval == config.train.eval_every
    assert reference.model.decode_head.dropout_ratio == config.model.dropout_ratio
    assert reference.model.test_cfg.mode == config.eval.mode
    assert f"/mscan_{variant}_" in reference.model.backbone.init_cfg.checkpoint
    assert config.init.pretrained == f"pretrained/mscan_{variant}" and config.init.pretrained_kind == "backbone"


def test_demo_trains_from_scratch_on_the_demo_data():
    config = load(os.path.join(CONFIG_DIR, "demo.py"))
    assert (config.model.variant, config.data.dataset, config.init.pretrained) == ("t", "demo", "")
    assert config.train.num_steps % config.train.eval_every == 0  # the last step is evaluated
    assert config.train.global_batch_size % 8 == 0  # splits over 8 simulated devices
