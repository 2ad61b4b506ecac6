"""Ahead-of-time compilation for Cloud TPU (segnext_jax.aot): the abstract state, the loop correction's parts, and
with libtpu installed (pip install -e '.[tpu]') a real compilation of a small model for a v5e:2x2 slice."""

import dataclasses
import json
import os
import runpy

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from segnext_jax import aot, backend, configuration, models
from segnext_jax.training import train

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")
# one stage of two blocks (a scan on TPU, inlined on CPU), the others single: quick to compile
TINY = models.Variant((16, 16, 32, 32), (1, 2, 1, 1), 0.1, 32, 4)
REPORT_KEYS = {
    "program", "topology", "global_batch", "compile_seconds", "hbm_bytes_per_chip", "hbm_capacity_bytes",
    "flops_per_chip", "bytes_accessed_per_chip", "estimated_images_per_second_per_chip", "peak_flops_per_second",
    "hbm_bandwidth_bytes_per_second", "host_peak_rss_bytes", "hbm_breakdown_bytes", "policy",
}  # fmt: skip


@pytest.fixture
def tiny_config():
    config = configuration.make_config("ade20k", "t")
    config.model.variant = dataclasses.asdict(TINY)
    config.model.num_classes = 5
    config.init.pretrained = ""
    config.data.crop_size = (64, 64)
    config.data.test_scale = (128, 64)
    config.train.global_batch_size = 4
    return config


def _shapes(tree):
    return [(jax.tree_util.keystr(path), x.shape, x.dtype) for path, x in jax.tree_util.tree_leaves_with_path(tree)]


def test_abstract_train_state_is_init_states_shapes(tiny_config):
    mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:2])
    graphdef, abstract, optimizer = aot.abstract_train_state(tiny_config, mesh)
    real_graphdef, real, real_optimizer = train.init_state(tiny_config, mesh)
    assert graphdef == real_graphdef and optimizer == real_optimizer
    assert _shapes(abstract) == _shapes(real)
    assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(abstract))


def test_while_trip_counts_are_read_from_the_optimised_program():
    def program(x):
        for length in (3, 5):
            x = jax.lax.scan(lambda c, _: (jnp.sin(c) * 2, None), x, None, length=length)[0]
        return x

    text = jax.jit(program).lower(jnp.ones(4)).compile().as_text()
    assert sorted(aot.while_trip_counts(text)) == [3, 5]


def test_shapes_and_names():
    assert aot._stage_sizes((512, 512), 4) == [(128, 128), (64, 64), (32, 32), (16, 16)]
    assert aot._stage_sizes((100, 60), 2) == [(25, 15), (13, 8)]  # ceil at every stride-2 convolution
    assert aot.chip_of("v5e:2x2") is aot.CHIPS["v5e"] and aot.chip_of("V6E:4x4").hbm_bytes == 32 * 2**30
    with pytest.raises(aot.CompileError, match="unknown TPU generation 'v9'"):
        aot.chip_of("v9:2x2")
    assert aot.report_path("runs/x", "v5e:2x2", "train") == os.path.join("runs/x", "compile", "v5e:2x2_train.json")
    config = runpy.run_path(os.path.join(CONFIGS, "ade20k_t.py"))["get_config"]()
    assert aot.eval_input_size(config) == (512, 512)
    config = runpy.run_path(os.path.join(CONFIGS, "cityscapes_t.py"))["get_config"]()
    assert aot.eval_input_size(config) == (1024, 1024)  # sliding windows


def test_compiles_train_and_eval_for_a_v5e_slice_on_this_host(tiny_config, tmp_path):
    """The real TPU compiler, on this CPU-only host: a tiny model's training step (4 images of 64 x 64 over 4
    chips) and evaluation call; the report's figures are the compiler's, loop-corrected, and written as JSON."""
    train_report = aot.compile_report(tiny_config, "v5e:2x2", "train", str(tmp_path))
    with open(tmp_path / "compile" / "v5e:2x2_train.json") as file:
        assert json.load(file) == json.loads(json.dumps(train_report))
    eval_report = aot.compile_report(tiny_config, "v5e:2x2", "eval", str(tmp_path))
    assert (tmp_path / "compile" / "v5e:2x2_eval.json").exists()
    for report, program, chips in ((train_report, "train", 4), (eval_report, "eval", 1)):
        assert REPORT_KEYS <= set(report)
        assert report["program"] == program and report["topology"] == "v5e:2x2" and report["chips"] == chips
        assert report["policy"] == dict(platform="tpu", depthwise_impl="shift_add", loss_impl="xla",
                                        fusion_barrier=False, max_inlined_blocks=1, remat_blocks=True,
                                        fold_stem=True)  # fmt: skip
        largest = report["largest_operations"]  # where the bytes go, heaviest first, named by their JAX operation
        assert 0 < len(largest) <= 12 and sum(op["share"] for op in largest) <= 1
        assert [op["bytes"] for op in largest] == sorted((op["bytes"] for op in largest), reverse=True)
        assert any("jit(" in op["op_name"] for op in largest)
        assert 0 < report["hbm_bytes_per_chip"] < report["hbm_capacity_bytes"] == 16 * 2**30
        assert report["flops_per_chip"] > report["cost_analysis_uncorrected"]["flops"] > 0
        assert report["bytes_accessed_per_chip"] > report["cost_analysis_uncorrected"]["bytes accessed"] > 0
        assert [stage["stage"] for stage in report["scanned_stages"]] == [2]  # the one stage of two blocks
        assert report["loop_correction_matches_program"]
        assert report["estimated_images_per_second_per_chip"] > 0 and report["compile_seconds"] > 0
    assert train_report["global_batch"] == 4 and train_report["images_per_chip"] == 1
    assert eval_report["global_batch"] == 1 and eval_report["image_size"] == [64, 64]
    assert train_report["while_loop_trip_counts"] == [2, 2] and eval_report["while_loop_trip_counts"] == [2]
    assert backend.current().platform == "cpu"  # the policy was TPU's only while compiling


def test_topology_without_libtpu_says_what_to_install(monkeypatch):
    from jax.experimental import topologies

    def no_libtpu(**kwargs):
        raise RuntimeError("JAX TPU support not installed; cannot generate TPU topology.")

    monkeypatch.setattr(topologies, "get_topology_desc", no_libtpu)
    with pytest.raises(aot.CompileError, match=r"needs libtpu: pip install -e '\.\[tpu\]'"):
        aot.topology_mesh("v5e:2x2")


@pytest.mark.parametrize("accumulation, fits_up_to, expected", [(1, 11, 11), (2, 11, 10), (1, 0, 0), (1, 300, 256)])
def test_largest_batch_per_chip_doubles_then_bisects(tiny_config, monkeypatch, accumulation, fits_up_to, expected):
    tried = []

    def fits(config, topology, program, per_chip, image_size):
        tried.append(per_chip)
        return per_chip <= fits_up_to

    monkeypatch.setattr(aot, "_fits", fits)
    tiny_config.train.grad_accum_steps = accumulation
    assert aot.largest_batch_per_chip(tiny_config, "v5e:2x2", "train", start=4) == expected
    assert all(size % accumulation == 0 for size in tried) and len(tried) == len(set(tried)) <= 12


def test_abstract_model_allocates_nothing(tiny_config):
    model = aot.abstract_model(tiny_config)
    leaves = jax.tree.leaves(nnx.state(model))
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
