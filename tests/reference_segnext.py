"""The reference's SegNeXt recipe as mmseg 1.2.2 ships it (`configs/segnext/*.py` inside the installed package),
and the mmseg / mmengine objects built from it, for the training-maths parity tests."""

import copy
import os

import torch
from oracle import import_mmseg


def segnext_config(variant: str = "t"):
    """The mmengine Config of `segnext_mscan-<variant>_1xb16-adamw-160k_ade20k-512x512.py`."""
    mmseg = import_mmseg()
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    init_default_scope("mmseg")
    name = f"segnext_mscan-{variant}_1xb16-adamw-160k_ade20k-512x512.py"
    return Config.fromfile(os.path.join(os.path.dirname(mmseg.__file__), ".mim", "configs", "segnext", name))


def build(module_cfg) -> torch.nn.Module:
    """A reference module (segmentor, head, ...) from its config dict, without loading pretrained weights."""
    from mmseg.registry import MODELS

    module_cfg = copy.deepcopy(module_cfg)
    if "backbone" in module_cfg:
        module_cfg.backbone.init_cfg = None
    return MODELS.build(module_cfg)


def build_optimizer(model: torch.nn.Module, optim_wrapper_cfg) -> torch.optim.Optimizer:
    """The torch optimizer mmengine's DefaultOptimWrapperConstructor builds for `model` from `optim_wrapper_cfg`.

    mmcv-lite has no deformable convs, so mmengine's probe for them is answered False (its own probe trips on the
    oracle's `mmcv._ext` stand-in, which has no module spec).
    """
    import mmengine.optim.optimizer.default_constructor as constructor
    from mmengine.optim import build_optim_wrapper

    probe = constructor.mmcv_full_available
    constructor.mmcv_full_available = lambda: False
    try:
        return build_optim_wrapper(model, copy.deepcopy(optim_wrapper_cfg)).optimizer
    finally:
        constructor.mmcv_full_available = probe


def build_schedulers(optimizer: torch.optim.Optimizer, scheduler_cfgs, warmup_iters: int, max_iters: int) -> list:
    """mmengine's LinearLR + PolyLR of the config on `optimizer`, their begin/end moved to warmup_iters/max_iters."""
    from mmengine.registry import PARAM_SCHEDULERS

    linear, poly = copy.deepcopy(scheduler_cfgs)
    assert (linear.type, poly.type) == ("LinearLR", "PolyLR")
    linear.update(begin=0, end=warmup_iters)
    poly.update(begin=warmup_iters, end=max_iters)
    return [PARAM_SCHEDULERS.build(dict(cfg, optimizer=optimizer)) for cfg in (linear, poly)]
