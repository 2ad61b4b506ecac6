"""MSCAN, SegNeXt's convolutional-attention encoder (mmseg 1.2.2 `mscan.py`), in NHWC.

Attribute names and list indices mirror the reference's module tree, so the state_dict key
`block1.0.attn.spatial_gating_unit.conv0_1.weight` is the parameter path
`('block1', 0, 'attn', 'spatial_gating_unit', 'conv0_1', 'kernel')`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from segnext_jax import backend
from segnext_jax.kernels import fusion_barrier
from segnext_jax.models.depthwise import DepthwiseConv2d, resolve_impl
from segnext_jax.models.layers import GELU, BatchNorm2d, Conv2d, DropPath, DType, LayerNorm, gelu

LANES = 128  # the minor tile extent of TPU's HBM layouts


class StemConv(nnx.Module):
    """Stage-1 patch embedding: two 3x3 stride-2 convolutions with BatchNorm, GELU between (stride 4 overall)."""

    def __init__(self, in_channels: int, out_channels: int, *, dtype: DType, rngs: nnx.Rngs):
        mid = out_channels // 2
        self.proj = nnx.List(
            [
                Conv2d(in_channels, mid, 3, stride=2, padding=1, dtype=dtype, rngs=rngs),
                BatchNorm2d(mid),
                GELU(),
                Conv2d(mid, out_channels, 3, stride=2, padding=1, dtype=dtype, rngs=rngs),
                BatchNorm2d(out_channels),
            ]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        fold = self.lane_fold(x.shape[2]) if backend.current().fold_stem else 1
        if fold == 1:
            for layer in self.proj:
                x = layer(x)
            return x
        conv1, norm1, act, conv2, norm2 = self.proj
        n, h, w, c = x.shape
        x = x.reshape(n, h, w // (2 * fold), 2 * fold * c)
        x = act(norm1(conv1.folded_stride2(x, fold), fold=fold))
        x = norm2(conv2.folded_stride2(x, fold // 2), fold=fold // 2)
        return x.reshape(n, x.shape[1], w // 4, -1)

    def lane_fold(self, width: int) -> int:
        """Pixels per folded position of the first convolution's output in the W-folded computation (1: none).

        The same convolutions, normalisations and activation on a layout where W is folded into channels: f
        adjacent pixels of C channels as f * C = 128 channels (`Conv2d.folded_stride2`), so the narrow activations
        fill TPU's (8, 128) tiles instead of being padded to 128 lanes and relaid out between operations
        (measured: benchmarks/README.md). Needs C to divide 128 (so f is a power of two, halved for the second
        convolution's output of 2 C channels) and 2 f to divide the input width."""
        mid = self.proj[0].kernel.shape[-1]
        fold = LANES // mid if LANES % mid == 0 else 1
        return fold if fold >= 2 and width % (2 * fold) == 0 else 1


class OverlapPatchEmbed(nnx.Module):
    """Stages 2-4 patch embedding: a 3x3 stride-2 convolution (padding 1) and BatchNorm."""

    def __init__(self, in_channels: int, out_channels: int, *, dtype: DType, rngs: nnx.Rngs):
        self.proj = Conv2d(in_channels, out_channels, 3, stride=2, padding=1, dtype=dtype, rngs=rngs)
        self.norm = BatchNorm2d(out_channels)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.norm(self.proj(x))


class MSCAAttention(nnx.Module):
    """Multi-scale convolutional attention: a 5x5 depth-wise conv, three strip branches (7, 11, 21), a 1x1 channel
    mix, and the result used as attention weights on the input (official name: AttentionModule)."""

    def __init__(self, dim: int, *, depthwise_impl: str, dtype: DType, rngs: nnx.Rngs):
        def dw(kh: int, kw: int) -> DepthwiseConv2d:
            return DepthwiseConv2d(
                dim, (kh, kw), padding=(kh // 2, kw // 2), impl=depthwise_impl, dtype=dtype, rngs=rngs
            )

        self.conv0 = dw(5, 5)
        self.conv0_1, self.conv0_2 = dw(1, 7), dw(7, 1)
        self.conv1_1, self.conv1_2 = dw(1, 11), dw(11, 1)
        self.conv2_1, self.conv2_2 = dw(1, 21), dw(21, 1)
        self.conv3 = Conv2d(dim, dim, 1, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        attn = self.conv0(x)
        attn_0 = self.conv0_2(self.conv0_1(attn))
        attn_1 = self.conv1_2(self.conv1_1(attn))
        attn_2 = self.conv2_2(self.conv2_1(attn))
        attn = self.conv3(attn + attn_0 + attn_1 + attn_2)
        return attn * x


class MSCASpatialAttention(nnx.Module):
    """1x1 conv, GELU, MSCA, 1x1 conv, plus an inner residual (official name: SpatialAttention)."""

    def __init__(self, dim: int, *, depthwise_impl: str, dtype: DType, rngs: nnx.Rngs):
        self.proj_1 = Conv2d(dim, dim, 1, dtype=dtype, rngs=rngs)
        self.spatial_gating_unit = MSCAAttention(dim, depthwise_impl=depthwise_impl, dtype=dtype, rngs=rngs)
        self.proj_2 = Conv2d(dim, dim, 1, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = gelu(self.proj_1(x))
        y = self.proj_2(self.spatial_gating_unit(y))
        return y + x


class Mlp(nnx.Module):
    """The block's feed-forward: 1x1 conv, 3x3 depth-wise conv, GELU, 1x1 conv (dropout rate 0 in every config)."""

    def __init__(self, dim: int, hidden: int, *, depthwise_impl: str, dtype: DType, rngs: nnx.Rngs):
        self.fc1 = Conv2d(dim, hidden, 1, dtype=dtype, rngs=rngs)
        self.dwconv = DepthwiseConv2d(hidden, (3, 3), padding=(1, 1), impl=depthwise_impl, dtype=dtype, rngs=rngs)
        self.fc2 = Conv2d(hidden, dim, 1, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        # fc1's bias and the GELU go into the depth-wise convolution: one pass over the widest activations
        hidden = self.dwconv(self.fc1(x, add_bias=False), input_bias=self.fc1.bias[...], gelu=True)
        return self.fc2(hidden)


class MSCABlock(nnx.Module):
    """One MSCAN block: x + drop_path(ls1 * attn(bn(x))), then x + drop_path(ls2 * mlp(bn(x))).

    Where the native CPU kernels run the block, the residual stream's gradient passes a fusion barrier at both
    additions (segnext_jax.kernels.fusion_barrier): XLA:CPU would otherwise recompute it from every later block.
    """

    def __init__(
        self, dim: int, mlp_ratio: float, drop_path: float, *, depthwise_impl: str, dtype: DType, rngs: nnx.Rngs
    ):
        self.norm1 = BatchNorm2d(dim)
        self.attn = MSCASpatialAttention(dim, depthwise_impl=depthwise_impl, dtype=dtype, rngs=rngs)
        self.drop_path = DropPath(drop_path, rngs=rngs)
        self.norm2 = BatchNorm2d(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), depthwise_impl=depthwise_impl, dtype=dtype, rngs=rngs)
        self.layer_scale_1 = nnx.Param(jnp.full((dim,), 1e-2, jnp.float32))
        self.layer_scale_2 = nnx.Param(jnp.full((dim,), 1e-2, jnp.float32))
        self.dtype = dtype

    def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | jax.Array | None = None) -> jax.Array:
        """`rngs`: an `nnx.Rngs` or one key (split between the two branches' stochastic depth) or None."""
        rngs_attn = rngs_mlp = rngs
        if rngs is not None and not isinstance(rngs, nnx.Rngs):
            rngs_attn, rngs_mlp = jax.random.split(rngs)
        ls1 = self.layer_scale_1[...].astype(self.dtype)
        ls2 = self.layer_scale_2[...].astype(self.dtype)
        barrier = self._gradient_barrier()
        x = barrier(x)
        x = x + self.drop_path(ls1 * self.attn(self.norm1(x)), rngs=rngs_attn)
        x = barrier(x)
        x = x + self.drop_path(ls2 * self.mlp(self.norm2(x)), rngs=rngs_mlp)
        return x

    def _gradient_barrier(self) -> Callable[[jax.Array], jax.Array]:
        """`fusion_barrier.gradient_barrier` where the backend policy asks for it and the block's depth-wise
        convolutions run natively, else the identity (XLA's own fusion on GPU and TPU, and no C++ call in a
        `portable` program)."""
        native = resolve_impl(self.mlp.dwconv.impl, self.dtype) == "native"
        return fusion_barrier.gradient_barrier if native and backend.current().fusion_barrier else lambda x: x


def run_blocks(blocks: nnx.List, x: jax.Array, rngs: nnx.Rngs | None) -> jax.Array:
    """Applies a stage's blocks in order: one after the other, or as one `jax.lax.scan` over their stacked state
    where the backend policy says so (`Policy.scans`: stages deeper than backend.CPU_MAX_INLINED_BLOCKS on CPU, every
    stage of several blocks on GPU and TPU).

    The blocks share one structure, so under the scan XLA compiles the block once per stage instead of once per block
    (the L model has 27 blocks in stage 3). Both ways give each block the same stochastic-depth key. Batch statistics
    and random-stream counters the blocks update are written back.
    """
    if len(blocks) == 1:
        return blocks[0](x, rngs=rngs)
    keys = None  # one stochastic-depth key per block, the same whether the stage is inlined or scanned
    if rngs is not None and not blocks[0].drop_path.deterministic:
        keys = jax.random.split(rngs["dropout"](), len(blocks))
    if not backend.current().scans(len(blocks)):
        for i, block in enumerate(blocks):
            x = block(x, rngs=None if keys is None else keys[i])
        return x
    graphdef = nnx.graphdef(blocks[0])
    stacked = jax.tree.map(lambda *values: jnp.stack(values), *[nnx.state(block) for block in blocks])

    def body(carry, inputs):
        state, key = inputs
        block = nnx.merge(graphdef, state)
        return block(carry, rngs=key), nnx.state(block, nnx.Not(nnx.Param))

    if backend.current().remat_blocks:
        body = jax.checkpoint(body, prevent_cse=False)  # inside a scan CSE cannot undo the recomputation
    x, updated = jax.lax.scan(body, x, (stacked, keys))
    for i, block in enumerate(blocks):
        nnx.update(block, jax.tree.map(lambda value, i=i: value[i], updated))
    return x


class MSCAN(nnx.Module):
    """The four-stage encoder; returns the four LayerNorm'd NHWC stage outputs at strides 4, 8, 16, 32."""

    def __init__(
        self,
        embed_dims: tuple[int, ...],
        depths: tuple[int, ...],
        mlp_ratios: tuple[float, ...] = (8, 8, 4, 4),
        drop_path_rate: float = 0.1,
        *,
        depthwise_impl: str = "auto",
        dtype: DType = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.embed_dims = tuple(embed_dims)
        self.depths = tuple(depths)
        self.dtype = dtype
        rates = np.linspace(0.0, drop_path_rate, sum(depths)).tolist()  # linear over all blocks, as torch.linspace
        start = 0
        for i, (dim, depth, ratio) in enumerate(zip(embed_dims, depths, mlp_ratios)):
            if i == 0:
                embed = StemConv(3, dim, dtype=dtype, rngs=rngs)
            else:
                embed = OverlapPatchEmbed(embed_dims[i - 1], dim, dtype=dtype, rngs=rngs)
            blocks = nnx.List(
                [
                    MSCABlock(dim, ratio, rates[start + j], depthwise_impl=depthwise_impl, dtype=dtype, rngs=rngs)
                    for j in range(depth)
                ]
            )
            start += depth
            setattr(self, f"patch_embed{i + 1}", embed)
            setattr(self, f"block{i + 1}", blocks)
            setattr(self, f"norm{i + 1}", LayerNorm(dim))

    def __call__(self, images: jax.Array, *, rngs: nnx.Rngs | None = None) -> list[jax.Array]:
        x = images.astype(self.dtype)
        outs = []
        for i in range(1, len(self.depths) + 1):
            x = getattr(self, f"patch_embed{i}")(x)
            x = run_blocks(getattr(self, f"block{i}"), x, rngs)
            x = getattr(self, f"norm{i}")(x)
            outs.append(x)
        return outs
