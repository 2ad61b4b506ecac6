"""SegNeXt = MSCAN encoder + LightHamHead decoder, and the four published variants."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from segnext_jax.models.ham_head import LightHamHead
from segnext_jax.models.layers import DType
from segnext_jax.models.mscan import MSCAN


@dataclasses.dataclass(frozen=True)
class Variant:
    """Architecture of one SegNeXt size, as in MMSegmentation 1.2.2's `configs/segnext/*.py`."""

    embed_dims: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]
    drop_path_rate: float
    head_channels: int
    nmf_rank: int
    mlp_ratios: tuple[int, int, int, int] = (8, 8, 4, 4)


VARIANTS: dict[str, Variant] = {
    "t": Variant((32, 64, 160, 256), (3, 3, 5, 2), 0.1, 256, 16),
    "s": Variant((64, 128, 320, 512), (2, 2, 4, 2), 0.1, 256, 16),
    "b": Variant((64, 128, 320, 512), (3, 3, 12, 3), 0.1, 512, 64),
    "l": Variant((64, 128, 320, 512), (3, 5, 27, 3), 0.3, 1024, 64),
}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class SegNeXt(nnx.Module):
    """The segmentor: `backbone` (MSCAN) and `decode_head` (LightHamHead), named as the reference's state_dict."""

    def __init__(
        self,
        variant: Variant,
        num_classes: int,
        *,
        drop_path_rate: float | None = None,
        dropout_ratio: float = 0.1,
        dtype: DType = jnp.float32,
        depthwise_impl: str = "auto",
        nmf_one_step_grad: bool = False,
        nmf_bases: str = "random",
        nmf_seed: int | None = None,
        rngs: nnx.Rngs,
    ):
        self.num_classes = num_classes
        rate = variant.drop_path_rate if drop_path_rate is None else drop_path_rate
        self.backbone = MSCAN(
            variant.embed_dims,
            variant.depths,
            variant.mlp_ratios,
            rate,
            depthwise_impl=depthwise_impl,
            dtype=dtype,
            rngs=rngs,
        )
        self.decode_head = LightHamHead(
            variant.embed_dims[1:],
            variant.head_channels,
            num_classes,
            rank=variant.nmf_rank,
            dropout_ratio=dropout_ratio,
            one_step_grad=nmf_one_step_grad,
            nmf_bases=nmf_bases,
            nmf_seed=nmf_seed,
            dtype=dtype,
            rngs=rngs,
        )

    def __call__(
        self, images: jax.Array, *, nmf_bases: jax.Array | None = None, rngs: nnx.Rngs | None = None
    ) -> jax.Array:
        """Logits (N, ceil(H/8), ceil(W/8), num_classes) float32 for normalised NHWC `images`.

        `rngs` (e.g. `nnx.Rngs(seed)`) seeds the NMF bases (stream 'nmf') and, in training, drop path and dropout
        (stream 'dropout'); without it the model's own streams advance on every call. `nmf_bases` (N, D, R) replaces
        the random draw, and the stored bases of a model built with nmf_bases='fixed' (used when it is None).
        """
        features = self.backbone(images, rngs=rngs)
        return self.decode_head(features, nmf_bases=nmf_bases, rngs=rngs)

    def fixed_nmf_bases(self, batch: int) -> jax.Array | None:
        """The stored NMF bases of a model built with nmf_bases='fixed', repeated for `batch` images as the
        `nmf_bases` argument takes them, (batch * S, D, R); None for a model that draws random bases."""
        return self.decode_head.hamburger.ham.repeated_bases(batch)


def create(
    variant: str | Variant,
    num_classes: int,
    *,
    rngs: nnx.Rngs,
    drop_path_rate: float | None = None,
    dropout_ratio: float = 0.1,
    dtype: DType | str = jnp.float32,
    depthwise_impl: str = "auto",
    nmf_one_step_grad: bool = False,
    nmf_bases: str = "random",
    nmf_seed: int | None = None,
) -> SegNeXt:
    """Builds SegNeXt-`variant` for `num_classes` classes, in training mode.

    `variant` is a registered name ('t', 's', 'b' or 'l', see VARIANTS) or a `Variant` spelling out another size (tests
    build small ones this way).

    `dtype` ('float32' / 'bfloat16' or a jnp dtype) is the compute dtype; parameters stay float32 and norms, NMF and
    logits are computed in float32. `depthwise_impl` is 'auto', 'xla', 'native', 'shift_add' or 'portable' (see
    models.depthwise).

    `nmf_bases` 'random' (the reference) draws fresh NMF bases for every image at every call; 'fixed' draws one set
    when the model is built, from `jax.random.key(nmf_seed)` or, without `nmf_seed`, from `rngs`, and stores it as a
    non-trainable variable (`ham_head.NMFBases`, saved in checkpoints): every call is then deterministic.
    """
    if isinstance(variant, str):
        if variant not in VARIANTS:
            raise ValueError(f"unknown SegNeXt variant {variant!r}: choose one of {sorted(VARIANTS)}")
        variant = VARIANTS[variant]
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}: choose one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    return SegNeXt(
        variant,
        num_classes,
        drop_path_rate=drop_path_rate,
        dropout_ratio=dropout_ratio,
        dtype=dtype,
        depthwise_impl=depthwise_impl,
        nmf_one_step_grad=nmf_one_step_grad,
        nmf_bases=nmf_bases,
        nmf_seed=nmf_seed,
        rngs=rngs,
    )
