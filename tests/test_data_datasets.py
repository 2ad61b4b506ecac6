"""Dataset registry, split listing and example loading against MMSegmentation 1.2.2's datasets and loaders."""

import importlib.util
import os
import sys

import cv2
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import data_fakes
from oracle import import_mmseg

from segnext_jax.data import datasets, loading

_SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")


@pytest.fixture(scope="module")
def mmseg_datasets():
    import_mmseg()
    from mmseg import datasets as mmseg_datasets

    return mmseg_datasets


@pytest.mark.parametrize(
    "name, reference",
    [("ade20k", "ADE20KDataset"), ("cityscapes", "CityscapesDataset"), ("coco_stuff164k", "COCOStuffDataset"),
     ("pascal_voc12_aug", "PascalVOCDataset"), ("pascal_context_59", "PascalContextDataset59"),
     ("isaid", "iSAIDDataset")],
)  # fmt: skip
def test_classes_and_palettes_equal_mmseg(mmseg_datasets, name, reference):
    spec, metainfo = datasets.DATASETS[name], getattr(mmseg_datasets, reference).METAINFO
    assert spec.class_names == tuple(metainfo["classes"])
    assert spec.palette == tuple(map(tuple, metainfo["palette"]))
    assert spec.num_classes == len(metainfo["classes"]) and spec.ignore_index == 255


def _reference_pairs(mmseg_datasets, reference: str, root: str, img_path: str, seg_map_path: str, **kwargs):
    dataset = getattr(mmseg_datasets, reference)(
        data_root=root, data_prefix={"img_path": img_path, "seg_map_path": seg_map_path}, lazy_init=True, **kwargs
    )
    return [(info["img_path"], info["seg_map_path"], info["reduce_zero_label"]) for info in dataset.load_data_list()]


def _pairs(name: str, root: str, split: str):
    spec = datasets.DATASETS[name]
    return [(e["image"], e["label"], spec.reduce_zero_label) for e in datasets.list_examples(spec, root, split)]


def test_scanned_layouts_list_like_mmseg(mmseg_datasets, tmp_path):
    ade = data_fakes.make_ade20k(str(tmp_path / "ade"), num_train=3, num_val=2)
    assert _pairs("ade20k", ade, "train") == _reference_pairs(
        mmseg_datasets, "ADE20KDataset", ade, "images/training", "annotations/training"
    )
    assert _pairs("ade20k", ade, "val") == _reference_pairs(
        mmseg_datasets, "ADE20KDataset", ade, "images/validation", "annotations/validation"
    )
    city = data_fakes.make_cityscapes(str(tmp_path / "city"))
    listed = _pairs("cityscapes", city, "val")
    assert len(listed) == 4 and listed == _reference_pairs(
        mmseg_datasets, "CityscapesDataset", city, "leftImg8bit/val", "gtFine/val"
    )
    for name, reference, img_dir, ann_dir in (
        ("coco_stuff164k", "COCOStuffDataset", "images/train2017", "annotations/train2017"),
        ("isaid", "iSAIDDataset", "img_dir/train", "ann_dir/train"),
    ):
        root, spec = str(tmp_path / name), datasets.DATASETS[name]
        for stem in ("b/2", "a", "c"):
            os.makedirs(os.path.dirname(f"{root}/{img_dir}/{stem}"), exist_ok=True)
            open(f"{root}/{img_dir}/{stem}{spec.img_suffix}", "w").close()
        os.makedirs(f"{root}/{ann_dir}", exist_ok=True)
        assert _pairs(name, root, "train") == _reference_pairs(mmseg_datasets, reference, root, img_dir, ann_dir)


def test_split_file_layouts_list_like_mmseg(mmseg_datasets, tmp_path):
    voc = data_fakes.make_split_file_layout(
        str(tmp_path / "voc"),
        {
            "ImageSets/Segmentation/train.txt": ("JPEGImages", "SegmentationClass", ["2007_1", "2007_3"]),
            "ImageSets/Segmentation/aug.txt": ("JPEGImages", "SegmentationClassAug", ["2008_2", "2007_1"]),
            "ImageSets/Segmentation/val.txt": ("JPEGImages", "SegmentationClass", ["2009_9"]),
        },
    )
    reference = [
        pair
        for seg_dir, split_file in (("SegmentationClass", "train.txt"), ("SegmentationClassAug", "aug.txt"))
        for pair in _reference_pairs(
            mmseg_datasets, "PascalVOCDataset", voc, "JPEGImages", seg_dir,
            ann_file=f"{voc}/ImageSets/Segmentation/{split_file}",
        )
    ]  # fmt: skip
    assert _pairs("pascal_voc12_aug", voc, "train") == reference
    context = data_fakes.make_split_file_layout(
        str(tmp_path / "context"),
        {"ImageSets/SegmentationContext/val.txt": ("JPEGImages", "SegmentationClassContext", ["2008_5", "2010_1"])},
    )
    assert _pairs("pascal_context_59", context, "val") == _reference_pairs(
        mmseg_datasets, "PascalContextDataset59", context, "JPEGImages", "SegmentationClassContext",
        ann_file=f"{context}/ImageSets/SegmentationContext/val.txt",
    )  # fmt: skip


def test_missing_root_names_directory_and_preparation(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=f"{missing}.*scripts/cityscapes_trainids.py --root={missing}"):
        datasets.resolve_root(datasets.DATASETS["cityscapes"], missing)
    os.makedirs(f"{missing}/images")
    with pytest.raises(FileNotFoundError, match=f"{missing}/images/training not found.*ADEChallengeData2016.zip"):
        datasets.list_examples(datasets.DATASETS["ade20k"], missing, "train")


def _reference_load(mmseg_datasets, image_path: str, label_path: str, reduce_zero_label: bool):
    from mmcv.transforms import LoadImageFromFile
    from mmseg.datasets.transforms import LoadAnnotations

    results = {"img_path": image_path, "seg_map_path": label_path, "reduce_zero_label": reduce_zero_label}
    results["seg_fields"] = []
    results = LoadImageFromFile()(results)
    return LoadAnnotations(reduce_zero_label=reduce_zero_label)(results)


@pytest.mark.parametrize(
    "image_kind, label_mode, name",
    [("jpeg", "L", "ade20k"), ("png_rgba", "P", "ade20k"), ("png_grey", "L", "isaid"), ("png_16bit", "P", "isaid")],
)
def test_load_example_equals_mmseg_loaders(mmseg_datasets, tmp_path, image_kind, label_mode, name):
    spec = datasets.DATASETS[name]
    image_path = str(tmp_path / ("x.jpg" if image_kind == "jpeg" else "x.png"))
    label_path = str(tmp_path / "y.png")
    rgb = data_fakes.write_image(str(tmp_path / "base.png"), 30, 41, seed=3)
    if image_kind == "png_rgba":
        cv2.imwrite(image_path, np.dstack([rgb[..., ::-1], np.full(rgb.shape[:2], 77, np.uint8)]))
    elif image_kind == "png_grey":
        cv2.imwrite(image_path, rgb[..., 0])
    elif image_kind == "png_16bit":
        cv2.imwrite(image_path, rgb[..., ::-1].astype(np.uint16) * 257 + 3)
    else:
        cv2.imwrite(image_path, rgb[..., ::-1].copy())
    values = data_fakes.random_label(30, 41, 0, spec.num_classes + int(spec.reduce_zero_label), seed=4)
    values[0, :5] = 255
    data_fakes.write_label(label_path, values, label_mode)
    ours = loading.load_example({"image": image_path, "label": label_path, "name": "x"}, spec)
    ref = _reference_load(mmseg_datasets, image_path, label_path, spec.reduce_zero_label)
    np.testing.assert_array_equal(ours["image"], ref["img"][..., ::-1])
    np.testing.assert_array_equal(ours["label"], ref["gt_seg_map"])
    assert ours["label"].dtype == np.uint8 and ours["name"] == "x"


def test_cityscapes_train_ids_hand_checked():
    # labelIds -> trainIds from cityscapesscripts' labels.py: road 7 -> 0, sidewalk 8 -> 1, building 11 -> 2,
    # pole 17 -> 5, car 26 -> 13, train 31 -> 16, bicycle 33 -> 18; unlabelled 0, parking 9, guard rail 14,
    # caravan 29, trailer 30 and anything else -> 255.
    ids = np.array([[7, 8, 11, 17, 26, 31, 33], [0, 9, 14, 29, 30, 34, 255]], np.uint8)
    expected = np.array([[0, 1, 2, 5, 13, 16, 18], [255] * 7], np.uint8)
    np.testing.assert_array_equal(datasets.cityscapes_train_ids(ids), expected)


def test_cityscapes_trainids_script_writes_train_ids(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "cityscapes_trainids", os.path.join(_SCRIPTS, "cityscapes_trainids.py")
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    ids = np.tile(np.array([7, 24, 23, 3, 21], np.uint8), (6, 2))
    path = tmp_path / "gtFine" / "val" / "lindau" / "lindau_000000_000019_gtFine_labelIds.png"
    data_fakes.write_label(str(path), ids)
    assert script.main([f"--root={tmp_path}", "--threads=1"]) == 0
    written = str(path).replace("_labelIds.png", "_labelTrainIds.png")
    example = loading.load_example({"image": str(path), "label": written, "name": "x"}, datasets.DATASETS["cityscapes"])
    np.testing.assert_array_equal(example["label"], np.tile(np.array([0, 11, 10, 255, 8], np.uint8), (6, 2)))
