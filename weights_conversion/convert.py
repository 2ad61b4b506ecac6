"""PyTorch checkpoints into SegNeXt models, and SegNeXt models out to PyTorch (mmseg naming).

Reading goes file (a `.pth`, or a JSeg `.pkl`) -> `read_checkpoint` (no torch, no pickled code run) ->
`extract_state_dict` / `normalize_keys` (one mmseg-named form for every published layout) -> `detect_architecture` ->
the strict key<->path rule of `mapping`.
Notes on what was changed on the way (dropped ImageNet head, renamed official keys, re-initialised classifier) are
logged at INFO on the `weights_conversion` logger.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from segnext_jax import checkpoints, models
from weights_conversion.layouts import detect_architecture, extract_state_dict, normalize_keys
from weights_conversion.mapping import (
    StateDictMismatch,
    export_state_dict,
    load_state_dict,
    model_tensors,
    to_reference_layout,
)
from weights_conversion.pth_io import CheckpointFormatError, UnsafeCheckpointError, read_checkpoint, write_pth

logger = logging.getLogger("weights_conversion")

# What a bad input checkpoint raises (reading or loading it, .pth or orbax): command lines print these as one line.
# Anything else (a TypeError or ValueError from inside the conversion, say) is a bug and keeps its traceback.
CHECKPOINT_ERRORS = (
    CheckpointFormatError,
    UnsafeCheckpointError,
    StateDictMismatch,
    checkpoints.DamagedCheckpointError,
    checkpoints.CheckpointMismatchError,
)

_BACKBONE = "backbone."
_CONV_SEG = "decode_head.conv_seg."


@dataclasses.dataclass(frozen=True)
class PytorchCheckpoint:
    """A PyTorch checkpoint brought to one form: the full segmentor's mmseg-named tensors and what they describe."""

    source: str  # the file (or 'state_dict' for an in-memory one), named in errors
    state_dict: dict[str, np.ndarray]  # mmseg keys with `backbone.` / `decode_head.` prefixes, PyTorch layouts
    variant: str  # 't', 's', 'b' or 'l'
    num_classes: int | None  # classes of the decode head's classifier; None when it has none
    has_head: bool  # False for a backbone-only (ImageNet) checkpoint


def read_pytorch_checkpoint(path_or_state_dict: str | Path | Mapping[str, Any]) -> PytorchCheckpoint:
    """Reads a `.pth` or JSeg `.pkl` file (or an already loaded checkpoint / state_dict of numpy arrays) of any
    published layout.

    Layouts: a bare state_dict or one under 'state_dict' / 'model', `module.` prefixes, backbone-only (ImageNet)
    or full segmentor, official (`mlp.dwconv.dwconv.*`) or mmseg naming. Variant and classes come from the shapes.
    A state_dict of torch tensors converts with `{k: v.numpy() for k, v in sd.items()}`. A file or state_dict
    that is none of these raises `CheckpointFormatError` (`UnsafeCheckpointError` for a pickle naming code).
    """
    if isinstance(path_or_state_dict, (str, Path)):
        source, raw = str(path_or_state_dict), read_checkpoint(path_or_state_dict)
    else:
        source, raw = "state_dict", path_or_state_dict
    state = extract_state_dict(raw, source)
    try:
        state, notes = normalize_keys(state)
        variant, num_classes, has_head = detect_architecture(state)
    except CheckpointFormatError as e:
        raise CheckpointFormatError(f"{source}: {e}") from None
    for note in notes:
        logger.info("%s: %s", source, note)
    return PytorchCheckpoint(source, state, variant, num_classes, has_head)


def model_architecture(model: nnx.Module) -> tuple[str, int | None]:
    """(variant, num_classes) of a SegNeXt model, read off its tensor shapes exactly as for a checkpoint."""
    shapes = {
        key: to_reference_layout(str(path[-1]), np.broadcast_to(np.float32(0), variable.get_value().shape))
        for key, (path, variable) in model_tensors(model).items()
    }
    try:
        variant, num_classes, _ = detect_architecture(shapes)
    except ValueError as e:
        raise ValueError(f"the model is not a SegNeXt of a known variant ({e})") from None
    return variant, num_classes


def require_variant(checkpoint: PytorchCheckpoint, variant: str) -> None:
    """Raises StateDictMismatch naming both variants unless the checkpoint is of `variant`."""
    if checkpoint.variant != variant:
        raise StateDictMismatch(
            f"{checkpoint.source}: a SegNeXt-{checkpoint.variant.upper()} checkpoint cannot fill a "
            f"SegNeXt-{variant.upper()} model: use variant {checkpoint.variant!r}, or let the variant be detected"
        )


def replaces_classifier(checkpoint: PytorchCheckpoint, num_classes: int, reinit_head: bool) -> bool:
    """Whether a model with `num_classes` must keep its own classifier: the checkpoint's has other classes.

    That is refused (StateDictMismatch) unless `reinit_head`: fine-tuning on a new dataset is the only reason for it.
    """
    if not checkpoint.has_head or checkpoint.num_classes in (None, num_classes):
        return False
    if not reinit_head:
        raise StateDictMismatch(
            f"{checkpoint.source}: the checkpoint's decode head has {checkpoint.num_classes} classes, the model "
            f"{num_classes}: pass reinit_head=True (CLI: --reinit-head) to re-initialise decode_head.conv_seg "
            "for fine-tuning on a new dataset"
        )
    return True


def fill_model(model: nnx.Module, checkpoint: PytorchCheckpoint, *, reinit_head: bool = False) -> list[str]:
    """Copies the checkpoint's tensors into `model` (a SegNeXt), strictly; returns the checkpoint keys loaded.

    A backbone-only checkpoint fills `model.backbone` and leaves the decode head as initialised. A decode head with
    another number of classes than the model's is refused unless `reinit_head`, which keeps the model's own
    (freshly initialised) `decode_head.conv_seg` and loads everything else. Any unmapped key, unfilled tensor or
    shape mismatch raises `StateDictMismatch` listing them all; the model is then left unchanged.
    """
    source, state = checkpoint.source, checkpoint.state_dict
    variant, num_classes = model_architecture(model)
    require_variant(checkpoint, variant)
    if not checkpoint.has_head:
        loaded = load_state_dict(model.backbone, state, prefix=_BACKBONE, source=source)
        logger.info("%s: backbone-only checkpoint: the decode head keeps its initialisation", source)
        return loaded
    if not replaces_classifier(checkpoint, num_classes, reinit_head):
        return load_state_dict(model, state, source=source)
    kept = {k: v for k, v in state.items() if not k.startswith(_CONV_SEG)}
    classifier = export_state_dict(model.decode_head.conv_seg, prefix=_CONV_SEG)
    loaded = load_state_dict(model, {**kept, **classifier}, source=source)
    logger.info(
        "%s: decode_head.conv_seg re-initialised for %d classes (the checkpoint's has %d)",
        source,
        num_classes,
        checkpoint.num_classes,
    )
    return [key for key in loaded if not key.startswith(_CONV_SEG)]


def load_pytorch_checkpoint(
    path_or_state_dict: str | Path | Mapping[str, Any],
    model: nnx.Module | None = None,
    *,
    num_classes: int | None = None,
    reinit_head: bool = False,
    rngs: nnx.Rngs | None = None,
    **model_kwargs: Any,
) -> nnx.Module:
    """A SegNeXt model holding the weights of a PyTorch checkpoint (see `read_pytorch_checkpoint` for the layouts).

    Without `model`, builds the detected variant with `models.create(variant, num_classes, rngs=rngs or
    nnx.Rngs(0), **model_kwargs)` in eval mode; `num_classes` defaults to the checkpoint's (a backbone-only
    checkpoint needs it). With `model`, fills it in place and returns it. See `fill_model` for `reinit_head` and
    the errors.
    """
    checkpoint = read_pytorch_checkpoint(path_or_state_dict)
    if model is None:
        classes = checkpoint.num_classes if num_classes is None else num_classes
        if classes is None:
            raise StateDictMismatch(
                f"{checkpoint.source}: the checkpoint has no classifier (backbone-only): pass num_classes for the "
                "decode head"
            )
        replaces_classifier(checkpoint, classes, reinit_head)  # refuse before building, which takes seconds
        model = models.create(checkpoint.variant, classes, rngs=rngs or nnx.Rngs(0), **model_kwargs)
        model.eval()
    elif num_classes is not None or rngs is not None or model_kwargs:
        raise TypeError(
            "load_pytorch_checkpoint: num_classes, rngs and model keywords build a model; a model was given"
        )
    fill_model(model, checkpoint, reinit_head=reinit_head)
    return model


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
