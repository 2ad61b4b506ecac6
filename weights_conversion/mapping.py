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
    """A checkpoint does not fit the model: other variant or classes, unmapped or missing keys, other shapes."""


def _shape_problem(key: str, found: tuple[int, ...], expected: tuple[int, ...], leaf_name: str) -> str:
    """'KEY has shape FOUND, expected EXPECTED', naming the dimensions (and a kernel's layout) if they differ."""
    if len(found) == len(expected):
        return f"{key} has shape {found}, expected {expected}"
    layout = " (out, in, kh, kw)" if leaf_name == "kernel" else ""
    return f"{key} has shape {found}, expected {len(expected)}-D{layout} {expected}"


def load_state_dict(
    model: nnx.Module, state_dict: Mapping[str, np.ndarray], *, prefix: str = "", source: str = "state_dict"
) -> list[str]:
    """Fills `model` from a reference state_dict (mmseg naming), strictly.

    Every key under `prefix` must map to a tensor of the model with the same shape, and every tensor of the model
    must be filled; otherwise StateDictMismatch (message starting with `source`) lists all problems at once and the
    model is left unchanged. Returns the keys that were loaded.
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
        leaf_name = str(path[-1])
        found = tuple(np.shape(state_dict[full_key]))
        expected = to_reference_layout(leaf_name, np.broadcast_to(np.bool_(0), variable.get_value().shape)).shape
        if found != expected:  # checked in the reference layout: a kernel that is not 4-D cannot be transposed
            problems.append(_shape_problem(full_key, found, expected, leaf_name))
            continue
        updates.append((variable, from_reference_layout(leaf_name, np.asarray(state_dict[full_key]))))
    problems += [f"missing key {prefix + key!r}" for key in tensors if key not in wanted]
    if problems:
        summary = problems[0] if len(problems) == 1 else f"{len(problems)} problems: " + "; ".join(problems)
        raise StateDictMismatch(f"{source}: {summary}")
    for variable, value in updates:
        variable.set_value(jax.numpy.asarray(value, dtype=variable.get_value().dtype))
    return sorted(wanted.values())
