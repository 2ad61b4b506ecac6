"""Learning-rate schedules of the SegNeXt recipe, as optax schedules.

A schedule maps the optimiser step (0-based: the number of updates already applied) to a factor of the
base learning rate; `make_optimizer` multiplies it by the base lr and each group's lr multiplier.

- `form='mmseg'` (MMSegmentation 1.x's SegNeXt configs, the default): mmengine's `LinearLR(start_factor=warmup_ratio,
  begin=0, end=warmup_iters)` then `PolyLR(power, begin=warmup_iters, end=max_iters, eta_min=0)`. mmengine applies
  both recursively (one multiplicative step per iteration); their products telescope to the closed form
  used here: warm-up reaches 1 at step `warmup_iters - 1` (mmengine's `total_iters = end - begin - 1`),
  and the poly phase reaches 0 at step `max_iters - 1`.
- `form='official'` (the official repository's MMSegmentation 0.x runner: mmcv 1.x's `PolyLrUpdaterHook` with linear
  warm-up, mmcv/runner/hooks/lr_updater.py): poly over the whole run, `(1 - step / max_iters) ** power`, multiplied
  during warm-up by `1 - (1 - step / warmup_iters) * (1 - ratio)`.
"""

import jax.numpy as jnp
import optax

FORMS = ("mmseg", "official")


def make_schedule(
    max_iters: int,
    *,
    warmup_iters: int = 1500,
    warmup_ratio: float = 1e-6,
    power: float = 1.0,
    form: str = "mmseg",
) -> optax.Schedule:
    """Returns `step -> lr factor` for linear warm-up from `warmup_ratio` then poly decay to 0."""
    if form not in FORMS:
        raise ValueError(f"schedule form {form!r} is unknown: use one of {FORMS}")
    if not 0.0 < warmup_ratio <= 1.0:
        raise ValueError(f"warmup_ratio={warmup_ratio} must be in (0, 1]")
    if form == "mmseg" and (warmup_iters == 1 or max_iters < warmup_iters + 2):
        raise ValueError(
            f"warmup_iters={warmup_iters}, max_iters={max_iters}: mmseg's schedule needs warmup_iters 0 or >= 2 "
            "and max_iters >= warmup_iters + 2"
        )
    if form == "official" and (warmup_iters < 1 or max_iters < warmup_iters):
        raise ValueError(f"warmup_iters={warmup_iters}, max_iters={max_iters}: need 1 <= warmup_iters <= max_iters")

    def mmseg(step: jnp.ndarray) -> jnp.ndarray:
        step = jnp.asarray(step, dtype=float)  # optax's int32 count would otherwise divide to float32 under x64
        warm = warmup_ratio + (1.0 - warmup_ratio) * step / max(warmup_iters - 1, 1)
        poly_iters = max_iters - warmup_iters - 1
        done = jnp.clip(step - warmup_iters, 0, poly_iters)
        poly = ((poly_iters - done) / poly_iters) ** power  # not 1 - done / n: that cancels near the end
        return jnp.where(step < warmup_iters, warm, poly)

    def official(step: jnp.ndarray) -> jnp.ndarray:
        step = jnp.asarray(step, dtype=float)
        poly = ((max_iters - jnp.minimum(step, max_iters)) / max_iters) ** power
        warm = 1.0 - (1.0 - step / warmup_iters) * (1.0 - warmup_ratio)
        return jnp.where(step < warmup_iters, poly * warm, poly)

    return mmseg if form == "mmseg" else official
