"""Every published checkpoint layout, saved by torch from the mmseg reference, reads back to the same state_dict."""

import numpy as np
import pytest
import torch
from oracle import REFERENCE_VARIANTS, build_reference

from segnext_jax.serving.pth_io import CheckpointFormatError, read_pth
from segnext_jax.serving.pth_layouts import detect_architecture, extract_state_dict, normalize_keys

NUM_CLASSES = {"t": 150, "s": 19, "b": 171, "l": 150}  # ADE20K, Cityscapes, COCO-Stuff, ADE20K


def reference_segmentor(variant: str, num_classes: int, seed: int = 0) -> torch.nn.Module:
    """mmseg's MSCAN + LightHamHead under the names of mmseg's EncoderDecoder (`backbone.*`, `decode_head.*`)."""
    backbone, head = build_reference(variant, num_classes, seed=seed)
    return torch.nn.ModuleDict({"backbone": backbone, "decode_head": head}).eval()


@pytest.fixture(scope="module")
def reference_state_dicts() -> dict:
    """variant -> the reference segmentor's state_dict (torch tensors); each model, L included, built once."""
    return {variant: reference_segmentor(variant, classes).state_dict() for variant, classes in NUM_CLASSES.items()}


def as_numpy(state) -> dict:
    return {k: v.numpy() for k, v in state.items()}


def official_naming(state) -> dict:
    return {k.replace(".mlp.dwconv.", ".mlp.dwconv.dwconv."): v for k, v in state.items()}


def backbone_only(state) -> dict:
    """The MSCAN part of a segmentor state_dict, as an ImageNet checkpoint stores it (no `backbone.` prefix)."""
    return {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}


def imagenet_backbone(state, variant: str) -> dict:
    """An official ImageNet MSCAN file's state_dict: no `backbone.` prefix, official naming, a 1000-class head."""
    width = REFERENCE_VARIANTS[variant][0][-1]
    head = {"head.weight": torch.randn(1000, width), "head.bias": torch.randn(1000)}
    return {**official_naming(backbone_only(state)), **head}


# name -> (function of (state_dict, variant) building the saved object, whether the decode head is kept)
LAYOUTS = {
    "bare": (lambda sd, v: sd, True),
    "runner": (
        lambda sd, v: {
            "meta": {"mmseg_version": "1.2.2", "CLASSES": ("wall", "floor"), "iter": 160000},
            "state_dict": sd,
            "optimizer": {"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": [{"lr": 6e-5}]},
        },
        True,
    ),
    "model_key": (lambda sd, v: {"model": sd, "epoch": 3}, True),
    "module_prefix": (lambda sd, v: {"state_dict": {"module." + k: t for k, t in sd.items()}}, True),
    "official": (lambda sd, v: {"meta": {}, "state_dict": official_naming(sd)}, True),
    "imagenet_official": (lambda sd, v: {"state_dict": imagenet_backbone(sd, v)}, False),
    "imagenet_mmseg": (lambda sd, v: {"state_dict": backbone_only(sd)}, False),
}
CASES = [("t", layout) for layout in LAYOUTS] + [
    ("s", "module_prefix"),
    ("b", "official"),
    ("l", "imagenet_official"),
    ("l", "runner"),
]


@pytest.mark.parametrize("variant,layout", CASES)
def test_layout_reads_back_to_reference_state_dict(reference_state_dicts, tmp_path, variant, layout):
    reference = reference_state_dicts[variant]
    build, keeps_head = LAYOUTS[layout]
    path = tmp_path / f"{variant}_{layout}.pth"
    torch.save(build(reference, variant), path)

    state, notes = normalize_keys(extract_state_dict(read_pth(path), str(path)))

    expected = {
        k: v
        for k, v in reference.items()
        if not k.endswith("num_batches_tracked") and (keeps_head or k.startswith("backbone."))
    }
    assert list(state) == list(expected)  # same keys, same order as mmseg's own state_dict
    for key, tensor in expected.items():
        assert state[key].dtype == np.float32 and state[key].shape == tuple(tensor.shape), key
        assert np.array_equal(state[key], tensor.numpy()), key
    assert detect_architecture(state) == (variant, NUM_CLASSES[variant] if keeps_head else None, keeps_head)
    assert any("num_batches_tracked" in note for note in notes)
    assert any("dwconv.dwconv" in note for note in notes) == (layout in ("official", "imagenet_official"))
    assert any("ImageNet classification head" in note for note in notes) == (layout == "imagenet_official")
    assert any("backbone-only" in note for note in notes) == (not keeps_head)


@pytest.mark.parametrize("variant", list(NUM_CLASSES))
def test_detect_architecture_all_variants(reference_state_dicts, variant):
    reference = as_numpy(reference_state_dicts[variant])
    full, _ = normalize_keys(reference)
    backbone_only, _ = normalize_keys(imagenet_backbone(reference_state_dicts[variant], variant))
    assert detect_architecture(full) == (variant, NUM_CLASSES[variant], True)
    assert detect_architecture(backbone_only) == (variant, None, False)


def test_official_naming_only_differs_in_dwconv(reference_state_dicts):
    reference = as_numpy(reference_state_dicts["t"])
    official = official_naming(reference)
    assert sum(a != b for a, b in zip(official, reference)) == 2 * sum(REFERENCE_VARIANTS["t"][1])
    assert list(normalize_keys(official)[0]) == list(normalize_keys(reference)[0])


def test_detect_architecture_unknown_combinations(reference_state_dicts):
    reference, _ = normalize_keys(as_numpy(reference_state_dicts["t"]))
    fewer_blocks = {k: v for k, v in reference.items() if not k.startswith("backbone.block3.4.")}
    with pytest.raises(ValueError, match=r"depths=\(3, 3, 4, 2\)") as info:
        detect_architecture(fewer_blocks)
    assert "t: (32, 64, 160, 256), (3, 3, 5, 2)" in str(info.value)

    wide_head = {**reference, "decode_head.squeeze.conv.weight": np.zeros((512, 480, 1, 1), np.float32)}
    with pytest.raises(ValueError, match="decode head channels=512"):
        detect_architecture(wide_head)

    no_stem = {k: v for k, v in reference.items() if not k.startswith("backbone.patch_embed1.")}
    with pytest.raises(CheckpointFormatError, match=r"embed_dims=\(None, 64, 160, 256\)"):
        detect_architecture(no_stem)


@pytest.mark.parametrize(
    "key", ["backbone.patch_embed1.proj.3.weight", "backbone.block2.0.mlp.fc1.weight", "decode_head.conv_seg.weight"]
)
def test_detect_architecture_names_a_kernel_that_is_not_4d(reference_state_dicts, key):
    """The kernels whose shapes give the architecture, 2-D or 0-D: an error naming the key, not an IndexError."""
    reference, _ = normalize_keys(as_numpy(reference_state_dicts["t"]))
    flat = reference[key].reshape(reference[key].shape[0], -1)
    with pytest.raises(CheckpointFormatError, match=rf"^{key} has shape \({flat.shape[0]}, {flat.shape[1]}\), "):
        detect_architecture({**reference, key: flat})
    with pytest.raises(CheckpointFormatError, match=rf"^{key} has shape \(\), expected 4-D \(out, in, kh, kw\)$"):
        detect_architecture({**reference, key: np.float32(1.0).reshape(())})


def test_extract_state_dict_errors():
    weights = {"a.weight": np.zeros(2, np.float32)}
    with pytest.raises(CheckpointFormatError, match="ckpt.pth: expected a dict"):
        extract_state_dict([weights], "ckpt.pth")
    with pytest.raises(CheckpointFormatError, match="ckpt.pth: not a state_dict.*meta"):
        extract_state_dict({"meta": {}, "weights": weights}, "ckpt.pth")
    with pytest.raises(CheckpointFormatError, match=r"ckpt.pth\['state_dict'\]: key 'module.a.weight' collides"):
        extract_state_dict({"state_dict": {**weights, "module.a.weight": np.ones(2, np.float32)}}, "ckpt.pth")
    with pytest.raises(CheckpointFormatError, match="empty"):
        extract_state_dict({"state_dict": {}}, "ckpt.pth")
    assert extract_state_dict({"model": {"module.module.a.weight": weights["a.weight"]}}, "x") == weights


def test_normalize_keys_refuses_both_dwconv_namings(reference_state_dicts):
    reference = as_numpy(reference_state_dicts["t"])
    both = {**reference, **official_naming({"backbone.block1.0.mlp.dwconv.weight": np.zeros(1)})}
    with pytest.raises(CheckpointFormatError, match="both official"):
        normalize_keys(both)
