"""The learning-rate schedule against mmengine's LinearLR + PolyLR run as the reference config defines them."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from reference_segnext import build_schedulers, segnext_config

from segnext_jax.training.schedule import make_schedule

BASE_LRS = (6e-5, 6e-4)  # a backbone and a head (lr x10) group


@pytest.fixture(scope="module")
def config():
    return segnext_config()


def mmengine_lrs(config, warmup_iters: int, max_iters: int, steps: int) -> np.ndarray:
    """(steps, 2): the lr each group trains iteration i with, stepping the schedulers after each iteration."""
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in BASE_LRS]
    optimizer = torch.optim.AdamW(groups, lr=BASE_LRS[0])
    schedulers = build_schedulers(optimizer, config.param_scheduler, warmup_iters, max_iters)
    lrs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": no training happens here
        for _ in range(steps):
            lrs.append([group["lr"] for group in optimizer.param_groups])
            for scheduler in schedulers:
                scheduler.step()
    return np.array(lrs)


@pytest.mark.parametrize("warmup_iters, max_iters", [(15, 100), (1500, 160000)])
def test_mmseg_schedule_equals_mmengine_every_iteration(config, warmup_iters, max_iters):
    steps = max_iters + 5  # past the end the lr stays 0
    reference = mmengine_lrs(config, warmup_iters, max_iters, steps)
    with jax.enable_x64(True):
        factors = np.asarray(make_schedule(max_iters, warmup_iters=warmup_iters)(jnp.arange(steps)))
    assert factors.dtype == np.float64
    ours = factors[:, None] * np.array(BASE_LRS)
    zero = reference == 0
    assert np.array_equal(zero, ours == 0)
    assert zero[:, 0].argmax() == max_iters - 1
    np.testing.assert_allclose(ours[~zero], reference[~zero], rtol=1e-12, atol=0)


def test_mmseg_schedule_float32_under_jit():
    schedule = jax.jit(make_schedule(160000))
    steps = jnp.array([0, 750, 1499, 1500, 80000, 159999], dtype=jnp.int32)
    with jax.enable_x64(True):
        exact = np.asarray(make_schedule(160000)(np.asarray(steps, np.int64)))
    factors = schedule(steps)
    assert factors.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(factors), exact, rtol=1e-6)


def test_official_schedule_matches_hand_computed_values():
    # mmcv 1.x's PolyLrUpdaterHook with linear warm-up, computed by hand to 4 significant digits, base lr 6e-5
    steps = np.array([0, 750, 1500, 80000, 159999])
    expected = np.array([6e-11, 2.986e-5, 5.944e-5, 3.000e-5, 3.75e-10])
    with jax.enable_x64(True):
        ours = 6e-5 * np.asarray(make_schedule(160000, form="official")(jnp.asarray(steps)))
    np.testing.assert_allclose(ours, expected, rtol=2e-4)


@pytest.mark.parametrize(
    "kwargs", [{"form": "cosine"}, {"warmup_iters": 1}, {"warmup_ratio": 0.0}, {"max_iters": 1501}]
)
def test_bad_schedule_arguments_are_refused(kwargs):
    with pytest.raises(ValueError):
        make_schedule(**{"max_iters": 160000, **kwargs})
