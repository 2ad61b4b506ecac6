"""Where examples come from: files in the dataset's layout, a TFDS ArrayRecord build of it, or the demo generator.

`open_source(name, root, split, source)` returns a `Source`: a random-access sequence of records, a picklable
`load(record)` that returns dict(image=uint8 RGB, label=uint8 with reduce_zero_label applied, name=str) or raises
`loading.BadExampleError`, and `problems(record)` listing every `path: reason` of a record (for the data check).
Grain reads `records` and calls `load` in its workers.
"""

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

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


def open_source(name: str, root: str | None, split: str, source: str = "files") -> Source:
    """Opens split `split` of dataset `name`.

    Args:
      name: a key of `datasets.DATASETS`.
      root: the dataset root for source='files' (None: the spec's default location), the TFDS data_dir for
        source='tfds'; must be None for the demo data.
      split: 'train' or 'val'.
      source: 'files' (the on-disk layout) or 'tfds' (ArrayRecord written by scripts/prepare_tfds.py); the demo
        data is always generated.
    """
    spec = datasets.get_spec(name)
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}: choose one of {', '.join(SOURCES)}")
    if name == "demo":
        if root is not None:
            raise ValueError(f"the demo data is generated, not read: pass root=None (got {root!r})")
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
