"""segnext_jax.sharding on 8 simulated CPU devices, and two processes joined by jax.distributed."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType

from segnext_jax import sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() == 8, "these tests need 8 CPU devices (tests/conftest.py sets jax_num_cpu_devices)"
    return sharding.make_mesh()


def test_mesh_is_one_auto_data_axis(mesh):
    assert mesh.axis_names == ("data",)
    assert mesh.axis_types == (AxisType.Auto,)
    assert list(mesh.devices) == jax.devices()
    assert sharding.make_mesh(2).devices.size == 2
    with pytest.raises(ValueError, match="num_devices=9"):
        sharding.make_mesh(9)


def test_global_batch_puts_each_devices_rows_on_it(mesh):
    host = {
        "image": np.arange(16 * 4 * 4 * 3, dtype=np.float32).reshape(16, 4, 4, 3),
        "label": np.arange(16 * 4 * 4, dtype=np.int32).reshape(16, 4, 4),
    }
    batch = sharding.global_batch(host, mesh)
    for name, array in batch.items():
        assert array.shape == host[name].shape and array.sharding == sharding.data_sharding(mesh)
        np.testing.assert_array_equal(np.asarray(array), host[name])
        for shard in array.addressable_shards:
            row = mesh.devices.tolist().index(shard.device) * 2
            np.testing.assert_array_equal(np.asarray(shard.data), host[name][row : row + 2])
    with pytest.raises(ValueError, match="12 does not split over its 8 devices"):
        sharding.global_batch(np.zeros((12, 3)), mesh)


class ConvBN(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
        self.norm = nnx.BatchNorm(4, momentum=0.0, rngs=rngs)  # running stats := this batch's stats

    def __call__(self, x):
        return self.norm(self.conv(x))


def test_batch_sharded_step_equals_single_device_step(mesh):
    """Loss and gradients of conv + BatchNorm with the batch split over 8 devices, and BatchNorm statistics over the
    global batch (SyncBN), equal those of the whole batch on one device."""
    graphdef, state = nnx.split(ConvBN(nnx.Rngs(0)))

    @jax.jit
    def step(state, images):
        model = nnx.merge(graphdef, state)
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(images) - 1.0) ** 2))(model)
        return loss, grads, nnx.state(model, nnx.BatchStat)

    images = np.random.default_rng(0).standard_normal((16, 8, 8, 3)).astype(np.float32)
    expected = step(state, jnp.asarray(images))
    sharded = step(jax.device_put(state, sharding.replicated_sharding(mesh)), sharding.global_batch(images, mesh))
    assert sharded[0].sharding.is_fully_replicated
    for got, want in zip(jax.tree.leaves(sharded), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_single_process_without_launcher(monkeypatch):
    for name in ("SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert sharding.initialize_distributed() is False
    assert jax.process_count() == 1
    with pytest.raises(ValueError, match="coordinator_address"):
        sharding.initialize_distributed(num_processes=2, process_id=0)
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")  # srun with 2 tasks: JAX's initialisation is attempted
    with pytest.raises(RuntimeError, match="must be called before"):
        sharding.initialize_distributed()


def test_two_processes_form_one_global_batch(tmp_path):
    """Each process feeds its half; a jitted reduction sees the whole global batch on all 4 devices."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.path.insert(0, {REPO!r})
        import jax
        jax.config.update("jax_num_cpu_devices", 2)
        import numpy as np
        from segnext_jax import sharding
        process = int(sys.argv[1])
        assert sharding.initialize_distributed("127.0.0.1:{port}", num_processes=2, process_id=process)
        mesh = sharding.make_mesh()
        host = np.arange(6, dtype=np.float32).reshape(2, 3) + 6 * process
        batch = sharding.global_batch(host, mesh)
        row_sums = jax.jit(lambda x: x.sum(axis=1), out_shardings=sharding.replicated_sharding(mesh))(batch)
        print(json.dumps(dict(devices=jax.device_count(), processes=jax.process_count(), shape=list(batch.shape),
                              row_sums=np.asarray(row_sums).tolist())))
        jax.distributed.shutdown()
        """
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(i)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for i in range(2)
    ]
    outputs = [worker.communicate(timeout=120) for worker in workers]
    for worker, (out, err) in zip(workers, outputs):
        assert worker.returncode == 0, err.decode()[-3000:]
        result = json.loads(out.decode().strip().splitlines()[-1])
        expected = {"devices": 4, "processes": 2, "shape": [4, 3], "row_sums": [3.0, 12.0, 21.0, 30.0]}
        assert result == expected
