"""segnext-jax: SegNeXt (MSCAN + LightHam decoder) in JAX / Flax NNX, equal to MMSegmentation's reference."""

__version__ = "0.1.0"

__all__ = ["Segmenter", "__version__"]


def __getattr__(name: str):
    """`segnext_jax.Segmenter`, imported on first use (it loads jax, orbax and OpenCV)."""
    if name == "Segmenter":
        from segnext_jax.serving.segmenter import Segmenter

        return Segmenter
    raise AttributeError(f"module 'segnext_jax' has no attribute {name!r}")
