"""PyTorch SegNeXt / MSCAN checkpoints to Flax and back: the converter's command line and its Python API.

Reading lives in the package (`segnext_jax.serving.pytorch`, which prediction and evaluation use too); this
converter depends on it, never the other way round.
"""

from segnext_jax.serving.loading import CHECKPOINT_ERRORS
from segnext_jax.serving.pth_io import CheckpointFormatError, UnsafeCheckpointError
from segnext_jax.serving.pytorch import (
    PytorchCheckpoint,
    StateDictMismatch,
    fill_model,
    load_pytorch_checkpoint,
    model_architecture,
    read_pytorch_checkpoint,
)
from weights_conversion.convert import export_pytorch_state_dict, save_pytorch_checkpoint

__all__ = [
    "CHECKPOINT_ERRORS",
    "CheckpointFormatError",
    "PytorchCheckpoint",
    "StateDictMismatch",
    "UnsafeCheckpointError",
    "export_pytorch_state_dict",
    "fill_model",
    "load_pytorch_checkpoint",
    "model_architecture",
    "read_pytorch_checkpoint",
    "save_pytorch_checkpoint",
]
