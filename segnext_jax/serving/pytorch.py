"""PyTorch SegNeXt / MSCAN checkpoints into SegNeXt models, and SegNeXt models out as mmseg state_dicts; no torch.

Reading goes file (a `.pth`, or a JSeg `.pkl`) -> `pth_io.read_checkpoint` (no pickled code run) ->
`pth_layouts` (one mmseg-named form for every published layout, variant and classes from the shapes) -> the strict
key<->path rule of `segnext_jax.models.naming`. Notes on what was changed on the way (dropped ImageNet head,
renamed official keys, re-initialised classifier) are logged at INFO on this module's logger.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from segnext_jax import models
from segnext_jax.models.naming import from_reference_layout, model_tensors, to_reference_layout
from segnext_jax.serving.pth_io import CheckpointFormatError, read_checkpoint
from segnext_jax.serving.pth_layouts import detect_architecture, extract_state_dict, normalize_keys

logger = logging.getLogger(__name__)

_BACKBONE = "backbone."
_CONV_SEG = "decode_head.conv_seg."


class StateDictMismatch(ValueError):
    """A checkpoint does not fit the model: other variant or classes, unmapped or missing keys, other shapes."""


@dataclasses.dataclass(frozen=True)
class PytorchCheckpoint:
    """A PyTorch checkpoint brought to one form: the full segmentor's mmseg-named tensors and what they describe."""

    source: str  # the file (or 'state_dict' for an in-memory one), named in errors
    state_dict: dict[str, np.ndarray]  # mmseg keys with `backbone.` / `decode_head.` prefixes, PyTorch layouts
    variant: str  # 't', 's', 'b' or 'l'
    num_classes: int | None  # classes of the decode head's classifier; None when it has none
    has_head: bool  # False for a backbone-only (ImageNet) checkpoint


def export_state_dict(model: nnx.Module, prefix: str = "") -> dict[str, np.ndarray]:
    """The model's parameters and BatchNorm statistics as a reference (mmseg-named) state_dict of numpy arrays."""
    out = {}
    for key, (path, variable) in model_tensors(model).items():
        out[prefix + key] = to_reference_layout(str(path[-1]), np.asarray(jax.device_get(variable.get_value())))
    return out


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
