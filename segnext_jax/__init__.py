"""segnext-jax: SegNeXt (MSCAN + LightHam decoder) in JAX / Flax NNX, equal to MMSegmentation's reference."""

__version__ = "0.1.0"
