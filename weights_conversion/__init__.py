"""PyTorch SegNeXt / MSCAN checkpoints to Flax and back."""

from weights_conversion.convert import (
    CHECKPOINT_ERRORS,
    PytorchCheckpoint,
    export_pytorch_state_dict,
    fill_model,
    load_pytorch_checkpoint,
    model_architecture,
    read_pytorch_checkpoint,
    save_pytorch_checkpoint,
)
from weights_conversion.mapping import StateDictMismatch
from weights_conversion.pth_io import CheckpointFormatError, UnsafeCheckpointError

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
