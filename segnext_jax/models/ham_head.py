"""LightHamHead, SegNeXt's decoder (mmseg 1.2.2 `ham_head.py`): multi-level features squeezed, a "Hamburger"
whose ham is non-negative matrix factorisation (NMF2D), then a classifier. NHWC; names mirror the reference."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from segnext_jax.models.layers import Conv2d, Dropout2d, DType, GroupNorm, resize_bilinear

_HIGHEST = jax.lax.Precision.HIGHEST
NMF_EPS = 1e-6
NMF_BASES = ("random", "fixed")  # the `nmf_bases` options of NMF2D (and of models.create)


class NMFBases(nnx.Variable):
    """The stored NMF bases (S, D, R) of a model built with `nmf_bases='fixed'`: model state that checkpoints save and
    restore, but not an `nnx.Param`, so it gets no gradient, no optimiser update and no place in a state_dict."""


def draw_nmf_bases(key: jax.Array, batch: int, dim: int, rank: int, num_splits: int = 1) -> jax.Array:
    """The reference's random bases: uniform [0, 1) of shape (batch * S, D, R), each column L2-normalised over D."""
    bases = jax.random.uniform(key, (batch * num_splits, dim, rank), jnp.float32)
    norm = jnp.sqrt(jnp.sum(jnp.square(bases), axis=1, keepdims=True))
    return bases / jnp.maximum(norm, 1e-12)


def _coef_from(numerator: jax.Array, bases: jax.Array, coef: jax.Array) -> jax.Array:
    """The coefficient update given its numerator x @ bases (B*S, N, R)."""
    gram = jnp.einsum("bdr,bds->brs", bases, bases, precision=_HIGHEST)
    denominator = jnp.einsum("bnr,brs->bns", coef, gram, precision=_HIGHEST)
    return coef * numerator / (denominator + NMF_EPS)


def _bases_from(numerator: jax.Array, bases: jax.Array, coef: jax.Array) -> jax.Array:
    """The bases update given its numerator x^T @ coef (B*S, D, R)."""
    gram = jnp.einsum("bnr,bns->brs", coef, coef, precision=_HIGHEST)
    denominator = jnp.einsum("bdr,brs->bds", bases, gram, precision=_HIGHEST)
    return bases * numerator / (denominator + NMF_EPS)


def _x_bases(x: jax.Array, bases: jax.Array) -> jax.Array:
    return jnp.einsum("bnd,bdr->bnr", x.astype(jnp.float32), bases, precision=_HIGHEST)


def _x_coef(x: jax.Array, coef: jax.Array) -> jax.Array:
    return jnp.einsum("bnd,bnr->bdr", x.astype(jnp.float32), coef, precision=_HIGHEST)


def _nmf_forward(x: jax.Array, bases: jax.Array, steps: int, inv_t: float):
    """The iterations, keeping what the backward pass needs: every bases, coef and numerator, all (N or D) x R."""
    coef = jax.nn.softmax(inv_t * _x_bases(x, bases), axis=-1)
    all_bases, coefs, coef_numerators, bases_numerators = [bases], [coef], [], []
    for step in range(steps + 1):  # `steps` (coef, bases) updates, then the final coef update
        coef_numerators.append(_x_bases(x, bases))
        coef = _coef_from(coef_numerators[-1], bases, coef)
        coefs.append(coef)
        if step < steps:
            bases_numerators.append(_x_coef(x, coef))
            bases = _bases_from(bases_numerators[-1], bases, coef)
            all_bases.append(bases)
    y = jnp.einsum("bdr,bnr->bnd", bases, coef, precision=_HIGHEST)
    return y, (all_bases, coefs, coef_numerators, bases_numerators)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _nmf(x: jax.Array, bases: jax.Array, steps: int, inv_t: float, one_step_grad: bool) -> jax.Array:
    return _nmf_forward(x, bases, steps, inv_t)[0]


def _nmf_fwd(x, bases, steps, inv_t, one_step_grad):
    y, saved = _nmf_forward(x, bases, steps, inv_t)
    return y, (x, saved)


def _nmf_bwd(steps, inv_t, one_step_grad, residuals, dy):
    """Reverse-mode through the iterations. x enters every numerator; its gradient is the sum of one (N, R) x (R, D)
    product per numerator, computed at the end as a single matmul over the concatenated R axes instead of an (N, D)
    accumulation per iteration (measured: benchmarks/README.md)."""
    x, (all_bases, coefs, coef_numerators, bases_numerators) = residuals
    dy = dy.astype(jnp.float32)
    left, right = [], []  # dx = sum_i left_i @ right_i^T

    def through_numerator_of_coef(d_coef, t):  # coef t+1 = _coef_from(x @ bases t, bases t, coef t)
        _, vjp = jax.vjp(_coef_from, coef_numerators[t], all_bases[t], coefs[t])
        d_numerator, d_bases, d_coef = vjp(d_coef)
        left.append(d_numerator)
        right.append(all_bases[t])
        return d_bases + _x_coef(x, d_numerator), d_coef

    bases, coef = all_bases[-1], coefs[-1]
    d_coef = jnp.einsum("bnd,bdr->bnr", dy, bases, precision=_HIGHEST)
    d_bases = jnp.einsum("bnd,bnr->bdr", dy, coef, precision=_HIGHEST)
    d_bases_from_coef, d_coef = through_numerator_of_coef(d_coef, steps)
    if one_step_grad:  # bases and coef were constants for the final coef update
        d_bases = jnp.zeros_like(all_bases[0])
    else:
        d_bases = d_bases + d_bases_from_coef
        for t in reversed(range(steps)):  # bases t+1 = _bases_from(x^T @ coef t+1, bases t, coef t+1)
            _, vjp = jax.vjp(_bases_from, bases_numerators[t], all_bases[t], coefs[t + 1])
            d_numerator, d_bases, d_coef_add = vjp(d_bases)
            left.append(coefs[t + 1])
            right.append(d_numerator)
            d_coef = d_coef + d_coef_add + _x_bases(x, d_numerator)
            d_bases_from_coef, d_coef = through_numerator_of_coef(d_coef, t)
            d_bases = d_bases + d_bases_from_coef
        c0 = coefs[0]  # softmax(inv_t * x @ bases 0)
        d_logits = inv_t * c0 * (d_coef - jnp.sum(d_coef * c0, axis=-1, keepdims=True))
        left.append(d_logits)
        right.append(all_bases[0])
        d_bases = d_bases + _x_coef(x, d_logits)
    # kept apart from their producers: fused into them, the concatenation became in-place updates of the whole
    # (N, K) buffer, each one read and written in full
    left, right = jax.lax.optimization_barrier((left, right))
    dx = jnp.einsum("bnk,bdk->bnd", jnp.concatenate(left, axis=-1), jnp.concatenate(right, axis=-1), precision=_HIGHEST)
    return dx.astype(x.dtype), d_bases


_nmf.defvjp(_nmf_fwd, _nmf_bwd)


def nmf2d(x: jax.Array, bases: jax.Array, steps: int, *, inv_t: float = 1.0, one_step_grad: bool = False) -> jax.Array:
    """NMF2D.forward on `x` >= 0 with initial `bases` (B*S, D, R); returns (bases @ coef^T)^T in float32.

    `x` is the transpose (B*S, N, D) of the reference's (B*S, D, N), the layout of NHWC features (no transposes,
    which XLA:CPU runs slowly in the backward pass), and so is the result; any float dtype, read as float32.
    Multiplicative updates: coef = softmax(inv_t * x @ bases), `steps` (coef, bases) updates, one final coef update.
    The reference back-propagates through every iteration; `one_step_grad` stops the gradient before the final
    coef update instead (HamNet / JSeg).
    """
    return _nmf(x, bases.astype(jnp.float32), steps, inv_t, one_step_grad)


class NMF2D(nnx.Module):
    """Matrix decomposition of a (B, H, W, C) feature map, by default with fresh random bases per call and per image.

    `inv_t` is 1: the reference's constructor overrides the configured 100. 6 iterations in training, 7 in
    evaluation (`deterministic`, set by `model.eval()`). Computed in float32 whatever the model's dtype.

    `bases='fixed'` instead draws one set of bases (S, D, R) when the module is built (from `jax.random.key(seed)`, or
    from the 'nmf' stream of `rngs` without a seed) and keeps it as an `NMFBases` variable: every image of every call
    starts from it, in training and evaluation, so the output is deterministic. `channels` (C) is then required.
    """

    def __init__(
        self,
        rank: int,
        *,
        num_splits: int = 1,
        train_steps: int = 6,
        eval_steps: int = 7,
        one_step_grad: bool = False,
        bases: str = "random",
        channels: int | None = None,
        seed: int | None = None,
        rngs: nnx.Rngs | None = None,
    ):
        if bases not in NMF_BASES:
            raise ValueError(f"nmf_bases={bases!r}: choose one of {', '.join(NMF_BASES)}")
        self.rank = rank
        self.num_splits = num_splits
        self.train_steps = train_steps
        self.eval_steps = eval_steps
        self.one_step_grad = one_step_grad
        self.inv_t = 1.0
        self.deterministic = False
        stream = rngs["nmf"].fork() if rngs is not None else None
        self.rngs = stream if stream is not None else nnx.data(None)
        fixed = None
        if bases == "fixed":
            if channels is None or channels % num_splits:
                raise ValueError(f"nmf_bases='fixed' needs the channels, a multiple of {num_splits}; got {channels}")
            if seed is None and stream is None:
                raise ValueError("nmf_bases='fixed' draws its bases from nmf_seed= or from rngs=: give one")
            key = jax.random.key(seed) if seed is not None else stream()
            fixed = NMFBases(draw_nmf_bases(key, 1, channels // num_splits, rank, num_splits))
        self.fixed_bases = fixed if fixed is not None else nnx.data(None)

    def repeated_bases(self, batch: int) -> jax.Array | None:
        """The stored bases repeated for `batch` images, (batch * S, D, R); None without stored bases."""
        if self.fixed_bases is None:
            return None
        bases = self.fixed_bases[...]
        return jnp.broadcast_to(bases[None], (batch, *bases.shape)).reshape(batch * bases.shape[0], *bases.shape[1:])

    def __call__(self, x: jax.Array, *, bases: jax.Array | None = None, rngs: nnx.Rngs | None = None) -> jax.Array:
        b, h, w, c = x.shape
        s = self.num_splits
        d = c // s
        # NHWC (B, H, W, S*D) -> (B*S, N, D), N = H*W in row-major order: the reference's (B*S, D, N) transposed.
        x_nd = x.reshape(b, h * w, s, d).transpose(0, 2, 1, 3).reshape(b * s, h * w, d)
        if bases is None and self.fixed_bases is not None:
            bases = self.repeated_bases(b)
        elif bases is None:
            if rngs is not None:
                key = rngs["nmf"]()
            elif self.rngs is not None:
                key = self.rngs()
            else:
                raise ValueError("NMF2D needs random bases: build the model with rngs=, or pass rngs= or nmf_bases=")
            bases = draw_nmf_bases(key, b, d, self.rank, s)
        elif bases.shape != (b * s, d, self.rank):
            raise ValueError(f"nmf_bases must have shape {(b * s, d, self.rank)} (batch*S, D, R); got {bases.shape}")
        steps = self.eval_steps if self.deterministic else self.train_steps
        y = nmf2d(x_nd, bases, steps, inv_t=self.inv_t, one_step_grad=self.one_step_grad)
        y = y.reshape(b, s, h * w, d).transpose(0, 2, 1, 3).reshape(b, h, w, c)
        return y.astype(x.dtype)


class ConvModule(nnx.Module):
    """mmcv ConvModule as the head uses it: 1x1 conv (bias only without a norm), optional GroupNorm(32), ReLU."""

    def __init__(self, in_channels: int, out_channels: int, *, norm: bool, relu: bool, dtype: DType, rngs: nnx.Rngs):
        self.conv = Conv2d(in_channels, out_channels, 1, use_bias=not norm, dtype=dtype, rngs=rngs)
        self.gn = GroupNorm(32, out_channels) if norm else None
        self.relu = relu

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv(x)
        if self.gn is not None:
            x = self.gn(x)
        return jax.nn.relu(x) if self.relu else x


class Hamburger(nnx.Module):
    """relu(x + ham_out(NMF(relu(ham_in(x)))))."""

    def __init__(
        self,
        channels: int,
        rank: int,
        *,
        one_step_grad: bool,
        dtype: DType,
        rngs: nnx.Rngs,
        nmf_bases: str = "random",
        nmf_seed: int | None = None,
    ):
        self.ham_in = ConvModule(channels, channels, norm=False, relu=False, dtype=dtype, rngs=rngs)
        self.ham = NMF2D(
            rank, one_step_grad=one_step_grad, bases=nmf_bases, channels=channels, seed=nmf_seed, rngs=rngs
        )
        self.ham_out = ConvModule(channels, channels, norm=True, relu=False, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, *, bases: jax.Array | None = None, rngs: nnx.Rngs | None = None) -> jax.Array:
        enjoy = jax.nn.relu(self.ham_in(x))
        enjoy = self.ham(enjoy, bases=bases, rngs=rngs)
        enjoy = self.ham_out(enjoy)
        return jax.nn.relu(x + enjoy)


class LightHamHead(nnx.Module):
    """Stage 2-4 features, resized to stage 2's size and concatenated -> squeeze -> Hamburger -> align ->
    Dropout2d -> conv_seg. Logits at stride 8."""

    def __init__(
        self,
        in_channels: tuple[int, ...],
        channels: int,
        num_classes: int,
        *,
        rank: int,
        dropout_ratio: float = 0.1,
        one_step_grad: bool = False,
        nmf_bases: str = "random",
        nmf_seed: int | None = None,
        dtype: DType = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.in_index = (1, 2, 3)
        self.dtype = dtype
        self.squeeze = ConvModule(sum(in_channels), channels, norm=True, relu=True, dtype=dtype, rngs=rngs)
        self.hamburger = Hamburger(
            channels,
            rank,
            one_step_grad=one_step_grad,
            dtype=dtype,
            rngs=rngs,
            nmf_bases=nmf_bases,
            nmf_seed=nmf_seed,
        )
        self.align = ConvModule(channels, channels, norm=True, relu=True, dtype=dtype, rngs=rngs)
        self.dropout = Dropout2d(dropout_ratio, rngs=rngs)
        self.conv_seg = Conv2d(channels, num_classes, 1, init_std=0.01, dtype=dtype, rngs=rngs)

    def __call__(
        self, features: list[jax.Array], *, nmf_bases: jax.Array | None = None, rngs: nnx.Rngs | None = None
    ) -> jax.Array:
        inputs = [features[i] for i in self.in_index]
        size = inputs[0].shape[1:3]
        x = jnp.concatenate([resize_bilinear(level, size) for level in inputs], axis=-1)
        x = self.squeeze(x)
        x = self.hamburger(x, bases=nmf_bases, rngs=rngs)
        x = self.align(x)
        x = self.dropout(x, rngs=rngs)
        return self.conv_seg(x).astype(jnp.float32)
