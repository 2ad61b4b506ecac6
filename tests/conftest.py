"""Test-wide set-up: the CPU backend with 8 simulated devices (for sharding tests), before jax initialises."""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))  # tests/oracle.py

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

# Two pytest workers share two cores: one thread per PyTorch reference keeps them from oversubscribing the machine.
import torch  # noqa: E402

torch.set_num_threads(1)
