"""Data parallelism over every device of every host: one `data` mesh axis, batch sharded, parameters replicated.

The train step is `jax.jit` over arrays with these `NamedSharding`s (the current form of pjit): the same code runs on
one CPU, eight GPUs or a TPU pod. BatchNorm statistics computed inside the jitted step are reductions over the sharded
batch axis, i.e. over the global batch (the reference's SyncBN), with no `axis_name`.

The mesh axis is `AxisType.Auto`, not `jax.make_mesh`'s default Explicit: Auto leaves the partitioning of every
intermediate to XLA (as pjit always did), while Explicit puts shardings into the types and asks for annotations where
they are ambiguous (backward passes on Explicit meshes can raise ShardingTypeErrors).
"""

import glob
import importlib.util
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh named `data` over all devices of all processes (or the first `num_devices` of them), Auto axis."""
    devices = jax.devices()
    if num_devices is not None:
        if not 1 <= num_devices <= len(devices):
            raise ValueError(f"make_mesh: num_devices={num_devices} but {len(devices)} devices are available")
        if num_devices != len(devices) and jax.process_count() > 1:
            raise ValueError("make_mesh: a multi-process run must use every device (leave num_devices unset)")
        devices = devices[:num_devices]
    return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices)


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the `data` axis; other axes whole."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """A full copy on every device (parameters, optimiser state, scalars)."""
    return NamedSharding(mesh, PartitionSpec())


def global_batch(host_batch: Any, mesh: Mesh) -> Any:
    """Turns this process's batch (a pytree of numpy arrays, leading axis = its share) into global sharded arrays.

    Every process calls it with its own share of the global batch; the global batch is the processes' batches
    concatenated in process order, each device holding a consecutive block of rows.
    """
    sharding = data_sharding(mesh)
    local_devices = len(mesh.local_devices)

    def put(x: np.ndarray) -> jax.Array:
        x = np.asarray(x)
        if x.shape[0] % local_devices:
            raise ValueError(
                f"global_batch: this host's batch of {x.shape[0]} does not split over its {local_devices} devices"
            )
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(put, host_batch)


def _launched_as_several_processes() -> bool:
    """Whether a cluster launcher started this as one process of several (then JAX detects the rest itself).

    SLURM (`srun` with more than one task), Open MPI (`mpirun -n N`, N > 1), or a Cloud TPU VM (libtpu installed and
    TPU chips present), where JAX reads the hosts of the slice from the TPU metadata.
    """
    if int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1 or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return True
    has_tpu_chips = bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))
    return has_tpu_chips and importlib.util.find_spec("libtpu") is not None


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Joins this process to a multi-process run via `jax.distributed.initialize`; returns whether it did.

    Call first thing, before any JAX computation. With `coordinator_address` (host:port of process 0, plus
    `num_processes` and `process_id`), those are used: custom launchers and tests. Without it, JAX's own cluster
    detection fills everything in when a launcher is recognised (SLURM, Open MPI, Cloud TPU VM / pod slice); on a
    plain machine this is a single-process run and nothing happens. Under SLURM, JAX gives each process the GPU
    numbered by its local rank: launch one task per GPU.
    """
    if jax.distributed.is_initialized():
        return True
    if coordinator_address is None and (num_processes is not None or process_id is not None):
        raise ValueError("initialize_distributed: num_processes/process_id need a coordinator_address (host:port)")
    if coordinator_address is None and not _launched_as_several_processes():
        return False
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return True
