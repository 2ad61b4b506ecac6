"""segnext_jax.training.train: the sharded step equals the single-device step, resume is exact, two processes train.

A tiny SegNeXt (spelled out in config.model.variant) on 32 px crops of the built-in demo data keeps compilation short;
the jitted step is shared by every test of this module that uses the 8-device mesh (equal static arguments, the same
shapes).
"""

import dataclasses
import json
import os
import pathlib
import re
import runpy
import socket
import struct
import subprocess
import sys
import textwrap

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from segnext_jax import checkpoints, models, sharding
from segnext_jax.evaluation import evaluate
from segnext_jax.training import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = models.Variant((32, 32, 64, 64), (1, 1, 1, 1), 0.1, 64, 8)  # head channels: a multiple of GroupNorm's 32
NUM_STEPS = 4
ZERO_GRADIENT_BIAS = r"backbone\.patch_embed\d\.proj(\.[03])?\.bias\.value"
ITS_BATCHNORM_MEAN = r"backbone\.patch_embed\d\.(proj\.[14]|norm)\.mean\.value"


def tiny_config() -> ml_collections.ConfigDict:
    """configs/demo.py with the tiny variant, 32 px crops, 8 images per step (one per simulated device)."""
    config = runpy.run_path(os.path.join(REPO, "configs", "demo.py"))["get_config"]()
    config.model.variant = dataclasses.asdict(TINY)
    config.model.depthwise_impl = "native"  # the CPU default; sharded, each device runs its part of the batch
    config.model.drop_path_rate = 0.1  # random drop path and dropout: the step's RNG must resume exactly too
    config.model.dropout_ratio = 0.1
    config.data.crop_size = (32, 32)
    config.data.scale = (64, 32)
    config.data.test_scale = (64, 32)
    config.train.global_batch_size = 8
    config.train.num_steps = NUM_STEPS
    config.train.log_every = 1
    config.train.eval_every = NUM_STEPS
    config.train.checkpoint_every = 2
    config.train.sample_predictions = 2
    config.optimizer.warmup_steps = 2
    return config


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """A complete run: (workdir, its final validation results)."""
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    config = tiny_config()
    config.train.profile_steps = (2, 3)  # tracing changes nothing computed
    return workdir, train.train(config, workdir)


def _arrays(tree) -> dict[str, np.ndarray]:
    """{dotted path: leaf as a numpy array} of `tree` (PRNG keys as their raw bits)."""
    return {
        jax.tree_util.keystr(path, simple=True, separator="."): np.asarray(
            jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x
        )
        for path, x in jax.tree_util.tree_leaves_with_path(tree)
    }


def _model_leaves(workdir: str) -> dict[str, np.ndarray]:
    """Parameters, batch statistics and RNG streams of the latest checkpoint in `workdir`."""
    return _arrays(nnx.state(checkpoints.restore_model(workdir)))


def _assert_same_leaves(got: dict[str, np.ndarray], want: dict[str, np.ndarray], **tolerance) -> None:
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_allclose(got[name], want[name], err_msg=name, **tolerance)


def _events(directory: str) -> dict[str, list]:
    """TensorBoard summaries in `directory`: {tag: [(step, summary value)]} (TFRecord framing: length, crc, data,
    crc)."""
    from tensorboardX.proto import event_pb2

    found = {}
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name), "rb") as f:
            data = f.read()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            for value in event.summary.value:
                found.setdefault(value.tag, []).append((event.step, value))
            offset += 16 + length
    return found


def _first_moments(opt_state) -> list[np.ndarray]:
    """AdamW's first moments mu = (1 - b1) * gradient after a first step: the gradients, in a fixed order."""
    leaves = jax.tree_util.tree_leaves_with_path(opt_state)
    return [np.asarray(x) for path, x in leaves if ".mu" in jax.tree_util.keystr(path)]


def test_sharded_step_equals_single_device_step():
    """One step on 8 devices (batch split 1 per device, BatchNorm over the global batch) equals the same step with the
    whole batch on one device: loss, gradients (AdamW's first moments), BatchNorm running statistics and parameters.

    Tolerances: float32 reductions run in another order, so relative 1e-5 (loss, statistics), and for gradients an
    absolute 1e-5 of the largest gradient (relative errors of near-zero entries are meaningless)."""
    config = tiny_config()
    host_batch = next(iter(train.make_train_data(config)))
    results = []
    for mesh in (sharding.make_mesh(), sharding.make_mesh(1)):
        graphdef, state, optimizer = train.init_state(config, mesh)
        batch = sharding.global_batch(host_batch, mesh)
        assert batch["image"].sharding.num_devices == mesh.devices.size
        state, metrics = train.train_step(state, batch, 0, graphdef=graphdef, optimizer=optimizer, mesh=mesh)
        assert bool(metrics["finite"])
        assert all(leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(state))
        results.append((float(metrics["loss"]), state))
    (loss8, state8), (loss1, state1) = results
    assert loss8 == pytest.approx(loss1, rel=1e-5)
    stats8, stats1 = (_arrays(nnx.state(nnx.merge(graphdef, s["model"]), nnx.BatchStat)) for s in (state8, state1))
    assert len(stats8) == 2 * 13  # mean and var of 13 BatchNorms: 2 in the stem, 3 patch embeddings, 2 per block
    _assert_same_leaves(stats8, stats1, rtol=1e-5, atol=1e-6)
    grads8, grads1 = _first_moments(state8["opt_state"]), _first_moments(state1["opt_state"])
    assert len(grads8) == len(jax.tree.leaves(nnx.state(nnx.merge(graphdef, state1["model"]), nnx.Param)))
    scale = max(np.abs(g).max() for g in grads1)
    assert scale > 0
    for got, want in zip(grads8, grads1):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * scale)
    _assert_same_leaves(_arrays(state8["model"]), _arrays(state1["model"]), rtol=1e-5, atol=1e-6)  # after the step


def test_a_non_finite_step_leaves_the_state_as_it_was():
    """A NaN pixel makes the loss and every gradient NaN: the step reports it and changes no parameter, statistic or
    optimiser moment (the host then stops or skips, config.train.on_nonfinite)."""
    config = tiny_config()
    mesh = sharding.make_mesh()
    graphdef, state, optimizer = train.init_state(config, mesh)
    before = _arrays(state)
    host_batch = next(iter(train.make_train_data(config)))
    host_batch["image"][0, 0, 0, 0] = np.nan
    static = {"graphdef": graphdef, "optimizer": optimizer, "mesh": mesh}
    state, metrics = train.train_step(state, sharding.global_batch(host_batch, mesh), 0, **static)
    assert not bool(metrics["finite"]) and np.isnan(float(metrics["loss"]))
    _assert_same_leaves(_arrays(state), before, rtol=0, atol=0)


class StopAfter:
    """Stands in for the SIGTERM event: reads as set from the `steps`-th check on (the loop checks once per step)."""

    def __init__(self, steps: int):
        self.checks, self.steps = 0, steps

    def is_set(self) -> bool:
        self.checks += 1
        return self.checks >= self.steps


def test_interrupted_run_resumes_to_the_same_parameters(uninterrupted, tmp_path):
    reference_dir, reference_results = uninterrupted
    workdir = str(tmp_path)
    assert train.train(tiny_config(), workdir, stop=StopAfter(1)) is None  # stops (and saves) after step 1
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1", "metadata"]
    results = train.train(tiny_config(), workdir)  # a new run in the same workdir: resumes at step 1
    _assert_same_leaves(_model_leaves(workdir), _model_leaves(reference_dir), rtol=0, atol=0)
    assert results == reference_results


def test_run_writes_checkpoints_evaluation_and_tensorboard(uninterrupted):
    workdir, results = uninterrupted
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4", "metadata"]
    with open(os.path.join(workdir, "eval", f"step_{NUM_STEPS}.json")) as f:
        record = json.load(f)
    assert record["step"] == NUM_STEPS and record["mIoU"] == pytest.approx(results["mIoU"])
    assert len(os.listdir(os.path.join(workdir, "eval", f"step_{NUM_STEPS}"))) == 2  # the overlay PNGs
    events = _events(os.path.join(workdir, "tensorboard"))
    assert [step for step, _ in events["train/loss"]] == list(range(1, NUM_STEPS + 1))
    assert events["val/mIoU"][0][1].simple_value == pytest.approx(results["mIoU"])
    images = [values for tag, values in events.items() if tag.startswith("val_predictions/")]
    assert len(images) == 2
    height, width = images[0][0][1].image.height, images[0][0][1].image.width
    assert (height, width) == (128, 3 * 128)  # image | ground truth | prediction at the demo images' size
    traces = list(pathlib.Path(workdir, "profile").rglob("*.xplane.pb"))  # config.train.profile_steps
    assert len(traces) == 1 and traces[0].stat().st_size > 0


def _train_on_two_hosts_batches(config: ml_collections.ConfigDict) -> list[np.ndarray]:
    """The reference for the two-process run: the same steps in this process on 8 devices, each global batch the two
    hosts' shares concatenated in process order (the rows' order matters: drop path and NMF bases are drawn per row).
    """
    mesh = sharding.make_mesh()
    graphdef, state, optimizer = train.init_state(config, mesh)
    hosts = [iter(train.make_train_data(config, process_index=i, process_count=2)) for i in (0, 1)]
    static = {"graphdef": graphdef, "optimizer": optimizer, "mesh": mesh}
    for step in range(config.train.num_steps):
        shares = [next(host) for host in hosts]
        batch = {key: np.concatenate([share[key] for share in shares]) for key in ("image", "label")}
        state, _ = train.train_step(state, sharding.global_batch(batch, mesh), step, **static)
    return _arrays(state["model"])


def test_two_processes_train_together(uninterrupted, tmp_path):
    """Two processes with 2 CPU devices each, joined by jax.distributed and each loading its half of every batch, end
    with the parameters of the same steps run here on 8 devices (up to float32 reduction order: rtol 1e-4, atol 1e-6)
    and score the validation split, half each, exactly as one process scores their model.

    Left out of the comparison: the conv biases right before a training-mode BatchNorm, whose gradient is exactly 0,
    so that AdamW steps them by the sign of rounding noise, which depends on the reduction order; and the running
    means of those BatchNorms, which include the biases."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    workdir = str(tmp_path)
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.path[:0] = [{REPO!r}, {os.path.join(REPO, "tests")!r}]
        import jax
        jax.config.update("jax_num_cpu_devices", 2)
        from segnext_jax import sharding
        assert sharding.initialize_distributed("127.0.0.1:{port}", num_processes=2, process_id=int(sys.argv[1]))
        import test_train
        from segnext_jax.training import train
        results = train.train(test_train.tiny_config(), {workdir!r})
        print(json.dumps(dict(devices=jax.device_count(), mIoU=results["mIoU"])))
        jax.distributed.shutdown()
        """
    )
    # LLVM without optimisation compiles the step about twice as fast; these few steps do not need fast code
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0")
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    workers = [subprocess.Popen([sys.executable, "-c", script, str(i)], env=env, **pipes) for i in (0, 1)]
    reference = _train_on_two_hosts_batches(tiny_config())  # meanwhile, in this process
    outputs = [worker.communicate(timeout=600) for worker in workers]
    for worker, (out, err) in zip(workers, outputs):
        assert worker.returncode == 0, err.decode()[-3000:]
        assert json.loads(out.decode().strip().splitlines()[-1])["devices"] == 4
    got = _model_leaves(workdir)
    noisy = {name for name in reference if re.fullmatch(ZERO_GRADIENT_BIAS + "|" + ITS_BATCHNORM_MEAN, name)}
    assert len(noisy) == 10
    _assert_same_leaves(
        {name: got[name] for name in got.keys() - noisy},
        {name: reference[name] for name in reference.keys() - noisy},
        rtol=1e-4,
        atol=1e-6,
    )
    with open(os.path.join(workdir, "eval", f"step_{NUM_STEPS}.json")) as f:
        shared = json.load(f)
    alone = evaluate.evaluate(checkpoints.restore_model(workdir), tiny_config(), step=NUM_STEPS)
    assert shared["aAcc"] == alone["aAcc"] and shared["mIoU"] == alone["mIoU"]
