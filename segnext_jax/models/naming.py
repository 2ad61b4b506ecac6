"""Parameter names: our parameter paths and the reference's (mmseg) state_dict keys, one rule both ways.

A key maps to a path by splitting on '.', turning integer parts into list indices and renaming the leaf: conv
`weight` -> `kernel` (OIHW -> HWIO), norm `weight` -> `scale`, `running_mean` / `running_var` -> `mean` / `var`.
No table: the NNX module tree mirrors the reference's. The optimiser matches mmseg's custom_keys against these keys;
the PyTorch checkpoint reader and writer map tensors with them.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx

_TENSORS = nnx.Any(nnx.Param, nnx.BatchStat)
_LEAF_TO_KEY = {"kernel": "weight", "scale": "weight", "mean": "running_mean", "var": "running_var"}


def dotted_name(path: tuple[Any, ...]) -> str:
    """'backbone.block1.0.norm1.scale' for a parameter's path: an nnx flat-state path (names and indices) or a pytree
    key path (an nnx.Variable's trailing `.value` dropped)."""
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        path = path[:-1]
    return ".".join(str(getattr(entry, "key", getattr(entry, "idx", getattr(entry, "name", entry)))) for entry in path)


def reference_name(name: str) -> str:
    """The reference state_dict key of a dotted parameter name: 'backbone.block1.0.norm1.scale' ->
    'backbone.block1.0.norm1.weight'."""
    head, _, leaf = name.rpartition(".")
    leaf = _LEAF_TO_KEY.get(leaf, leaf)
    return f"{head}.{leaf}" if head else leaf


def path_to_key(path: tuple[Any, ...]) -> str:
    """('backbone', 'block1', 0, 'norm1', 'scale') -> 'backbone.block1.0.norm1.weight'."""
    return reference_name(dotted_name(path))


def to_reference_layout(leaf_name: str, value: np.ndarray) -> np.ndarray:
    """Our array -> the reference's: HWIO kernels become OIHW."""
    return np.transpose(value, (3, 2, 0, 1)) if leaf_name == "kernel" else value


def from_reference_layout(leaf_name: str, value: np.ndarray) -> np.ndarray:
    """The reference's array -> ours: OIHW kernels become HWIO."""
    return np.transpose(value, (2, 3, 1, 0)) if leaf_name == "kernel" else value


def model_tensors(model: nnx.Module) -> dict[str, tuple[tuple, nnx.Variable]]:
    """Reference key -> (our path, variable) for every parameter and batch statistic of `model`."""
    flat = nnx.state(model, _TENSORS).flat_state()
    return {path_to_key(path): (path, variable) for path, variable in flat}
