"""Where examples come from: files in the dataset's layout, a TFDS ArrayRecord build of it, or the demo generator.

`open_source(name, root, split, source)` returns a `Source`: a random-access sequence of records, a picklable
`load(record)` that returns dict(image=uint8 RGB, label=uint8 with reduce_zero_label applied, name=str) or raises
`loading.BadExampleError`, and `problems(record)` listing every `path: reason` of a record (for the data check).
Grain reads `records` and calls `load` in its workers.

The folder dataset's index masks (grey or palette PNGs) load exactly as every other dataset's labels
(`loading.load_example`); its RGB(A) masks are decoded as images and mapped through the spec's `mask_colors`
(`ignore_color` -> 255; any other colour makes the example bad), then checked like any label.
"""

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from segnext_jax.data import datasets, demo, loading

SOURCES = ("files", "tfds")


@dataclasses.dataclass(frozen=True)
class Source:
    """A split's records (`len`, `[i]`), how to load or check one, and the dataset spec they follow."""

    records: Sequence[Any]
    load: Callable[[Any], dict]
    problems: Callable[[Any], list[str]]
    spec: datasets.DatasetSpec


def _load_demo(index: int, split: str) -> dict:
    """Generates demo example `index` of `split`."""
    return demo.generate(split, int(index))


def _demo_problems(index: int, split: str, spec: datasets.DatasetSpec) -> list[str]:
    """The data check of a demo example: its label values."""
    example = _load_demo(index, split)
    try:
        loading.validate_label(example["label"], spec, example["name"])
    except loading.BadExampleError as error:
        return [str(error)]
    return []


def _with_texts(record: dict) -> dict:
    """A TFDS record (encoded bytes; names as bytes) with its names decoded, ready for the file loader."""
    return dict(record, **{key: record[key].decode() for key in ("name", "image_path", "label_path")})


def _load_tfds_record(record: dict, spec: datasets.DatasetSpec) -> dict:
    """`loading.load_example` of a TFDS record."""
    return loading.load_example(_with_texts(record), spec)


def _tfds_problems(record: dict, spec: datasets.DatasetSpec) -> list[str]:
    """`loading.find_problems` of a TFDS record."""
    return loading.find_problems(_with_texts(record), spec)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_COLOR_TYPES = (2, 6)  # RGB, RGBA (IHDR colour types)


def _is_color_png(data: bytes) -> bool:
    """Whether `data` is a PNG whose header says RGB or RGBA (read from the IHDR chunk, before any decoding)."""
    return data[:8] == _PNG_SIGNATURE and data[12:16] == b"IHDR" and len(data) > 25 and data[25] in _PNG_COLOR_TYPES


def _colors_to_values(rgb: np.ndarray, spec: datasets.DatasetSpec, path: str) -> np.ndarray:
    """The uint8 stored values of an RGB mask: class k's colour -> k (k + 1 with reduce_zero_label, which then maps it
    back to k), the ignore colour -> 255; raises BadExampleError naming the colours that are neither."""
    codes = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    colors = [*spec.mask_colors, *([spec.ignore_color] if spec.ignore_color is not None else [])]
    table = np.array([(r << 16) | (g << 8) | b for r, g, b in colors], np.int32)
    offset = int(spec.reduce_zero_label)
    values = np.array([k + offset for k in range(spec.num_classes)] + [spec.ignore_index], np.uint8)[: len(table)]
    order = np.argsort(table)
    position = np.minimum(np.searchsorted(table[order], codes), len(table) - 1)
    known = table[order][position] == codes
    if not known.all():
        unknown = np.unique(codes[~known])
        shown = ", ".join(f"({c >> 16}, {(c >> 8) & 255}, {c & 255})" for c in unknown[:5])
        more = f" and {unknown.size - 5} more" if unknown.size > 5 else ""
        raise loading.BadExampleError(path, f"mask colours {shown}{more} are not in classes.json")
    return values[order][position]


def _decode_folder_mask(record: dict, spec: datasets.DatasetSpec) -> tuple[np.ndarray | bytes, str]:
    """(stored values, path) of an RGB mask, or (encoded bytes, path) of any other mask (for `loading`)."""
    data, path = loading.read_bytes(record["label"], record["label"])
    if not _is_color_png(data):
        return data, path
    if not spec.mask_colors:
        raise loading.BadExampleError(
            path,
            "RGB mask, but no class colours are known: give them in classes.json, or save class indices "
            "(8-bit grey or palette PNG)",
        )
    limit = record.get("max_image_pixels", loading.DEFAULT_MAX_IMAGE_PIXELS)
    return _colors_to_values(loading.decode_image(data, path, max_image_pixels=limit), spec, path), path


def _decode_folder_image(record: dict) -> tuple[np.ndarray, str]:
    """(uint8 RGB, path) of a folder record's image, within its size limit."""
    data, path = loading.read_bytes(record["image"], record["image"])
    limit = record.get("max_image_pixels", loading.DEFAULT_MAX_IMAGE_PIXELS)
    return loading.decode_image(data, path, max_image_pixels=limit), path


def _load_folder(record: dict, spec: datasets.DatasetSpec) -> dict:
    """`loading.load_example` of a folder record, its RGB mask (if it has one) mapped to class indices."""
    mask, mask_path = _decode_folder_mask(record, spec)
    if isinstance(mask, bytes):
        return loading.load_example(dict(record, label=mask, label_path=mask_path), spec)
    image, image_path = _decode_folder_image(record)
    label = loading._paired_label(image, image_path, mask, mask_path, spec)  # size and values, as for any label
    return {"image": image, "label": label, "name": record["name"]}


def _folder_problems(record: dict, spec: datasets.DatasetSpec) -> list[str]:
    """`loading.find_problems` of a folder record (RGB masks mapped through the colour table first)."""
    try:
        mask, mask_path = _decode_folder_mask(record, spec)
    except loading.BadExampleError as error:
        try:
            _decode_folder_image(record)
        except loading.BadExampleError as image_error:
            return [str(image_error), str(error)]
        return [str(error)]
    if isinstance(mask, bytes):
        return loading.find_problems(dict(record, label=mask, label_path=mask_path), spec)
    try:
        image, image_path = _decode_folder_image(record)
        loading._paired_label(image, image_path, mask, mask_path, spec)
    except loading.BadExampleError as error:
        return [str(error)]
    return []


def open_source(
    name: str, root: str | None, split: str, source: str = "files", reduce_zero_label: bool | None = None
) -> Source:
    """Opens split `split` of dataset `name`.

    Args:
      name: one of `datasets.NAMES` (a key of `datasets.DATASETS`, or `datasets.FOLDER`).
      root: the dataset root for source='files' (None: the spec's default location; required for the folder
        dataset), the TFDS data_dir for source='tfds'; must be None for the demo data.
      split: 'train' or 'val'.
      source: 'files' (the on-disk layout) or 'tfds' (ArrayRecord written by scripts/prepare_tfds.py); the demo
        data is always generated, the folder dataset always read from files.
      reduce_zero_label: the folder dataset's setting (None: its classes.json's, default false); None for others.
    """
    spec = datasets.get_spec(name, root, reduce_zero_label)
    if source not in SOURCES:
        raise datasets.DatasetError(f"unknown source {source!r}: choose one of {', '.join(SOURCES)}")
    if name == datasets.FOLDER:
        if source != "files":
            raise datasets.DatasetError(
                f"the {name} dataset is read from its files: source must be 'files' (got {source!r})"
            )
        return Source(
            datasets.list_examples(spec, root, split),
            functools.partial(_load_folder, spec=spec),
            functools.partial(_folder_problems, spec=spec),
            spec,
        )
    if name == "demo":
        if root is not None:
            raise datasets.DatasetError(f"the demo data is generated, not read: pass root=None (got {root!r})")
        return Source(
            range(demo.num_examples(split)),
            functools.partial(_load_demo, split=split),
            functools.partial(_demo_problems, split=split, spec=spec),
            spec,
        )
    if source == "tfds":
        # Imported only here: TFDS is slow to import and only this source needs it.
        from segnext_jax.data import tfds_builders

        return Source(
            tfds_builders.open_split(name, root, split),
            functools.partial(_load_tfds_record, spec=spec),
            functools.partial(_tfds_problems, spec=spec),
            spec,
        )
    records = datasets.list_examples(spec, datasets.resolve_root(spec, root), split)
    return Source(
        records,
        functools.partial(loading.load_example, spec=spec),
        functools.partial(loading.find_problems, spec=spec),
        spec,
    )
