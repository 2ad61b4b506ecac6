"""SegNeXt-T on Pascal Context (59 classes): the reference recipe (values and sources: segnext_jax/configuration.py)."""

import ml_collections

from segnext_jax import configuration


def get_config() -> ml_collections.ConfigDict:
    return configuration.make_config("pascal_context_59", "t")
