"""SegNeXt-S on Pascal VOC 2012 (augmented): the reference recipe (values and sources: segnext_jax/configuration.py)."""

import ml_collections

from segnext_jax import configuration


def get_config() -> ml_collections.ConfigDict:
    return configuration.make_config("pascal_voc12_aug", "s")
