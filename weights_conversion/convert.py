"""SegNeXt models out to PyTorch: mmseg's EncoderDecoder state_dict, written as a `.pth` without torch.

Reading PyTorch checkpoints (any published layout, `.pth` or JSeg `.pkl`) is part of the package,
`segnext_jax.serving.pytorch`, since prediction and evaluation load them too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flax import nnx

from segnext_jax.serving.pth_io import write_pth
from segnext_jax.serving.pytorch import export_state_dict, model_architecture


def export_pytorch_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """The SegNeXt model as mmseg's EncoderDecoder state_dict (`backbone.*`, `decode_head.*`, OIHW kernels).

    BatchNorm layers get their `num_batches_tracked` counter (0, int64) so the key set equals mmseg's own
    state_dict: torch's strict loading requires it whenever the state_dict carries module version metadata.
    """
    out = {}
    for key, value in export_state_dict(model).items():
        out[key] = value
        if key.endswith(".running_var"):
            out[key.removesuffix("running_var") + "num_batches_tracked"] = np.zeros((), np.int64)
    return out


def save_pytorch_checkpoint(model: nnx.Module, path: str | Path) -> None:
    """Writes `{'state_dict': export_pytorch_state_dict(model), 'meta': {...}}` as a `.pth` (no torch needed).

    mmseg's `load_checkpoint` and `torch.load(weights_only=True)` read it; `meta` records variant and classes.
    """
    variant, num_classes = model_architecture(model)
    meta = {"variant": variant, "num_classes": num_classes, "converted_by": "segnext_jax weights_conversion"}
    write_pth({"meta": meta, "state_dict": export_pytorch_state_dict(model)}, path)
