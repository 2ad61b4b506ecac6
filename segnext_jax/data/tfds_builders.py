"""TensorFlow-free TFDS builder writing the file datasets to ArrayRecord, and the reader the pipelines use.

TFDS's own `scene_parse150` is not the ADE20K-150 benchmark and its `cityscapes` needs TensorFlow to build, so
`SegnextSegmentation` (one builder config per dataset in `datasets.DATASETS`: ade20k, cityscapes, ...) copies the
encoded image and label files of each split, byte for byte, into ArrayRecord shards. Image features given file
paths need no TensorFlow to build; the pipelines read them undecoded (`SkipDecoding`) and decode them with the
same code as files, so both sources give identical examples. A TPU pod reads the shards from shared storage.

Build: `python scripts/prepare_tfds.py --dataset=ade20k --root=ADEChallengeData2016 --data_dir=DIR`.
Read: `open_split('ade20k', DIR, 'train')` (an `ArrayRecordDataSource` of dicts of bytes).
"""

import os
from typing import ClassVar

import tensorflow_datasets as tfds

from segnext_jax.data import datasets

BUILDER_NAME = "segnext_segmentation"
_FILE_DATASETS = tuple(name for name in datasets.DATASETS if name != "demo")


class SegnextSegmentation(tfds.core.GeneratorBasedBuilder):
    """Semantic segmentation datasets in MMSegmentation's layouts, as encoded image/label bytes per example.

    Features: image (encoded JPEG/PNG as found), label (encoded PNG as found), name (image name relative to the
    split's image directory, without suffix), image_path / label_path (the source files, for reports).
    The source root is passed as `download_config=tfds.download.DownloadConfig(manual_dir=ROOT)`.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS: ClassVar[list[tfds.core.BuilderConfig]] = [
        tfds.core.BuilderConfig(name=name) for name in _FILE_DATASETS
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Prepare the dataset as `datasets.DATASETS[name].prepare` says; pass its root."

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> None:
        """No code path: TFDS uses it only to find download checksums (this builder downloads nothing), and
        computing it for a class inside an installed package needs the `importlib_resources` backport."""

    def _info(self) -> tfds.core.DatasetInfo:
        """Features: encoded image and label, their names and source paths."""
        features = tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(shape=(None, None, 3)),
                "label": tfds.features.Image(shape=(None, None, 1)),
                "name": tfds.features.Text(),
                "image_path": tfds.features.Text(),
                "label_path": tfds.features.Text(),
            }
        )
        # Records keep the listing order, so both sources feed identical batches for the same seed.
        return tfds.core.DatasetInfo(builder=self, features=features, disable_shuffling=True)

    def _split_generators(self, dl_manager):
        """One generator per split of the dataset spec, reading from the manual_dir root."""
        spec = datasets.get_spec(self.builder_config.name)
        root = datasets.resolve_root(spec, os.fspath(dl_manager.manual_dir))
        return {split: self._generate_examples(spec, root, split) for split in spec.splits}

    def _generate_examples(self, spec: datasets.DatasetSpec, root: str, split: str):
        """(key, example) in listing order; Image features given paths copy the encoded files."""
        for index, example in enumerate(datasets.list_examples(spec, root, split)):
            record = dict(example, image_path=example["image"], label_path=example["label"])
            yield f"{index:08d}", record


def build(name: str, root: str, data_dir: str) -> str:
    """Writes ArrayRecord shards of every split of dataset `name` (source `root`) under `data_dir`; returns their
    directory."""
    builder = SegnextSegmentation(config=name, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=root))
    return os.fspath(builder.data_dir)


def open_split(name: str, data_dir: str | None, split: str):
    """Random-access source of a built split whose records are dicts of bytes (images left encoded)."""
    if data_dir is None or not os.path.isdir(os.path.join(data_dir, BUILDER_NAME, name)):
        raise FileNotFoundError(
            f"no ArrayRecord build of {name} under {data_dir}: run python scripts/prepare_tfds.py --dataset={name} "
            f"--root=DATASET_ROOT --data_dir={data_dir}"
        )
    skip = tfds.decode.SkipDecoding()
    return tfds.data_source(
        f"{BUILDER_NAME}/{name}",
        split=split,
        data_dir=data_dir,
        download=False,
        decoders={"image": skip, "label": skip},
    )
