"""Registry of the supported datasets: their on-disk layouts, classes, palettes and recipe defaults.

Layouts are the ones MMSegmentation 1.2.2 prepares (`docs/en/user_guides/2_dataset_prepare.md`) and listing follows
`BaseSegDataset.load_data_list`: with a split file, one image name per line; without, every file under the image
directory (recursively) ending in the image suffix, sorted by path, with its label found by swapping the suffix.

`DATASETS[name]` is a `DatasetSpec`; `list_examples(spec, root, split)` lists the image/label pairs of one split.

The `folder` dataset (`FOLDER`) is the user's own data; its spec depends on the root, so `get_spec(name, root)`
builds it from the folder's class list (`folder_spec`):

    ROOT/images/{train,val}/NAME.{jpg,jpeg,png,bmp,tif,tiff,webp}   (sub-folders allowed)
    ROOT/masks/{train,val}/NAME.png                                 (matched to the image by NAME)
    ROOT/classes.txt    one class name a line, in label order
    or ROOT/classes.json  [{"name": "road", "color": [128, 64, 128]}, ...], or {"classes": [...],
                          "ignore_color": [r, g, b], "reduce_zero_label": false}

Masks are 8-bit grey or palette PNGs holding class indices (255 = ignore; with reduce_zero_label 0 = unlabelled and
k = class k-1), or, when classes.json gives every class a colour, RGB(A) PNGs in those colours (the optional
`ignore_color` marks ignored pixels; any other colour makes the example bad).
"""

import dataclasses
import functools
import json
import os
from collections.abc import Mapping

import numpy as np

from segnext_jax.data import demo, metadata

IGNORE_INDEX = 255


class DatasetError(ValueError):
    """The user's dataset or its settings are wrong (a malformed class list, a setting the dataset fixes): one line
    naming the file or key and what to do."""


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
      mask_colors: per class, its colour in RGB masks (the folder dataset with a classes.json giving colours); empty:
        RGB masks are bad examples.
      ignore_color: the colour of ignored pixels in RGB masks, or None.
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
    mask_colors: tuple[tuple[int, int, int], ...] = ()
    ignore_color: tuple[int, int, int] | None = None

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


FOLDER = "folder"  # the user's own data: see the module docstring and `folder_spec`
NAMES = (*DATASETS, FOLDER)  # every accepted dataset name (config.data.dataset, the data check's --dataset)
FOLDER_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")  # matched case-insensitively
FOLDER_MASK_SUFFIX = ".png"
FOLDER_MAX_CLASSES = 255  # label values are uint8 and 255 is the ignore index
_FOLDER_PREPARE = (
    "put the images in ROOT/images/train and ROOT/images/val, their masks (PNG, same name) in ROOT/masks/train and "
    "ROOT/masks/val, and the class names in ROOT/classes.txt (one a line) or ROOT/classes.json"
)


def get_spec(name: str, root: str | None = None, reduce_zero_label: bool | None = None) -> DatasetSpec:
    """Returns the spec of dataset `name`, or raises a one-line KeyError listing the known names.

    For `FOLDER` the spec is read from `root` (`folder_spec`; FileNotFoundError or ValueError when it cannot be);
    `reduce_zero_label` (None: the folder's own setting) applies to it only. Registry datasets ignore `root`.
    """
    if name == FOLDER:
        return folder_spec(root, reduce_zero_label)
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}: choose one of {', '.join(sorted(NAMES))}")
    if reduce_zero_label is not None and reduce_zero_label != DATASETS[name].reduce_zero_label:
        raise DatasetError(
            f"reduce_zero_label is fixed for {name} ({DATASETS[name].reduce_zero_label}): leave it unset"
        )
    return DATASETS[name]


def folder_spec(root: str | None, reduce_zero_label: bool | None = None) -> DatasetSpec:
    """The spec of the folder dataset at `root` (see the module docstring), read from its classes.txt or
    classes.json; cached while that file is unchanged.

    `reduce_zero_label` None takes classes.json's "reduce_zero_label" (default false). Raises FileNotFoundError
    (no root, no class list) or ValueError (a malformed class list), one line each.
    """
    if root is None:
        raise FileNotFoundError(f"the {FOLDER} dataset needs its root (config.data.root, or --root): {_FOLDER_PREPARE}")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{FOLDER} data not found at {root}: {_FOLDER_PREPARE.replace('ROOT', root)}")
    found = [path for path in (f"{root}/classes.txt", f"{root}/classes.json") if os.path.isfile(path)]
    if len(found) != 1:
        problem = "both classes.txt and classes.json found: keep one" if found else "no classes.txt or classes.json"
        raise FileNotFoundError(f"{root}: {problem} ({_FOLDER_PREPARE.replace('ROOT', root)})")
    stat = os.stat(found[0])
    return _cached_folder_spec(root, found[0], reduce_zero_label, (stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=16)
def _cached_folder_spec(root: str, classes_file: str, reduce_zero_label: bool | None, stamp: tuple) -> DatasetSpec:
    """`folder_spec` of one version (`stamp`) of the class list."""
    if classes_file.endswith(".txt"):
        names, colors, ignore_color, own_reduce = _read_classes_txt(classes_file), (), None, False
    else:
        names, colors, ignore_color, own_reduce = _read_classes_json(classes_file)
    reduce_zero_label = own_reduce if reduce_zero_label is None else bool(reduce_zero_label)
    most = FOLDER_MAX_CLASSES - int(reduce_zero_label)
    if not 2 <= len(names) <= most:
        raise DatasetError(
            f"{classes_file}: {len(names)} class(es); a folder dataset needs 2 to {most} (e.g. background and object)"
        )
    return DatasetSpec(
        name=FOLDER,
        num_classes=len(names),
        class_names=names,
        palette=colors or default_palette(len(names)),
        reduce_zero_label=reduce_zero_label,
        crop_size=(512, 512),  # placeholders: the config's data.crop_size and data.scale are what the pipelines use
        scale=(2048, 512),
        splits=_scan_splits("images", "masks", "train", "val"),
        img_suffix="",  # any of FOLDER_IMAGE_SUFFIXES
        seg_suffix=FOLDER_MASK_SUFFIX,
        default_root=None,
        prepare=_FOLDER_PREPARE,
        mask_colors=colors,
        ignore_color=ignore_color,
    )


def _read_classes_txt(path: str) -> tuple[str, ...]:
    """Class names of a classes.txt: one a line (surrounding spaces and trailing empty lines dropped)."""
    with open(path, encoding="utf-8-sig") as f:
        lines = [line.strip() for line in f.read().rstrip().splitlines()]
    if "" in lines:
        raise DatasetError(f"{path}: line {lines.index('') + 1} is empty: write one class name a line")
    return _unique_names(lines, path)


def _read_classes_json(path: str) -> tuple[tuple[str, ...], tuple, tuple[int, int, int] | None, bool]:
    """(names, colours (empty when none are given), ignore colour, reduce_zero_label) of a classes.json: a list of
    classes ({"name": ..., "color": [r, g, b]} or a name), or {"classes": [...], "ignore_color": [r, g, b],
    "reduce_zero_label": bool}."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            content = json.load(f)
    except json.JSONDecodeError as error:
        raise DatasetError(f"{path}: not valid JSON ({error})") from None
    options = content if isinstance(content, dict) else {"classes": content}
    unknown = set(options) - {"classes", "ignore_color", "reduce_zero_label"}
    if unknown or not isinstance(options.get("classes"), list):
        raise DatasetError(
            f'{path}: expected a list of classes or an object with "classes" (and optionally "ignore_color", '
            f'"reduce_zero_label"){f"; unknown keys: {sorted(unknown)}" if unknown else ""}'
        )
    entries = [{"name": entry} if isinstance(entry, str) else entry for entry in options["classes"]]
    if not all(isinstance(entry, dict) and isinstance(entry.get("name"), str) for entry in entries):
        raise DatasetError(f'{path}: every class must be a name or {{"name": "...", "color": [r, g, b]}}')
    names = _unique_names([entry["name"].strip() for entry in entries], path)
    colors = tuple(_color(entry["color"], path) for entry in entries if "color" in entry)
    if colors and len(colors) != len(names):
        raise DatasetError(f"{path}: give a color to every class or to none")
    if len(set(colors)) != len(colors):
        raise DatasetError(f"{path}: two classes have the same color")
    ignore_color = options.get("ignore_color")
    ignore_color = None if ignore_color is None else _color(ignore_color, path)
    if ignore_color is not None and ignore_color in colors:
        raise DatasetError(f"{path}: ignore_color {list(ignore_color)} is also a class color")
    reduce_zero_label = options.get("reduce_zero_label", False)
    if not isinstance(reduce_zero_label, bool):
        raise DatasetError(f"{path}: reduce_zero_label must be true or false")
    return names, colors, ignore_color, reduce_zero_label


def _unique_names(names: list[str], path: str) -> tuple[str, ...]:
    """`names` as a tuple, after checking that none is empty or repeated (metrics are reported by name)."""
    if "" in names:
        raise DatasetError(f"{path}: class {names.index('') + 1} has an empty name")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise DatasetError(f"{path}: class names must be unique (repeated: {', '.join(repeated)})")
    return tuple(names)


def _color(value, path: str) -> tuple[int, int, int]:
    """An [r, g, b] list of 0..255 integers as a tuple."""
    if not (isinstance(value, list) and len(value) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in value)):
        raise DatasetError(f"{path}: color {value!r} is not [r, g, b] with integers 0..255")
    return tuple(value)


def default_palette(num_classes: int) -> tuple[tuple[int, int, int], ...]:
    """The usual colour map of class-index masks (Pascal VOC's: 0 black, 1 dark red, 2 dark green, ...), so that a
    palette PNG saved with it shows the classes in the same colours as the overlays."""
    palette = []
    for index in range(num_classes):
        rgb, value = [0, 0, 0], index
        for bit in range(8):
            for channel in range(3):
                rgb[channel] |= ((value >> channel) & 1) << (7 - bit)
            value >>= 3
        palette.append(tuple(rgb))
    return tuple(palette)


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


def _folder_files(directory: str, suffixes: tuple[str, ...] | None) -> list[tuple[str, str]]:
    """(path relative to `directory` without suffix, path) of the files under it ending (in any case) with one of
    `suffixes` (None: any), sorted by path; hidden files and folders (.DS_Store, ._x.jpg, ...) are left out."""
    found = []
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
        dirnames[:] = [name for name in dirnames if not name.startswith(".")]
        for filename in filenames:
            stem, suffix = os.path.splitext(filename)
            if (suffixes is None or suffix.lower() in suffixes) and not filename.startswith("."):
                found.append((os.path.relpath(os.path.join(dirpath, stem), directory), os.path.join(dirpath, filename)))
    return sorted(found, key=lambda pair: pair[1])


def _list_folder(spec: DatasetSpec, root: str, split: str) -> list[dict[str, str]]:
    """The folder dataset's examples of `split`, sorted by image path: each image with the mask of its name."""
    (part,) = spec.splits[split]
    img_dir, ann_dir = os.path.join(root, part.img_dir), os.path.join(root, part.ann_dir)
    if not os.path.isdir(img_dir):
        raise FileNotFoundError(f"{img_dir} not found: {spec.prepare.replace('ROOT', root)}")
    masks = dict(_folder_files(ann_dir, (FOLDER_MASK_SUFFIX,)))
    return [
        {"image": path, "label": masks.get(name, os.path.join(ann_dir, name + FOLDER_MASK_SUFFIX)), "name": name}
        for name, path in _folder_files(img_dir, FOLDER_IMAGE_SUFFIXES)
    ]


def list_examples(spec: DatasetSpec, root: str, split: str) -> list[dict[str, str]]:
    """Lists a split as dicts(image=path, label=path, name=image path relative to its directory without suffix).

    The order equals MMSegmentation's (`load_data_list`, parts concatenated like its `ConcatDataset`). Label files
    are not required to exist here: a missing one is reported when the example is loaded or checked.
    """
    if split not in spec.splits:
        raise KeyError(f"{spec.name} has no split {split!r}: choose one of {', '.join(spec.splits)}")
    if spec.name == FOLDER:
        return _list_folder(spec, root, split)
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
    """Label files of a scanned (split-file-free) split whose image is not listed: data the pipeline never reads
    (for the folder dataset: any file under its masks folder that no image uses, whatever its suffix)."""
    listed = {example["label"] for example in examples}
    if spec.name == FOLDER:
        ann_dir = os.path.join(root, spec.splits[split][0].ann_dir)
        return [path for _, path in _folder_files(ann_dir, None) if path not in listed]
    unmatched = []
    for part in spec.splits[split]:
        ann_dir = os.path.join(root, part.ann_dir)
        if part.split_file is None and os.path.isdir(ann_dir):
            paths = (os.path.join(ann_dir, rel) for rel in _scan(ann_dir, spec.seg_suffix))
            unmatched += [path for path in paths if path not in listed]
    return sorted(unmatched)


def duplicate_names(examples: list[dict[str, str]]) -> list[tuple[str, str]]:
    """(image, other image) pairs of the folder dataset sharing a name (x.jpg and x.png): both get the mask x.png."""
    first, pairs = {}, []
    for example in examples:
        if example["name"] in first:
            pairs.append((example["image"], first[example["name"]]))
        first.setdefault(example["name"], example["image"])
    return pairs


# Cityscapes labelIds (0..33, as in cityscapesscripts' labels.py) that are evaluated, and their trainIds 0..18;
# every other id (unlabelled, ego vehicle, ..., license plate) maps to the ignore index.
_CITYSCAPES_EVALUATED_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)


def cityscapes_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """Maps a Cityscapes `*_gtFine_labelIds.png` array (uint8) to its 19-class trainIds (uint8, 255 = ignore)."""
    table = np.full(256, IGNORE_INDEX, np.uint8)
    table[list(_CITYSCAPES_EVALUATED_IDS)] = np.arange(len(_CITYSCAPES_EVALUATED_IDS), dtype=np.uint8)
    return table[label_ids]
