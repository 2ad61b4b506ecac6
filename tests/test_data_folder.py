"""The folder dataset (your own data): class lists, index / palette / RGB masks, the pipelines' labels, bad examples,
the data check, the config's number of classes, and one short training run from the command line."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(__file__))
import data_fakes

from segnext_jax import configuration
from segnext_jax.data import check, datasets, pipeline, sources

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARY = ["background", "object"]
COLOURS = {"sky": [0, 0, 255], "grass": [0, 255, 0], "road": [128, 64, 128]}
IGNORE_COLOUR = [255, 255, 255]


def _mask(height: int = 32, width: int = 40, top: int = 8, left: int = 10, value: int = 1) -> np.ndarray:
    """Background (0) with a 12 x 20 rectangle of `value` at (top, left) and an ignored (255) first row."""
    mask = np.zeros((height, width), np.uint8)
    mask[top : top + 12, left : left + 20] = value
    mask[0] = 255
    return mask


def _json_classes(**options) -> dict:
    return {"classes": [{"name": name, "color": colour} for name, colour in COLOURS.items()], **options}


def test_index_and_palette_masks_keep_their_values(tmp_path):
    """Grey and palette PNG masks hold class indices; images of any listed suffix (any case, in sub-folders) are
    matched to the mask of their name; the evaluation pipeline yields exactly the masks; reduce_zero_label shifts."""
    root = str(tmp_path)
    grey = np.array([[0, 1, 2, 255]] * 8, np.uint8).repeat(10, axis=1)  # 8 x 40: four bands of 10 columns
    palette = _mask(value=2)
    data_fakes.write_image(f"{root}/images/train/a.jpg", 8, 40, seed=0)
    data_fakes.write_mask(f"{root}/masks/train/a.png", grey, "L")
    data_fakes.write_image(f"{root}/images/train/sub/b.PNG", 32, 40, seed=1)
    data_fakes.write_mask(f"{root}/masks/train/sub/b.png", palette, "P")
    (tmp_path / "images" / "train" / ".DS_Store").write_bytes(b"\0")  # hidden: not an example
    (tmp_path / "classes.txt").write_text("background\ncar\nperson\n\n")

    spec = datasets.get_spec("folder", root)
    assert (spec.num_classes, spec.class_names, spec.reduce_zero_label) == (3, ("background", "car", "person"), False)
    assert spec.palette == ((0, 0, 0), (128, 0, 0), (0, 128, 0))  # VOC's colour map for index masks
    data = sources.open_source("folder", root, "train")
    assert [record["name"] for record in data.records] == ["a", "sub/b"]
    np.testing.assert_array_equal(data.load(data.records[0])["label"], grey)
    np.testing.assert_array_equal(data.load(data.records[1])["label"], palette)

    examples = list(pipeline.make_eval_dataset(sources.open_source("folder", root, "train")))
    np.testing.assert_array_equal(examples[0]["label"], grey)
    np.testing.assert_array_equal(examples[1]["label"], palette)

    reduced = sources.open_source("folder", root, "train", reduce_zero_label=True)
    expected = np.array([[255, 0, 1, 255]] * 8, np.uint8).repeat(10, axis=1)  # 0 unlabelled, k -> k - 1
    np.testing.assert_array_equal(reduced.load(reduced.records[0])["label"], expected)


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_rgb_masks_map_through_the_colours_of_classes_json(tmp_path, mode):
    """classes.json's colours name the classes of RGB(A) masks and make the palette; the ignore colour is 255;
    reduce_zero_label (for index masks) leaves colour masks as they are; palette masks keep their indices."""
    rgb = np.zeros((32, 40, 3), np.uint8)
    rgb[:, :20] = COLOURS["sky"]
    rgb[:, 20:] = COLOURS["grass"]
    rgb[24:] = COLOURS["road"]
    rgb[0] = IGNORE_COLOUR
    expected = np.zeros((32, 40), np.uint8)
    expected[:, 20:] = 1
    expected[24:] = 2
    expected[0] = 255
    for reduce_zero_label in (False, True):
        root = str(tmp_path / str(reduce_zero_label))
        classes = _json_classes(ignore_color=IGNORE_COLOUR, reduce_zero_label=reduce_zero_label)
        data_fakes.make_folder(root, {"train": {"a": rgb}}, classes, mode=mode, image_suffix=".png")
        spec = datasets.get_spec("folder", root)
        assert spec.class_names == tuple(COLOURS) and spec.palette == tuple(map(tuple, COLOURS.values()))
        assert spec.reduce_zero_label is reduce_zero_label
        [example] = pipeline.make_eval_dataset(sources.open_source("folder", root, "train"))
        np.testing.assert_array_equal(example["label"], expected)
    data_fakes.write_mask(f"{root}/masks/train/a.png", expected, "P")  # an index mask in the same dataset
    data = sources.open_source("folder", root, "train", reduce_zero_label=False)
    np.testing.assert_array_equal(data.load(data.records[0])["label"], expected)


def _binary_folder(root: str, bad_value: int | None = None) -> str:
    """Two 32 x 40 training images with an object each (and one bad mask holding `bad_value`), one for validation."""
    train = {"a": _mask(top=8, left=10), "b": _mask(top=16, left=4)}
    if bad_value is not None:
        train["c"] = _mask(value=bad_value)
    return data_fakes.make_folder(root, {"train": train, "val": {"v": _mask(top=2, left=20)}}, BINARY)


def _train(root: str, **options) -> pipeline.TrainIterator:
    """Training batches whose crop is the whole image (no resize): each label is a mask or its mirror image."""
    options = {
        "crop_size": (32, 40), "scale": (40, 32), "ratio_range": (1.0, 1.0), "cat_max_ratio": 1.0,
        "global_batch_size": 2, "seed": 0, "num_workers": 0, **options,
    }  # fmt: skip
    return iter(pipeline.make_train_dataset("folder", root, **options))


def test_binary_training_batches_are_the_masks(tmp_path):
    root = _binary_folder(str(tmp_path))
    masks = [_mask(top=8, left=10), _mask(top=16, left=4)]
    candidates = [m.astype(np.int32) for mask in masks for m in (mask, mask[:, ::-1])]
    labels = [label for _ in range(3) for label in next(_train(root))["label"]]
    for label in labels:
        assert any(np.array_equal(label, candidate) for candidate in candidates)


def test_bad_folder_examples_are_skipped_or_stop_the_run(tmp_path):
    root = _binary_folder(str(tmp_path), bad_value=2)
    iterator = _train(root)
    for _ in range(3):
        batch = next(iterator)
        assert set(np.unique(batch["label"])) <= {0, 1, 255}
    assert iterator.num_skipped >= 1
    bad = f"{root}/masks/train/c.png: label values 2 are outside 0..1 and not 255"
    stopping = _train(root, bad_example="stop")
    with pytest.raises(pipeline.BadDataError, match=f"^bad training example \\(bad_example='stop'\\): {bad}"):
        for _ in range(3):  # one epoch reads every example
            next(stopping)


def _plant_defects(root: str) -> dict[str, str]:
    """A folder dataset (classes.json with colours) with one defect of each kind in train; {path: reason}."""
    good = {"good": _mask(value=2), **{name: _mask() for name in ("range", "size", "image", "colour", "twin")}}
    data_fakes.make_folder(root, {"train": good, "val": {"v": _mask()}}, _json_classes())
    images, masks = f"{root}/images/train", f"{root}/masks/train"
    data_fakes.write_mask(f"{masks}/range.png", _mask(value=7))
    data_fakes.write_mask(f"{masks}/size.png", np.zeros((16, 16), np.uint8))
    with open(f"{images}/image.jpg", "wb") as f:
        f.write(b"not an image")
    data_fakes.write_image(f"{images}/lonely.jpg", 32, 40, seed=5)
    colour = np.zeros((32, 40, 3), np.uint8)
    colour[:] = COLOURS["road"]
    colour[5, 5] = (1, 2, 3)
    data_fakes.write_mask(f"{masks}/colour.png", colour, "RGB")
    data_fakes.write_mask(f"{masks}/orphan.png", _mask())
    data_fakes.write_image(f"{images}/twin.png", 32, 40, seed=6)
    return {
        f"{masks}/range.png": "label values 7 are outside 0..2 and not 255",
        f"{masks}/size.png": "label size 16x16 differs from image size 40x32 (size.jpg)",
        f"{images}/image.jpg": "not a decodable image",
        f"{masks}/lonely.png": "file missing",
        f"{masks}/colour.png": "mask colours (1, 2, 3) are not in classes.json",
        f"{masks}/orphan.png": "mask has no matching image",
        f"{images}/twin.png": f"has the name of {images}/twin.jpg (masks are matched by name): rename one",
    }


def test_check_names_each_planted_defect_and_counts_the_classes(tmp_path, capsys):
    root = str(tmp_path)
    expected = _plant_defects(root)
    assert check.main(["--dataset=folder", f"--root={root}", "--threads=2"]) == 1
    lines = capsys.readouterr().out.splitlines()
    reported = dict(line.split(": ", 1) for line in lines if line.startswith(root))
    assert reported == expected
    # 32 x 40 masks: a 12 x 20 rectangle (240 pixels) in 1240 labelled ones, the first row (40 of 1280) ignored.
    # Good in train: "good" (road rectangle) and twin.jpg and twin.png (both with the grass rectangle of twin.png).
    assert lines[:13] == [
        "train: classes of 3 good example(s)",
        "  class      images   pixels",
        "  sky             3   80.65%",  # 3000 of 3720
        "  grass           2   12.90%",  # 480
        "  road            1    6.45%",  # 240
        "  (ignored)       3    3.12%",  # 120 of all 3840
        "val: classes of 1 good example(s)",
        "  class      images   pixels",
        "  sky             1   80.65%",
        "  grass           1   19.35%",
        "  road            0    0.00%",
        "  (ignored)       1    3.12%",
        "  note: no pixel of road in val",
    ]


def test_check_notes_binary_masks_saved_as_0_and_255(tmp_path, capsys):
    """Such masks are valid (255 is the ignore value) but train nothing: the check's table says so."""
    root = data_fakes.make_folder(str(tmp_path), {"train": {"a": _mask(value=255)}, "val": {}}, BINARY)
    assert check.main(["--dataset=folder", f"--root={root}", "--splits=train"]) == 0
    assert (
        "  note: no pixel of object in train (masks of 0 and 255? 255 marks ignored pixels: store the classes as "
        "0, 1, ...)" in capsys.readouterr().out.splitlines()
    )


@pytest.mark.parametrize(
    "files, error",
    [
        ({}, "no classes.txt or classes.json"),
        ({"classes.txt": "a\nb\n", "classes.json": '["a", "b"]'}, "both classes.txt and classes.json found"),
        ({"classes.txt": "a\n\nb\n"}, "line 2 is empty"),
        ({"classes.txt": "a\nb\na\n"}, "class names must be unique (repeated: a)"),
        ({"classes.txt": "object\n"}, "1 class(es); a folder dataset needs 2 to 255"),
        ({"classes.json": '[{"name": "a", "color": [1, 2, 3]}, {"name": "b"}]'}, "give a color to every class"),
        ({"classes.json": '[{"name": "a", "color": [1, 2, 300]}, "b"]'}, "color [1, 2, 300] is not [r, g, b]"),
        ({"classes.json": '{"classes": ["a", "b"], "ignore": 0}'}, "unknown keys: ['ignore']"),
        ({"classes.json": '{"classes": [{"name": "a", "color": [0, 0, 0]}, {"name": "b", "color": [9, 9, 9]}], '
                          '"ignore_color": [0, 0, 0]}'}, "ignore_color [0, 0, 0] is also a class color"),
    ],
)  # fmt: skip
def test_class_list_problems_are_one_line_errors(tmp_path, capsys, files, error):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "images" / "train").mkdir(parents=True)
    with pytest.raises((FileNotFoundError, ValueError), match=f"^{tmp_path}.*{re.escape(error)}"):
        datasets.get_spec("folder", str(tmp_path))
    assert check.main(["--dataset=folder", f"--root={tmp_path}"]) == 2
    assert error in capsys.readouterr().err


def test_rgb_masks_need_colours_and_the_spec_follows_the_class_list(tmp_path):
    root = data_fakes.make_folder(str(tmp_path), {"train": {"a": np.zeros((8, 8, 3), np.uint8)}}, BINARY, mode="RGB")
    data = sources.open_source("folder", root, "train")
    assert data.problems(data.records[0]) == [
        f"{root}/masks/train/a.png: RGB mask, but no class colours are known: give them in classes.json, or save "
        "class indices (8-bit grey or palette PNG)"
    ]
    (tmp_path / "classes.txt").write_text("background\nobject\nshadow\n")  # edited: read again
    assert datasets.get_spec("folder", root).num_classes == 3
    with pytest.raises(ValueError, match="source must be 'files'"):
        sources.open_source("folder", root, "train", source="tfds")


def _config(*overrides: str):
    """configs/folder_t.py parsed with `overrides` as main.py's flags do (a locked config)."""
    argv = ["main.py", f"--config={REPO}/configs/folder_t.py", *overrides]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, lock_config=True, sys_argv=argv)
    flag_values(argv)
    return flag_values.config


def test_config_takes_the_number_of_classes_from_the_folder(tmp_path):
    root = _binary_folder(str(tmp_path))
    config = _config(f"--config.data.root={root}")
    assert config.model.num_classes is None and config.init.pretrained == "pretrained/mscan_t"
    configuration.check(config)
    configuration.fill_from_dataset(config)
    assert config.model.num_classes == 2
    wrong = _config(f"--config.data.root={root}", "--config.model.num_classes=3")
    configuration.check(wrong)
    with pytest.raises(configuration.ConfigError, match=f"^config.model.num_classes=3, but {root} has 2 classes "):
        configuration.fill_from_dataset(wrong)
    for overrides, error in (
        ((), "config.data.root is required for config.data.dataset='folder'"),
        ((f"--config.data.root={root}", "--config.data.source=tfds"), "the folder dataset is read from 'files'"),
        (("--config.data.dataset=ade20k", "--config.data.reduce_zero_label=true"), "is for config.data.dataset="),
    ):
        with pytest.raises(configuration.ConfigError, match=error):
            configuration.check(_config(*overrides))
    with pytest.raises(configuration.ConfigError, match="folder data not found at"):
        configuration.fill_from_dataset(_config(f"--config.data.root={tmp_path}/missing"))


E2E_OVERRIDES = [
    "--config.init.pretrained=",
    "--config.train.num_steps=2",
    "--config.train.global_batch_size=2",
    "--config.train.checkpoint_every=2",
    "--config.train.eval_every=2",
    "--config.train.log_every=1",
    "--config.data.crop_size=(64,64)",
    "--config.data.scale=(64,48)",
    "--config.data.test_scale=(64,48)",
    "--config.data.num_workers=0",
    "--config.optimizer.warmup_steps=0",
]


def test_trains_and_evaluates_from_the_command_line(tmp_path, shared_xla_cache):
    """configs/folder_t.py on a binary folder dataset: the number of classes comes from classes.txt."""
    root = _binary_folder(str(tmp_path / "data"))
    workdir = tmp_path / "workdir"
    command = [sys.executable, "-m", "segnext_jax.main", "--config=configs/folder_t.py", f"--config.data.root={root}",
               f"--workdir={workdir}", *E2E_OVERRIDES]  # fmt: skip
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", JAX_COMPILATION_CACHE_DIR=shared_xla_cache)
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(workdir / "eval" / "step_2.json") as f:
        evaluation = json.load(f)
    assert evaluation["dataset"] == "folder" and list(evaluation["IoU"]) == BINARY
