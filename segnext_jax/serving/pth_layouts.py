"""The published checkpoint layouts, brought to one form: a flat mmseg-named state_dict of the full segmentor.

Layouts met in the wild (the official release, mmseg's model zoo, JSeg): a bare state_dict or one under
'state_dict' / 'model' next to 'meta' / 'optimizer'; keys prefixed by `module.` (DataParallel); ImageNet MSCAN
backbones (no `backbone.` prefix, official `mlp.dwconv.dwconv.*` naming, an ImageNet classification head `head.*`);
full segmentors (`backbone.*` + `decode_head.*`) in official or mmseg naming. Variant and class count are read from
the tensor shapes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from segnext_jax.models import VARIANTS
from segnext_jax.serving.pth_io import CheckpointFormatError

_BACKBONE = "backbone."
_HEAD = "decode_head."
_OFFICIAL_DWCONV = ".mlp.dwconv.dwconv."
_MMSEG_DWCONV = ".mlp.dwconv."
_BLOCK = re.compile(r"^backbone\.block(\d)\.(\d+)\.")


def extract_state_dict(obj: Any, source: str) -> dict[str, np.ndarray]:
    """The flat state_dict inside a loaded checkpoint `obj`, with `module.` prefixes stripped.

    `obj` is a bare state_dict or holds one under 'state_dict' (mmcv/mmengine runners) or 'model'; everything else
    ('meta', 'optimizer', logs) is ignored. `source` names the checkpoint in errors (`CheckpointFormatError`).
    """
    if not isinstance(obj, Mapping):
        raise CheckpointFormatError(
            f"{source}: expected a dict (a state_dict or a checkpoint holding one), got {type(obj).__name__}"
        )
    container = next((name for name in ("state_dict", "model") if isinstance(obj.get(name), Mapping)), None)
    state = obj[container] if container else obj
    where = f"{source}['{container}']" if container else source
    not_arrays = [str(k) for k, v in state.items() if not (isinstance(k, str) and isinstance(v, np.ndarray))]
    if not_arrays:
        raise CheckpointFormatError(
            f"{where}: not a state_dict, these entries are not tensors: {', '.join(not_arrays[:10])}"
            + (f" (+{len(not_arrays) - 10} more)" if len(not_arrays) > 10 else "")
            + "; expected tensors at the top level or under 'state_dict' or 'model'"
        )
    out: dict[str, np.ndarray] = {}
    for key, value in state.items():
        name = key
        while name.startswith("module."):
            name = name[len("module.") :]
        if name in out:
            raise CheckpointFormatError(f"{where}: key {key!r} collides with another key once 'module.' is stripped")
        out[name] = value
    if not out:
        raise CheckpointFormatError(f"{where}: the state_dict is empty")
    return out


def normalize_keys(state_dict: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """Full-segmentor mmseg keys for any published layout, and human-readable notes on what was changed.

    Drops `num_batches_tracked`; renames official `mlp.dwconv.dwconv.*` to mmseg `mlp.dwconv.*`; a backbone-only
    (ImageNet) checkpoint, recognised by having neither `backbone.` nor `decode_head.` keys, gets the `backbone.`
    prefix and loses its classification head `head.*`. Other keys are passed through for the strict mapping to judge.
    Raises `CheckpointFormatError` for a block with keys in both namings.
    """
    notes: list[str] = []
    tracked = [k for k in state_dict if k.endswith(".num_batches_tracked")]
    if tracked:
        notes.append(f"dropped {len(tracked)} BatchNorm num_batches_tracked counters (not used at inference)")
    state = {k: v for k, v in state_dict.items() if not k.endswith(".num_batches_tracked")}
    if not any(k.startswith((_BACKBONE, _HEAD)) for k in state):
        head = {k: v for k, v in state.items() if k.startswith("head.")}
        if head:
            shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in head.items())
            notes.append(f"dropped the ImageNet classification head ({shapes}): a segmentor has no use for it")
        state = {_BACKBONE + k: v for k, v in state.items() if k not in head}
        notes.append("backbone-only (ImageNet) checkpoint: keys prefixed with 'backbone.', no decode head")
    renamed = {k.replace(_OFFICIAL_DWCONV, _MMSEG_DWCONV): v for k, v in state.items()}
    if len(renamed) != len(state):
        raise CheckpointFormatError(
            "checkpoint has both official 'mlp.dwconv.dwconv.*' and mmseg 'mlp.dwconv.*' keys for a block"
        )
    count = sum(_OFFICIAL_DWCONV in k for k in state)
    if count:
        notes.append(f"renamed {count} official-naming keys 'mlp.dwconv.dwconv.*' to mmseg 'mlp.dwconv.*'")
    return renamed, notes


def _out_channels(state_dict: Mapping[str, np.ndarray], key: str) -> int | None:
    """Output channels of the convolution kernel `key` (OIHW), None if absent."""
    if key not in state_dict:
        return None
    shape = np.shape(state_dict[key])
    if len(shape) != 4:
        raise CheckpointFormatError(f"{key} has shape {shape}, expected 4-D (out, in, kh, kw)")
    return int(shape[0])


def detect_architecture(state_dict: Mapping[str, np.ndarray]) -> tuple[str, int | None, bool]:
    """(variant 't'/'s'/'b'/'l', number of classes or None, whether a decode head is present) from tensor shapes.

    Expects `normalize_keys` output. Embedding widths come from the patch embeddings, depths from the block indices,
    MLP ratios from `fc1`, head width from `decode_head.squeeze`, classes from `decode_head.conv_seg`. Raises
    `CheckpointFormatError` when one of those kernels is not 4-D or no variant matches.
    """
    stem = ["backbone.patch_embed1.proj.3.weight"] + [f"backbone.patch_embed{i}.proj.weight" for i in (2, 3, 4)]
    embed_dims = tuple(_out_channels(state_dict, k) for k in stem)
    blocks: dict[int, set[int]] = {i: set() for i in (1, 2, 3, 4)}
    for key in state_dict:
        match = _BLOCK.match(key)
        if match and int(match[1]) in blocks:
            blocks[int(match[1])].add(int(match[2]))
    depths = tuple(len(blocks[i]) for i in (1, 2, 3, 4))
    hidden = tuple(_out_channels(state_dict, f"backbone.block{i}.0.mlp.fc1.weight") for i in (1, 2, 3, 4))
    mlp_ratios = tuple(h // c if h and c else None for h, c in zip(hidden, embed_dims))
    has_head = any(k.startswith(_HEAD) for k in state_dict)
    head_channels = _out_channels(state_dict, "decode_head.squeeze.conv.weight")
    num_classes = _out_channels(state_dict, "decode_head.conv_seg.weight")
    for name, variant in VARIANTS.items():
        if (embed_dims, depths, mlp_ratios) == (variant.embed_dims, variant.depths, variant.mlp_ratios) and (
            not has_head or head_channels == variant.head_channels
        ):
            return name, num_classes, has_head
    found = f"embed_dims={embed_dims}, depths={depths}, mlp_ratios={mlp_ratios}"
    found += f", decode head channels={head_channels}" if has_head else ", no decode head"
    known = "; ".join(
        f"{n}: {v.embed_dims}, {v.depths}, {v.mlp_ratios}, head {v.head_channels}" for n, v in VARIANTS.items()
    )
    raise CheckpointFormatError(f"checkpoint matches no SegNeXt variant: found {found}; known variants {known}")
