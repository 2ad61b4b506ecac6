"""Registry of the supported datasets: their on-disk layouts, classes, palettes and recipe defaults.

Layouts are the ones MMSegmentation 1.2.2 prepares (`docs/en/user_guides/2_dataset_prepare.md`) and listing follows
`BaseSegDataset.load_data_list`: with a split file, one image name per line; without, every file under the image
directory (recursively) ending in the image suffix, sorted by path, with its label found by swapping the suffix.

`DATASETS[name]` is a `DatasetSpec`; `list_examples(spec, root, split)` lists the image/label pairs of one split.
"""

import dataclasses
import os
from collections.abc import Mapping

import numpy as np

from segnext_jax.data import demo, metadata

IGNORE_INDEX = 255


@dataclasses.dataclass(frozen=True)
class SplitPart:
    """One directory pair of a split: images under `img_dir`, labels under `ann_dir` (both relative to the root).

    `split_file` (relative to the root) lists image names without suffix; None means scan `img_dir`.
    """

    img_dir: str
    ann_dir: str
    split_file: str | None = None


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What the pipelines need to know about a dataset.

    Attributes:
      name: registry key.
      num_classes: number of classes after `reduce_zero_label`; labels are 0..num_classes-1 or `ignore_index`.
      class_names, palette: per class, in label order (palette RGB).
      reduce_zero_label: raw label 0 means "unlabelled": it becomes 255 and every other value k becomes k-1.
      crop_size: (height, width) of the training crop (the paper's appendix table).
      scale: keep-ratio resize bound (long, short) of the reference, e.g. (2048, 512); training samples
        scale * ratio, evaluation resizes to it.
      splits: split name -> the directory parts it concatenates (empty for the demo data).
      img_suffix, seg_suffix: file name endings of images and labels.
      default_root: where MMSegmentation's configs expect the data (relative to the working directory).
      prepare: how to obtain and convert the data; printed when the root is missing.
      ignore_index: label value excluded from loss and metrics.
    """

    name: str
    num_classes: int
    class_names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    reduce_zero_label: bool
    crop_size: tuple[int, int]
    scale: tuple[int, int]
    splits: Mapping[str, tuple[SplitPart, ...]]
    img_suffix: str
    seg_suffix: str
    default_root: str | None
    prepare: str
    ignore_index: int = IGNORE_INDEX

    @property
    def test_scale(self) -> tuple[int, int]:
        """Keep-ratio resize bound used at evaluation (equal to the training scale in every reference config)."""
        return self.scale


_MMSEG_CONVERTERS = "https://github.com/open-mmlab/mmsegmentation/tree/v1.2.2/tools/dataset_converters"


def _scan_splits(img_root: str, ann_root: str, train: str, val: str) -> dict[str, tuple[SplitPart, ...]]:
    """Train/val splits of a layout that is scanned (IMG_ROOT/SPLIT and ANN_ROOT/SPLIT, no split files)."""
    return {
        "train": (SplitPart(f"{img_root}/{train}", f"{ann_root}/{train}"),),
        "val": (SplitPart(f"{img_root}/{val}", f"{ann_root}/{val}"),),
    }


def _demo_spec() -> DatasetSpec:
    """The generated demo data (`demo`): 128 x 128 scenes, 128 x 128 crops, resize bound (256, 128)."""
    return DatasetSpec(
        name="demo",
        num_classes=len(demo.CLASSES),
        class_names=demo.CLASSES,
        palette=demo.PALETTE,
        reduce_zero_label=False,
        crop_size=(demo.IMAGE_SIZE, demo.IMAGE_SIZE),
        scale=(2 * demo.IMAGE_SIZE, demo.IMAGE_SIZE),
        splits={},
        img_suffix="",
        seg_suffix="",
        default_root=None,
        prepare="nothing to prepare: the demo data is generated on the fly (root must be None)",
    )


DATASETS: Mapping[str, DatasetSpec] = {
    "ade20k": DatasetSpec(
        name="ade20k",
        num_classes=150,
        class_names=metadata.ADE20K_CLASSES,
        palette=metadata.ADE20K_PALETTE,
        reduce_zero_label=True,
        crop_size=(512, 512),
        scale=(2048, 512),
        splits=_scan_splits("images", "annotations", "training", "validation"),
        img_suffix=".jpg",
        seg_suffix=".png",
        default_root="data/ade/ADEChallengeData2016",
        prepare=(
            "download http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip and unzip it so that "
            "ROOT/images/training exists (optionally then: python scripts/prepare_tfds.py --dataset=ade20k "
            "--root=ROOT --data_dir=TFDS_DIR)"
        ),
    ),
    "cityscapes": DatasetSpec(
        name="cityscapes",
        num_classes=19,
        class_names=metadata.CITYSCAPES_CLASSES,
        palette=metadata.CITYSCAPES_PALETTE,
        reduce_zero_label=False,
        crop_size=(1024, 1024),
        scale=(2048, 1024),
        splits=_scan_splits("leftImg8bit", "gtFine", "train", "val"),
        img_suffix="_leftImg8bit.png",
        seg_suffix="_gtFine_labelTrainIds.png",
        default_root="data/cityscapes",
        prepare=(
            "download leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip from https://www.cityscapes-dataset.com,"
            " unzip both into ROOT, then run: python scripts/cityscapes_trainids.py --root=ROOT"
        ),
    ),
    "coco_stuff164k": DatasetSpec(
        name="coco_stuff164k",
        num_classes=171,
        class_names=metadata.COCO_STUFF_CLASSES,
        palette=metadata.COCO_STUFF_PALETTE,
        reduce_zero_label=False,
        crop_size=(512, 512),
        scale=(2048, 512),
        splits=_scan_splits("images", "annotations", "train2017", "val2017"),
        img_suffix=".jpg",
        seg_suffix="_labelTrainIds.png",
        default_root="data/coco_stuff164k",
        prepare=(
            "unzip COCO train2017.zip, val2017.zip and stuffthingmaps_trainval2017.zip into ROOT/images and "
            f"ROOT/annotations, then run MMSegmentation's converter: python {_MMSEG_CONVERTERS}/coco_stuff164k.py "
            "ROOT --nproc 8"
        ),
    ),
    "pascal_voc12_aug": DatasetSpec(
        name="pascal_voc12_aug",
        num_classes=21,
        class_names=metadata.PASCAL_VOC_CLASSES,
        palette=metadata.PASCAL_VOC_PALETTE,
        reduce_zero_label=False,
        crop_size=(512, 512),
        scale=(2048, 512),
        splits={
            "train": (
                SplitPart("JPEGImages", "SegmentationClass", "ImageSets/Segmentation/train.txt"),
                SplitPart("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation/aug.txt"),
            ),
            "val": (SplitPart("JPEGImages", "SegmentationClass", "ImageSets/Segmentation/val.txt"),),
        },
        img_suffix=".jpg",
        seg_suffix=".png",
        default_root="data/VOCdevkit/VOC2012",
        prepare=(
            "untar VOCtrainval_11-May-2012.tar (ROOT = VOCdevkit/VOC2012) and SBD's benchmark.tgz (VOCdevkit/VOCaug), "
            f"then run MMSegmentation's converter: python {_MMSEG_CONVERTERS}/voc_aug.py VOCdevkit VOCdevkit/VOCaug "
            "--nproc 8"
        ),
    ),
    "pascal_context_59": DatasetSpec(
        name="pascal_context_59",
        num_classes=59,
        class_names=metadata.PASCAL_CONTEXT_59_CLASSES,
        palette=metadata.PASCAL_CONTEXT_59_PALETTE,
        reduce_zero_label=True,
        crop_size=(480, 480),
        scale=(520, 520),
        splits={
            split: (SplitPart("JPEGImages", "SegmentationClassContext", f"ImageSets/SegmentationContext/{split}.txt"),)
            for split in ("train", "val")
        },
        img_suffix=".jpg",
        seg_suffix=".png",
        default_root="data/VOCdevkit/VOC2010",
        prepare=(
            "untar VOCtrainval_03-May-2010.tar (ROOT = VOCdevkit/VOC2010), download trainval_merged.json, then run "
            f"MMSegmentation's converter (needs the Detail API): python {_MMSEG_CONVERTERS}/pascal_context.py "
            "VOCdevkit trainval_merged.json"
        ),
    ),
    "isaid": DatasetSpec(
        name="isaid",
        num_classes=16,
        class_names=metadata.ISAID_CLASSES,
        palette=metadata.ISAID_PALETTE,
        reduce_zero_label=False,
        crop_size=(896, 896),
        scale=(896, 896),
        splits=_scan_splits("img_dir", "ann_dir", "train", "val"),
        img_suffix=".png",
        seg_suffix="_instance_color_RGB.png",
        default_root="data/iSAID",
        prepare=(
            "put the DOTA-v1.0 images and iSAID masks under ROOT/{train,val} as MMSegmentation describes, then run its "
            f"converter (896x896 patches, overlap 384): python {_MMSEG_CONVERTERS}/isaid.py ROOT --tmp_dir ROOT/tmp"
        ),
    ),
    "demo": _demo_spec(),
}


def get_spec(name: str) -> DatasetSpec:
    """Returns the spec of dataset `name`, or raises a one-line KeyError listing the known names."""
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}: choose one of {', '.join(sorted(DATASETS))}")
    return DATASETS[name]


def resolve_root(spec: DatasetSpec, root: str | None) -> str:
    """Returns the dataset root (`root`, else the spec's default), or raises FileNotFoundError saying how to
    prepare it."""
    path = root if root is not None else spec.default_root
    if path is None or not os.path.isdir(path):
        raise FileNotFoundError(f"{spec.name} data not found at {path}: {spec.prepare.replace('ROOT', str(path))}")
    return path


def _scan(directory: str, suffix: str) -> list[str]:
    """Paths relative to `directory` of the files under it (recursively) whose names end with `suffix`."""
    found = []
    for dirpath, _, filenames in os.walk(directory, followlinks=True):
        rel_dir = os.path.relpath(dirpath, directory)
        for filename in filenames:
            if filename.endswith(suffix):
                found.append(filename if rel_dir == "." else os.path.join(rel_dir, filename))
    return found


def list_examples(spec: DatasetSpec, root: str, split: str) -> list[dict[str, str]]:
    """Lists a split as dicts(image=path, label=path, name=image path relative to its directory without suffix).

    The order equals MMSegmentation's (`load_data_list`, parts concatenated like its `ConcatDataset`). Label files
    are not required to exist here: a missing one is reported when the example is loaded or checked.
    """
    if split not in spec.splits:
        raise KeyError(f"{spec.name} has no split {split!r}: choose one of {', '.join(spec.splits)}")
    examples = []
    for part in spec.splits[split]:
        img_dir, ann_dir = os.path.join(root, part.img_dir), os.path.join(root, part.ann_dir)
        if part.split_file is not None:
            split_file = os.path.join(root, part.split_file)
            if not os.path.isfile(split_file):
                raise FileNotFoundError(f"{split_file} not found: {spec.prepare.replace('ROOT', root)}")
            with open(split_file) as f:
                names = [line.strip() for line in f if line.strip()]
        else:
            if not os.path.isdir(img_dir):
                raise FileNotFoundError(f"{img_dir} not found: {spec.prepare.replace('ROOT', root)}")
            found = sorted(os.path.join(img_dir, rel) for rel in _scan(img_dir, spec.img_suffix))
            names = [os.path.relpath(path, img_dir)[: -len(spec.img_suffix)] for path in found]
        examples += [
            {
                "image": os.path.join(img_dir, name + spec.img_suffix),
                "label": os.path.join(ann_dir, name + spec.seg_suffix),
                "name": name,
            }
            for name in names
        ]
    return examples


def unmatched_labels(spec: DatasetSpec, root: str, split: str, examples: list[dict[str, str]]) -> list[str]:
    """Label files of a scanned (split-file-free) split whose image is not listed: data the pipeline never reads."""
    listed = {example["label"] for example in examples}
    unmatched = []
    for part in spec.splits[split]:
        ann_dir = os.path.join(root, part.ann_dir)
        if part.split_file is None and os.path.isdir(ann_dir):
            paths = (os.path.join(ann_dir, rel) for rel in _scan(ann_dir, spec.seg_suffix))
            unmatched += [path for path in paths if path not in listed]
    return sorted(unmatched)


# Cityscapes labelIds (0..33, as in cityscapesscripts' labels.py) that are evaluated, and their trainIds 0..18;
# every other id (unlabelled, ego vehicle, ..., license plate) maps to the ignore index.
_CITYSCAPES_EVALUATED_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)


def cityscapes_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """Maps a Cityscapes `*_gtFine_labelIds.png` array (uint8) to its 19-class trainIds (uint8, 255 = ignore)."""
    table = np.full(256, IGNORE_INDEX, np.uint8)
    table[list(_CITYSCAPES_EVALUATED_IDS)] = np.arange(len(_CITYSCAPES_EVALUATED_IDS), dtype=np.uint8)
    return table[label_ids]
