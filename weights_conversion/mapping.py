"""The rule between reference state_dict keys (mmseg naming) and SegNeXt parameter paths, both ways.

A key maps to a path by splitting on '.', turning integer parts into list indices and renaming the leaf:
conv `weight` -> `kernel` (OIHW -> HWIO), norm `weight` -> `scale`, `running_mean` / `running_var` -> `mean` / `var`.
No table: the NNX module tree mirrors the reference's.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
from flax import nnx

_TENSORS = nnx.Any(nnx.Param, nnx.BatchStat)
_LEAF_TO_KEY = {"kernel": "weight", "scale": "weight", "mean": "running_mean", "var": "running_var"}


def path_to_key(path: tuple) -> str:
    """('backbone', 'block1', 0, 'norm1', 'scale') -> 'backbone.block1.0.norm1.weight'."""
    *parents, leaf = (str(p) for p in path)
    return ".".join([*parents, _LEAF_TO_KEY.get(leaf, leaf)])


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


def export_state_dict(model: nnx.Module, prefix: str = "") -> dict[str, np.ndarray]:
    """The model's parameters and BatchNorm statistics as a reference (mmseg-named) state_dict of numpy arrays."""
    out = {}
    for key, (path, variable) in model_tensors(model).items():
        out[prefix + key] = to_reference_layout(str(path[-1]), np.asarray(jax.device_get(variable.get_value())))
    return out


class StateDictMismatch(ValueError):
    """Keys or shapes of a checkpoint do not fit the model."""


def load_state_dict(model: nnx.Module, state_dict: Mapping[str, np.ndarray], *, prefix: str = "") -> list[str]:
    """Fills `model` from a reference state_dict (mmseg naming), strictly.

    Every key under `prefix` must map to a tensor of the model with the same shape, and every tensor of the model
    must be filled; otherwise StateDictMismatch lists all problems at once and the model is left unchanged.
    Returns the keys that were loaded.
    """
    tensors = model_tensors(model)
    problems, updates = [], []
    wanted = {
        key[len(prefix) :]: key
        for key in state_dict
        if key.startswith(prefix) and not key.endswith(".num_batches_tracked")  # a PyTorch counter, unused here
    }
    for key, full_key in wanted.items():
        if key not in tensors:
            problems.append(f"unexpected key {full_key!r}")
            continue
        path, variable = tensors[key]
        value = from_reference_layout(str(path[-1]), np.asarray(state_dict[full_key]))
        if value.shape != variable.get_value().shape:
            expected = to_reference_layout(str(path[-1]), np.empty(variable.get_value().shape, np.bool_)).shape
            found = np.shape(state_dict[full_key])
            problems.append(f"shape mismatch for {full_key!r}: checkpoint {found}, model expects {expected}")
            continue
        updates.append((variable, value))
    problems += [f"missing key {prefix + key!r}" for key in tensors if key not in wanted]
    if problems:
        raise StateDictMismatch(f"{len(problems)} problem(s) loading the state_dict: " + "; ".join(problems))
    for variable, value in updates:
        variable.set_value(jax.numpy.asarray(value, dtype=variable.get_value().dtype))
    return sorted(wanted.values())
