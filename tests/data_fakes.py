"""Tiny fake datasets on disk in MMSegmentation's layouts, for the test_data_* tests."""

import json
import os

import cv2
import numpy as np
from PIL import Image


def write_image(path: str, height: int, width: int, seed: int) -> np.ndarray:
    """Writes a random-ish RGB image (JPEG or PNG by suffix) and returns what OpenCV decodes from it, as RGB."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    rgb = np.clip(100 + 80 * np.sin(xx[..., None] / 5.0 + yy[..., None] / 9.0 + seed + np.arange(3)), 0, 255)
    rgb = np.clip(rgb + rng.normal(0, 20, rgb.shape), 0, 255).astype(np.uint8)
    cv2.imwrite(path, rgb[..., ::-1].copy())
    return cv2.imread(path, cv2.IMREAD_COLOR)[..., ::-1]


def write_label(path: str, values: np.ndarray, mode: str = "L") -> None:
    """Writes a label PNG with PIL in mode 'L' or 'P' (palette: indices stored, colours arbitrary)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    values = np.ascontiguousarray(values, np.uint8)
    image = Image.frombytes(mode, (values.shape[1], values.shape[0]), values.tobytes())
    if mode == "P":
        image.putpalette([(7 * i) % 256 for i in range(768)])
    image.save(path)


def random_label(height: int, width: int, low: int, high: int, seed: int) -> np.ndarray:
    """Blocky labels with values in [low, high) (8x8 blocks, so crops see several classes)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(low, high, (height // 8 + 1, width // 8 + 1))
    return np.kron(blocks, np.ones((8, 8), np.int64))[:height, :width].astype(np.uint8)


def make_ade20k(root: str, num_train: int = 6, num_val: int = 3, size: tuple[int, int] = (40, 56)) -> str:
    """ADEChallengeData2016 layout: images/{training,validation}/*.jpg, annotations/.../*.png (0 = unlabelled)."""
    for split, folder, count in (("train", "training", num_train), ("val", "validation", num_val)):
        for i in range(count):
            name = f"ADE_{split}_{i:08d}"
            height, width = size[0] + 4 * i, size[1] - 2 * i
            write_image(f"{root}/images/{folder}/{name}.jpg", height, width, seed=i)
            label = random_label(height, width, 1, 151, seed=100 + i)
            label[:3] = 0  # unlabelled rows
            write_label(f"{root}/annotations/{folder}/{name}.png", label)
    return root


def make_cityscapes(root: str, cities: tuple[str, ...] = ("aachen", "bonn"), per_city: int = 2) -> str:
    """Cityscapes layout: leftImg8bit/{train,val}/CITY/*_leftImg8bit.png, gtFine/.../*_gtFine_labelTrainIds.png."""
    for split in ("train", "val"):
        for c, city in enumerate(cities):
            for i in range(per_city):
                stem = f"{city}_{c:06d}_{i:06d}"
                write_image(f"{root}/leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png", 32, 64, seed=10 * c + i)
                label = random_label(32, 64, 0, 19, seed=c + i)
                label[:2] = 255
                write_label(f"{root}/gtFine/{split}/{city}/{stem}_gtFine_labelTrainIds.png", label)
    return root


def make_split_file_layout(root: str, parts: dict[str, tuple[str, str, list[str]]]) -> str:
    """A layout listed by split files (VOC, Pascal Context): parts maps split file -> (img_dir, ann_dir, names).

    Files are empty placeholders: only listing is tested with it.
    """
    for split_file, (img_dir, ann_dir, names) in parts.items():
        os.makedirs(os.path.dirname(f"{root}/{split_file}"), exist_ok=True)
        with open(f"{root}/{split_file}", "w") as f:
            f.write("".join(f"{name}\n" for name in names))
        for directory in (img_dir, ann_dir):
            os.makedirs(f"{root}/{directory}", exist_ok=True)
        for name in names:
            open(f"{root}/{img_dir}/{name}.jpg", "w").close()
    return root


def write_mask(path: str, values: np.ndarray, mode: str = "L") -> None:
    """Writes a folder-dataset mask PNG: class indices in mode 'L' or 'P' (`write_label`), or an (H, W, 3) uint8
    colour array in mode 'RGB' / 'RGBA' (alpha 255)."""
    if mode in ("L", "P"):
        write_label(path, values, mode)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    values = np.ascontiguousarray(values, np.uint8)
    if mode == "RGBA":
        values = np.dstack([values, np.full(values.shape[:2], 255, np.uint8)])
    Image.fromarray(values).save(path)  # (H, W, 3): RGB, (H, W, 4): RGBA


def make_folder(
    root: str,
    masks: dict[str, dict[str, np.ndarray]],
    classes: list[str] | dict | list[dict],
    mode: str = "L",
    image_suffix: str = ".jpg",
) -> str:
    """A folder dataset: masks[split][name] is written as ROOT/masks/SPLIT/NAME.png (in `mode`), with a random image
    of its size as ROOT/images/SPLIT/NAME + image_suffix; `classes` (a list of names) goes to classes.txt, anything
    else to classes.json."""
    for split, named in masks.items():
        for i, (name, mask) in enumerate(named.items()):
            write_image(f"{root}/images/{split}/{name}{image_suffix}", mask.shape[0], mask.shape[1], seed=i)
            write_mask(f"{root}/masks/{split}/{name}.png", mask, mode)
    os.makedirs(root, exist_ok=True)
    if isinstance(classes, list) and all(isinstance(name, str) for name in classes):
        with open(f"{root}/classes.txt", "w") as f:
            f.write("".join(f"{name}\n" for name in classes))
    else:
        with open(f"{root}/classes.json", "w") as f:
            json.dump(classes, f)
    return root
