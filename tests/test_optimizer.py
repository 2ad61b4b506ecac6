"""Parameter groups and AdamW steps against mmengine's optimizer constructor and torch's AdamW, both built from
the reference config (its optim_wrapper and param_scheduler)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from reference_segnext import build, build_optimizer, build_schedulers, segnext_config

from segnext_jax import models
from segnext_jax.training.optimizer import make_optimizer, param_groups
from segnext_jax.training.schedule import make_schedule

WARMUP_ITERS, MAX_ITERS = 3, 9
# names from every group of the reference rule, and names that test its precedence ('pos_block' is the longest key;
# 'head' sorts before 'norm', so a head parameter named norm keeps its weight decay)
SHAPES = {
    "backbone.patch_embed1.proj.0.weight": (4, 3, 3, 2),
    "backbone.patch_embed1.proj.1.weight": (4,),  # stem BatchNorm: decays
    "backbone.block1.0.norm1.weight": (6,),
    "backbone.block1.0.layer_scale_1": (6,),  # decays
    "backbone.norm1.bias": (8,),
    "backbone.pos_block.norm.weight": (2, 8),
    "decode_head.conv_seg.bias": (5,),
    "decode_head.align.gn.weight": (7,),
    "decode_head.norm.weight": (7,),
}


def reference_key(path) -> str:
    """Our parameter path in the reference's state_dict spelling (the models' naming rule)."""
    *parents, leaf = map(str, path)
    return ".".join([*parents, {"kernel": "weight", "scale": "weight"}.get(leaf, leaf)])


@pytest.fixture(scope="module")
def config():
    return segnext_config()


def torch_groups(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, tuple[float, float]]:
    names = {id(param): name for name, param in model.named_parameters()}
    return {names[id(p)]: (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}


def test_param_groups_equal_mmengine(config):
    torch_model = build(config.model)
    reference = torch_groups(torch_model, build_optimizer(torch_model, config.optim_wrapper))
    assert len(set(reference.values())) == 3  # lr x10 head, no-decay norms, the rest

    model = nnx.eval_shape(lambda: models.create("t", num_classes=150, rngs=nnx.Rngs(0)))
    base_lr, base_wd = config.optim_wrapper.optimizer.lr, config.optim_wrapper.optimizer.weight_decay
    ours = {
        reference_key(name.split(".")): (base_lr * lr_mult, base_wd * decay_mult)
        for name, (lr_mult, decay_mult) in param_groups(nnx.state(model, nnx.Param)).items()
    }
    assert sorted(ours) == sorted(reference)
    assert {name: ours[name] for name in reference if ours[name] != reference[name]} == {}


class Node(nnx.Module):
    """An NNX module holding `children` as attributes."""

    def __init__(self, **children):
        for name, child in children.items():
            setattr(self, name, child)


def nested(arrays: dict[str, np.ndarray]) -> dict:
    """{'a.b.c': x} -> {'a': {'b': {'c': x}}}."""
    tree = {}
    for name, value in arrays.items():
        *parents, leaf = name.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def nnx_model(tree: dict) -> Node:
    return Node(**{k: nnx_model(v) if isinstance(v, dict) else nnx.Param(jnp.asarray(v)) for k, v in tree.items()})


def torch_model(tree: dict) -> torch.nn.Module:
    module = torch.nn.Module()
    for name, child in tree.items():
        if isinstance(child, dict):
            module.add_module(name, torch_model(child))
        else:
            module.register_parameter(name, torch.nn.Parameter(torch.from_numpy(child.copy())))
    return module


def param_arrays(model) -> dict[str, np.ndarray]:
    return {".".join(path): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@nnx.jit
def apply_grads(model, optimizer, grads):
    optimizer.update(model, grads)


@pytest.mark.parametrize("accumulation_steps", [1, 2])
def test_adamw_steps_equal_torch(config, accumulation_steps):
    """Steps over the whole schedule (warm-up, poly, final lr 0) equal mmengine's AdamW groups + schedulers, in
    float64; with accumulation, the micro-batch gradients' mean is applied once per reference iteration."""
    rng = np.random.default_rng(0)

    def draw() -> dict[str, np.ndarray]:
        return {name: rng.standard_normal(shape) for name, shape in SHAPES.items()}

    initial = draw()
    reference = torch_model(nested(initial))
    torch_optimizer = build_optimizer(reference, config.optim_wrapper)
    schedulers = build_schedulers(torch_optimizer, config.param_scheduler, WARMUP_ITERS, MAX_ITERS)
    with jax.enable_x64(True):
        model = nnx_model(nested(initial))
        tx = make_optimizer(
            nnx.state(model, nnx.Param),
            schedule=make_schedule(MAX_ITERS, warmup_iters=WARMUP_ITERS),
            accumulation_steps=accumulation_steps,
        )
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        for _ in range(MAX_ITERS):
            before = param_arrays(model)
            micro = [draw() for _ in range(accumulation_steps)]  # gradients of the micro-batches
            for grads in micro:
                apply_grads(model, optimizer, nnx.state(nnx_model(nested(grads)), nnx.Param))
            for name, param in reference.named_parameters():
                param.grad = torch.from_numpy(sum(grads[name] for grads in micro) / accumulation_steps)
            torch_optimizer.step()
            for scheduler in schedulers:
                scheduler.step()
            ours = param_arrays(model)
            for name, param in reference.named_parameters():
                np.testing.assert_allclose(
                    ours[name] - before[name],
                    param.detach().numpy() - before[name],
                    rtol=1e-9,
                    atol=1e-14,
                    err_msg=name,
                )
