"""SegNeXt-B on COCO-Stuff-164k: the reference recipe (values and sources: segnext_jax/configuration.py)."""

import ml_collections

from segnext_jax import configuration


def get_config() -> ml_collections.ConfigDict:
    return configuration.make_config("coco_stuff164k", "b")
