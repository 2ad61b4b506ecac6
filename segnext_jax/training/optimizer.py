"""AdamW with MMSegmentation's per-parameter lr and weight-decay multipliers, as the SegNeXt configs set them.

The groups follow mmengine's `DefaultOptimWrapperConstructor` with `paramwise_cfg.custom_keys`: the keys are
tried longest first (ties alphabetically), each as a substring of the full dotted parameter name, and the
first that matches gives the parameter its `lr_mult` and `decay_mult` (default 1). Names are matched in the
reference's spelling (`segnext_jax.models.naming`: our leaf `kernel` / `scale` is the reference's `weight`), so
custom_keys written for mmseg configs carry over unchanged. With the SegNeXt keys every `decode_head.*` parameter
gets lr x10, names containing `norm` get no weight decay, and the stem BatchNorms
(`backbone.patch_embed1.proj.1/4`) and the layer scales keep it.

Decay is decoupled as in torch's AdamW: `p -= lr * lr_mult * weight_decay * decay_mult * p`, with the
scheduled learning rate. No gradient clipping. Usage with an NNX model:

    tx = make_optimizer(nnx.state(model, nnx.Param), schedule=make_schedule(160000))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    grads = nnx.grad(loss_fn)(model)        # or nnx.value_and_grad, same `wrt` (nnx.Param, the default)
    optimizer.update(model, grads)
"""

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import jax
import optax

from segnext_jax.models.naming import dotted_name, reference_name

SEGNEXT_CUSTOM_KEYS: Mapping[str, Mapping[str, float]] = MappingProxyType(
    {
        "pos_block": MappingProxyType({"decay_mult": 0.0}),
        "norm": MappingProxyType({"decay_mult": 0.0}),
        "head": MappingProxyType({"lr_mult": 10.0}),
    }
)


def multipliers(name: str, custom_keys: Mapping[str, Mapping[str, float]]) -> tuple[float, float]:
    """(lr_mult, decay_mult) of one reference-spelled parameter name under mmengine's custom_keys rule."""
    for key in sorted(sorted(custom_keys), key=len, reverse=True):
        if key in name:
            options = custom_keys[key]
            return float(options.get("lr_mult", 1.0)), float(options.get("decay_mult", 1.0))
    return 1.0, 1.0


def param_groups(
    params_state: Any, custom_keys: Mapping[str, Mapping[str, float]] = SEGNEXT_CUSTOM_KEYS
) -> dict[str, tuple[float, float]]:
    """{dotted parameter name: (lr_mult, decay_mult)} for `nnx.state(model, nnx.Param)` (or its pure arrays)."""
    names = [dotted_name(path) for path, _ in jax.tree_util.tree_leaves_with_path(params_state)]
    return {name: multipliers(reference_name(name), custom_keys) for name in names}


def _group_label(lr_mult: float, decay_mult: float) -> str:
    return f"lr_mult={lr_mult},decay_mult={decay_mult}"


def make_optimizer(
    params_state: Any,
    *,
    schedule: optax.Schedule,
    lr: float = 6e-5,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    custom_keys: Mapping[str, Mapping[str, float]] = SEGNEXT_CUSTOM_KEYS,
    accumulation_steps: int = 1,
) -> optax.GradientTransformation:
    """AdamW whose group g uses lr * lr_mult_g * schedule(step) and weight decay weight_decay * decay_mult_g.

    `params_state` (the parameters the optimiser will update) decides which groups exist; the transform labels
    any tree of the same parameters (nnx.State with Variables, or pure arrays) by name. With
    `accumulation_steps` k > 1 the gradients of k consecutive calls are averaged and applied once (optax
    MultiSteps) and the schedule counts applied updates, so k micro-batches of B/k images replay a reference run
    with batch B (mmengine's `accumulative_counts` instead steps its schedulers every micro-batch).
    """
    if accumulation_steps < 1:
        raise ValueError(f"accumulation_steps={accumulation_steps} must be >= 1")

    def labels(tree: Any) -> Any:
        return jax.tree_util.tree_map_with_path(
            lambda path, _: _group_label(*multipliers(reference_name(dotted_name(path)), custom_keys)), tree
        )

    def adamw(lr_mult: float, decay_mult: float) -> optax.GradientTransformation:
        return optax.adamw(
            learning_rate=lambda step: lr * lr_mult * schedule(step),
            b1=betas[0],
            b2=betas[1],
            eps=eps,
            weight_decay=weight_decay * decay_mult,
        )

    groups = set(param_groups(params_state, custom_keys).values())
    tx = optax.multi_transform({_group_label(*group): adamw(*group) for group in groups}, labels)
    if accumulation_steps == 1:
        return tx
    # the accumulator in the default float dtype (float32; float64 under x64), not optax's fixed float32
    return optax.MultiSteps(tx, every_k_schedule=accumulation_steps, accumulator_dtype=float).gradient_transformation()
