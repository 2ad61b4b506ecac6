"""One way to load a SegNeXt for inference: a training workdir, a model directory or a PyTorch checkpoint file.

`load(path, step)` opens the checkpoint once and returns the model (evaluation mode) with what was recorded with it:
a workdir's {"model", "config", "step": the step loaded}, a model directory's segnext.json, nothing for a PyTorch
`.pth` / JSeg `.pkl` (they record no training config). Prediction, evaluation and export all load through it.
"""

from __future__ import annotations

import os
from typing import Any

from flax import nnx

from segnext_jax import checkpoints, paths
from segnext_jax.serving import pytorch
from segnext_jax.serving.pth_io import CheckpointFormatError, UnsafeCheckpointError

# What a bad checkpoint raises (reading or loading it, .pth or orbax): command lines print these as one line.
# Anything else (a TypeError or ValueError from inside the loading, say) is a bug and keeps its traceback.
CHECKPOINT_ERRORS = (
    CheckpointFormatError,
    UnsafeCheckpointError,
    pytorch.StateDictMismatch,
    checkpoints.DamagedCheckpointError,
    checkpoints.CheckpointMismatchError,
)


def load(path: str, step: int | str = "latest") -> tuple[nnx.Module, dict[str, Any]]:
    """(model in eval mode, its recorded metadata) of a workdir, model directory or PyTorch checkpoint file.

    A relative `path` is relative to the working directory. `step` picks a workdir's checkpoint ('latest', 'best' or
    a step number); a model directory or file holds one. A missing path is a FileNotFoundError, a bad checkpoint one
    of CHECKPOINT_ERRORS.
    """
    path = paths.resolve(path)
    if not paths.is_url(path) and not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path}: no such file or directory")
    if os.path.isfile(path):
        return pytorch.load_pytorch_checkpoint(path), {}
    return checkpoints.load(path, step)
