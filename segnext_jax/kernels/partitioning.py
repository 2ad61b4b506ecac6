"""Sharding rules for the native kernels: under a batch-sharded jit, run a kernel on each device's part of the batch.

XLA cannot split an FFI call by itself and would gather the whole batch onto every device (the trainer shards the
batch over the `data` mesh axis), so each kernel's call is wrapped in `custom_partitioning` with these rules.
(`custom_partitioning` has no batching rule: the native kernels do not run under `jax.vmap`.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec


def batch_axes(shape: jax.ShapeDtypeStruct) -> str | tuple[str, ...] | None:
    """The mesh axes the leading (batch) dimension of an operand is sharded over, if any."""
    spec = getattr(shape.sharding, "spec", ())
    return spec[0] if len(spec) else None


def batch_parallel(call: Callable, *, batched: Sequence[bool], num_static: int, sharding_rule: str) -> Callable:
    """`call(*operands, *static)` (`num_static` hashable arguments last) split over the batch: the operands flagged in
    `batched` and every result are sharded like the first operand's leading dimension, the other operands replicated.

    `sharding_rule` is Shardy's einsum-like rule with the batch factor named `n`; every other factor is replicated.
    """
    wrapped = custom_partitioning(call, static_argnums=tuple(range(len(batched), len(batched) + num_static)))

    def shardings(mesh, arg_shapes, result_shape):
        sharded = NamedSharding(mesh, PartitionSpec(batch_axes(arg_shapes[0])))
        results = jax.tree.map(lambda _: sharded, result_shape)
        operands = tuple(sharded if flag else NamedSharding(mesh, PartitionSpec()) for flag in batched)
        return results, operands

    def partition(*args):
        *static, mesh, arg_shapes, result_shape = args
        results, operands = shardings(mesh, arg_shapes, result_shape)
        return mesh, lambda *values: call(*values, *static), results, operands

    def infer(*args):
        *_, mesh, arg_shapes, result_shape = args
        return shardings(mesh, arg_shapes, result_shape)[0]

    names = sharding_rule.replace(",", " ").replace("->", " ").split()
    factors = tuple(name for i, name in enumerate(names) if name != "n" and name not in names[:i])  # Shardy's order
    wrapped.def_partition(
        partition, infer_sharding_from_operands=infer, sharding_rule=sharding_rule, need_replication_factors=factors
    )
    return wrapped
