"""SegNeXt models in Flax NNX: `create(variant, num_classes, rngs=...)` builds one."""

from segnext_jax.models.ham_head import NMF2D, LightHamHead, draw_nmf_bases, nmf2d
from segnext_jax.models.mscan import MSCAN
from segnext_jax.models.segnext import DTYPES, VARIANTS, SegNeXt, Variant, create

__all__ = [
    "DTYPES",
    "LightHamHead",
    "MSCAN",
    "NMF2D",
    "SegNeXt",
    "VARIANTS",
    "Variant",
    "create",
    "draw_nmf_bases",
    "nmf2d",
]
