"""Test-wide set-up: the CPU backend with 8 simulated devices (for sharding tests), before jax initialises."""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))  # tests/oracle.py

# pytest's unraisable-exception hook imports tracemalloc when it first reports one; if that happens while TFDS is
# being imported (inside etils' lazy-import context, where every import is a lazy stand-in), the import fails and the
# report becomes an error of whichever test is running. Imported here, once, before any of that.
import tracemalloc  # noqa: E402, F401

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

# Two pytest workers share two cores: one thread per PyTorch reference keeps them from oversubscribing the machine.
import torch  # noqa: E402

torch.set_num_threads(1)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def shared_xla_cache(tmp_path_factory) -> str:
    """One compilation cache for every command-line run of the session, whatever pytest-xdist worker runs it (the
    workers' temporary folders share a parent), so a program compiled by one run is loaded by the others."""
    directory = tmp_path_factory.getbasetemp().parent / "xla_cache"
    directory.mkdir(exist_ok=True)
    return str(directory)
