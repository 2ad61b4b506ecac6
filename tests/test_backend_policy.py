"""The backend policy (segnext_jax.backend): CPU keeps its native kernels, inlined stages and fusion barrier; a
program traced for TPU or GPU carries no call to this package's CPU kernels, whatever host traces it."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from segnext_jax import aot, backend, models
from segnext_jax.kernels import depthwise
from segnext_jax.models import depthwise as depthwise_models
from segnext_jax.training import loss

# calls of this package's FFI targets (all named segnext_*), or the custom_partitioning wrapper around them
CPU_KERNEL_CALL = re.compile(r"custom_call @(segnext_\w+|CustomSPMDPartitioning)|custom_call_target=\"segnext_")
TINY = models.Variant((16, 16, 32, 32), (1, 2, 1, 1), 0.1, 32, 4)  # stage 2 of two blocks: inlined or scanned


def test_cpu_policy_keeps_the_native_kernels_and_inlined_stages():
    policy = backend.policy_for("cpu")
    assert policy == backend.Policy("cpu", "native", "native", fusion_barrier=True, max_inlined_blocks=12)
    assert backend.current() == policy  # outside any `use`: the default backend, the CPU here
    assert depthwise_models.resolve_impl("auto") == "native"
    assert depthwise_models.resolve_impl("auto", jnp.bfloat16) == "shift_add"  # the kernels compute float32 only
    assert loss.resolve_impl("auto") == "native"
    assert not policy.scans(12) and policy.scans(13)


ACCELERATORS = {
    "gpu": backend.Policy("gpu", "xla", "xla", fusion_barrier=False, max_inlined_blocks=1),
    "tpu": backend.Policy(
        "tpu", "shift_add", "xla", fusion_barrier=False, max_inlined_blocks=1, remat_blocks=True, fold_stem=True
    ),
}


@pytest.mark.parametrize("name, platform", [("tpu", "tpu"), ("gpu", "gpu"), ("cuda", "gpu"), ("rocm", "gpu")])
def test_accelerators_take_xla_and_scan_every_deep_stage(name, platform):
    """GPU: XLA's grouped convolution; TPU: shift-add (XLA:TPU unfolds the input per tap for a grouped convolution's
    weight gradient) and recomputed blocks. Both: XLA's loss, every stage of several blocks scanned."""
    policy = backend.policy_for(name)
    assert policy == ACCELERATORS[platform]
    with backend.use(name):
        assert backend.current() == policy
        assert depthwise_models.resolve_impl("auto", jnp.bfloat16) == policy.depthwise_impl
        assert depthwise_models.resolve_impl("shift_add") == "shift_add"  # explicit choices are kept
        assert loss.resolve_impl("auto") == "xla" and loss.resolve_impl("native") == "native"
    assert backend.current().platform == "cpu"


def test_targets_name_their_platform():
    mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])
    assert backend.platform_of(mesh) == backend.platform_of(jax.devices()[0]) == backend.platform_of(None) == "cpu"
    policy = backend.policy_for("tpu")
    assert backend.policy_for(policy) is policy
    with pytest.raises(ValueError, match="no backend policy for platform 'metal'"):
        backend.policy_for("metal")


def _depthwise_program(x, kernel):
    return depthwise_models.depthwise_conv(x, kernel, (1, 1), "auto", gelu=True)


def test_one_jitted_function_follows_each_policy_it_is_traced_under():
    """`use` is part of JAX's trace context: no program traced for one target is reused for another."""
    program = jax.jit(_depthwise_program)
    args = (jnp.ones((1, 6, 6, 8)), jnp.ones((3, 3, 1, 8)))
    assert depthwise.FORWARD in program.lower(*args).as_text()
    with backend.use("tpu"):
        assert depthwise.FORWARD not in program.lower(*args).as_text()
        tpu_result = program(*args)  # runs here too: XLA's grouped convolution on the CPU
    np.testing.assert_allclose(np.asarray(program(*args)), np.asarray(tpu_result), rtol=1e-5, atol=1e-6)


def test_policy_picks_inlined_or_scanned_stages():
    model = models.create(TINY, 3, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    images = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)

    def forward(state, images):
        return nnx.merge(graphdef, state)(images, rngs=nnx.Rngs(1))

    loops = {}
    for target in ("cpu", "tpu"):
        with backend.use(target):
            loops[target] = jax.jit(forward).lower(state, images).as_text().count("stablehlo.while")
    assert loops["tpu"] == loops["cpu"] + 1  # stage 2's scan (the other loops draw random numbers)


def test_tpu_recomputes_scanned_blocks_in_the_backward_pass():
    """Under the TPU policy a scanned stage's block is a `jax.checkpoint` (the gradient recomputes its activations,
    not stores them per block); under the GPU policy, and with remat_blocks off, it is not."""
    model = models.create(TINY, 3, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = nnx.as_pure(params), nnx.as_pure(rest)  # arrays, not the model's Variables
    images = jnp.ones((1, 32, 32, 3))

    def loss(params, rest):
        return nnx.merge(graphdef, params, rest)(images, rngs=nnx.Rngs(1)).sum()

    def checkpoints(target) -> int:
        with backend.use(target):
            return str(jax.make_jaxpr(loss)(params, rest)).count("remat2[")  # jax.checkpoint's primitive

    assert checkpoints("tpu") == 1  # stage 2, the only stage of several blocks
    assert checkpoints("gpu") == checkpoints(dataclasses.replace(ACCELERATORS["tpu"], remat_blocks=False)) == 0


def _tiny_config() -> ml_collections.ConfigDict:
    """The keys that compiling the training step reads, with TINY spelled out as config.model.variant."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.model = {"variant": dataclasses.asdict(TINY), "num_classes": 5, "dtype": "float32", "depthwise_impl": "auto"}
    config.optimizer = {
        "lr": 6e-5, "b1": 0.9, "b2": 0.999, "eps": 1e-8, "weight_decay": 0.01, "head_lr_mult": 10.0,
        "warmup_steps": 2, "warmup_ratio": 1e-6, "power": 1.0, "min_lr": 0.0, "schedule": "mmseg",
    }  # fmt: skip
    config.train = {"num_steps": 10, "grad_accum_steps": 1, "global_batch_size": 2}
    return config


@pytest.mark.parametrize("target", ["tpu", "gpu"])
def test_programs_for_accelerators_have_no_cpu_kernel_calls(target):
    """The training step and the evaluation network call of a tiny model, lowered on this CPU host under the TPU or
    GPU policy, call none of the native CPU kernels (which an accelerator compiler rejects: 'Custom emitter for
    CustomSPMDPartitioning not found'); under the CPU policy they do."""
    config = _tiny_config()
    mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:2])
    programs = {
        "train": lambda target: aot.lower_train(config, mesh, 2, (32, 32), target=target).as_text(),
        "eval": lambda target: aot.lower_eval(config, mesh, 1, (32, 32), target=target).as_text(),
    }
    for name, lower in programs.items():
        assert not CPU_KERNEL_CALL.search(lower(target)), name
        assert CPU_KERNEL_CALL.search(lower("cpu")), name


def test_policy_replaced_in_a_test_changes_only_that_choice():
    policy = dataclasses.replace(backend.policy_for("cpu"), max_inlined_blocks=0)
    with backend.use(policy):
        assert backend.current().scans(2) and backend.current().depthwise_impl == "native"
