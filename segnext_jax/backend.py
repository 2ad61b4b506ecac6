"""How the model and the loss are computed on each platform: one policy, keyed on the devices the program runs on.

The models and the loss say what they compute; a `Policy` says how, for one platform:
- `depthwise_impl`: the depth-wise convolutions' implementation (segnext_jax.models.depthwise): the native C++
  kernels on CPU (float32; `shift_add` for other dtypes or where the kernels do not build), XLA's grouped
  convolution on GPU, `shift_add` on TPU: XLA:TPU computes a grouped convolution's weight gradient from a copy of the
  input unfolded per tap (21 copies of the activations for a 1x21 strip), which made up most of the training step's
  memory traffic (see `largest_operations` in the compile report of segnext_jax.aot).
- `loss_impl`: the training loss (segnext_jax.training.loss): native C++ kernels on CPU, XLA elsewhere.
- `fusion_barrier`: whether the blocks' residual-stream gradient passes the CPU fusion barrier
  (segnext_jax.kernels.fusion_barrier) where the native depth-wise kernels run the block.
- `max_inlined_blocks`: stages with at most this many blocks run block after block, deeper ones as one
  `jax.lax.scan` (segnext_jax.models.mscan.run_blocks).
- `remat_blocks`: whether a scanned stage recomputes each block's activations in the backward pass
  (`jax.checkpoint`) instead of keeping them: on TPU, where HBM bounds the batch and the step is memory-bound.
- `fold_stem`: whether the stem computes with W folded into channels (segnext_jax.models.mscan.StemConv): on TPU,
  whose tiles pad a narrow minor axis (the stem's 3, 16, 32 or 64 channels) to 128 lanes.

The platform is that of the target devices: the mesh's a program is compiled for (`policy_for(mesh)`), or one named
explicitly. A program traced inside `with use(mesh):` (or `use("tpu")`, or `use(policy)`) follows that target's
policy; outside any `use`, the policy of `jax.default_backend()`, which is where a program runs when nothing else
is said. Compiling on a CPU host for a TPU (segnext_jax.aot) therefore traces under `use(tpu_mesh)`: a choice read
from the host's backend would put CPU-only FFI calls into the TPU program. `use` is a `jax.make_user_context`, so
JAX's tracing and compilation caches key on the policy: one function traced under two policies is traced twice.

Explicit implementations (`depthwise_impl='xla'`, `'portable'`, a loss `impl='native'`) are kept as given; the
policy decides what 'auto' means.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from segnext_jax.kernels import cross_entropy as cross_entropy_kernels
from segnext_jax.kernels import depthwise as depthwise_kernels
from segnext_jax.kernels import fusion_barrier as fusion_barrier_kernels

PLATFORMS = ("cpu", "gpu", "tpu")
_ALIASES = {"cuda": "gpu", "rocm": "gpu"}

# On CPU, stages of at most this many blocks (all of T, S and B) run block after block and deeper ones (L's 27) as a
# scan: XLA:CPU runs a scanned block slower than an inlined one (the loop stacks the parameters on every call,
# writes its stacked residuals in place on one thread and re-indexes the sliced parameters inside every fused loop),
# and compiles deep stages faster as a scan. Measurements: benchmarks/README.md.
CPU_MAX_INLINED_BLOCKS = 12


@dataclasses.dataclass(frozen=True)
class Policy:
    """The implementation choices for one platform (see the module docstring). Hashable: JAX's caches key on it."""

    platform: str
    depthwise_impl: str
    loss_impl: str
    fusion_barrier: bool
    max_inlined_blocks: int
    remat_blocks: bool = False
    fold_stem: bool = False

    def depthwise(self, dtype: Any) -> str:
        """The depth-wise implementation for inputs of `dtype`: the native kernels compute float32 only."""
        if self.depthwise_impl == "native" and jnp.dtype(dtype) != jnp.float32:
            return "shift_add"
        return self.depthwise_impl

    def scans(self, num_blocks: int) -> bool:
        """Whether a stage of `num_blocks` blocks runs as a `jax.lax.scan` (else block after block)."""
        return num_blocks > self.max_inlined_blocks


Target = str | Mesh | jax.Device | Policy | None


def platform_of(target: Target) -> str:
    """'cpu', 'gpu' or 'tpu' for a platform name ('cuda' and 'rocm' are 'gpu'), a device, a mesh (its devices'),
    a policy, or None (`jax.default_backend()`)."""
    if isinstance(target, Policy):
        return target.platform
    if target is None:
        name = jax.default_backend()
    elif isinstance(target, Mesh):
        name = target.devices.flat[0].platform
    elif isinstance(target, str):
        name = target
    else:
        name = target.platform
    name = _ALIASES.get(name.lower(), name.lower())
    if name not in PLATFORMS:
        raise ValueError(f"no backend policy for platform {name!r}: choose one of {PLATFORMS}")
    return name


def policy_for(target: Target = None) -> Policy:
    """The policy for `target`: a platform name, a device, a mesh, a policy (returned as it is) or None (the default
    backend). CPU's builds the native kernels on first use (cached per machine) and falls back where they fail."""
    if isinstance(target, Policy):
        return target
    platform = platform_of(target)
    if platform == "gpu":  # XLA's own grouped convolution, loss and fusion; every multi-block stage scanned
        return Policy("gpu", "xla", "xla", fusion_barrier=False, max_inlined_blocks=1)
    if platform == "tpu":
        return Policy(
            "tpu", "shift_add", "xla", fusion_barrier=False, max_inlined_blocks=1, remat_blocks=True, fold_stem=True
        )
    native_depthwise = depthwise_kernels.available()
    return Policy(
        "cpu",
        "native" if native_depthwise else "shift_add",
        "native" if cross_entropy_kernels.available() else "xla",
        fusion_barrier=native_depthwise and fusion_barrier_kernels.available(),
        max_inlined_blocks=CPU_MAX_INLINED_BLOCKS,
    )


_CONTEXT = jax.make_user_context(None)


def use(target: Target):
    """Context manager: programs traced inside follow `policy_for(target)`, e.g. `with backend.use(mesh): ...`.

    Part of JAX's trace context, so a jitted function is traced anew for another policy rather than reused."""
    return _CONTEXT(policy_for(target))


def current() -> Policy:
    """The policy of the innermost `use`, else the default backend's."""
    policy = _CONTEXT.value
    return policy if policy is not None else policy_for(None)
