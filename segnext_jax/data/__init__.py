"""Input pipelines: datasets, the reference's transforms, demo data, grain pipelines and the data check.

Modules (one job each):
- `datasets`: the registry `DATASETS` (layouts, classes, palettes, recipe defaults) and split listing;
- `metadata`: class names and palettes in MMSegmentation's order;
- `loading`: decoding and validating one image/label pair (`BadExampleError`);
- `transforms`: the reference's training/evaluation transforms in numpy + OpenCV;
- `demo`: the built-in procedurally generated dataset;
- `sources`: records + loader for files, TFDS ArrayRecord or the demo generator;
- `pipeline`: grain training/evaluation pipelines (`sharding.global_batch` makes their batches global arrays);
- `tfds_builders`: TensorFlow-free TFDS builder writing ArrayRecord (imported on demand: TFDS is slow to import);
- `check`: `python -m segnext_jax.data.check --dataset=NAME --root=PATH`.
"""

from segnext_jax.data import datasets, demo, loading, metadata, pipeline, sources, transforms

__all__ = ["datasets", "demo", "loading", "metadata", "pipeline", "sources", "transforms"]
