"""PyTorch checkpoints -> SegNeXt -> PyTorch against the mmseg reference: same logits, identity round trips, strict
loads in both directions, clear errors, and the command line."""

import collections
import logging
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from oracle import fix_reference_bases
from test_layouts import LAYOUTS, imagenet_backbone, official_naming, reference_segmentor
from test_model_parity import reference_bases, relative_error

from segnext_jax import checkpoints, models
from weights_conversion import (
    StateDictMismatch,
    export_pytorch_state_dict,
    load_pytorch_checkpoint,
    save_pytorch_checkpoint,
)
from weights_conversion.__main__ import main
from weights_conversion.mapping import export_state_dict, path_to_key

NUM_CLASSES = 19
RTOL = 1e-5
IMAGE_SHAPE = (1, 64, 64, 3)
NAMINGS = {"mmseg": lambda sd: sd, "official": official_naming}
WRAPPINGS = {"bare": lambda sd: sd, "wrapped": lambda sd: LAYOUTS["runner"][0](sd, None)}


@nnx.jit
def eval_logits(model, images, bases):
    return model(images, nmf_bases=bases)


@pytest.fixture(scope="module")
def reference():
    """`reference(variant)`: mmseg's segmentor (eval mode, random weights, seed 1), each variant built once."""
    built = {}

    def get(variant):
        if variant not in built:
            built[variant] = reference_segmentor(variant, NUM_CLASSES, seed=1)
        return built[variant]

    return get


@pytest.fixture(scope="module")
def images():
    return np.random.RandomState(0).randn(*IMAGE_SHAPE).astype(np.float32)


def reference_logits(segmentor, images, bases) -> np.ndarray:
    fix_reference_bases(segmentor["decode_head"], bases)
    with torch.no_grad():
        logits = segmentor["decode_head"](segmentor["backbone"](torch.from_numpy(images).permute(0, 3, 1, 2)))
    return logits.permute(0, 2, 3, 1).numpy()


def assert_same_logits(model, segmentor, images, variant):
    bases = reference_bases(images.shape[0], variant, seed=2)
    logits = eval_logits(model, jnp.asarray(images), jnp.asarray(bases.numpy()))
    error = relative_error(logits, reference_logits(segmentor, images, bases))
    print(f"{variant}: relative error of the logits {error:.2e}")
    assert error <= RTOL


def numpy_state_dict(segmentor) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in segmentor.state_dict().items()}


def weights(model) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in export_state_dict(model).items()}


def assert_weights_equal(ours: dict, expected: dict):
    assert ours.keys() == expected.keys()
    for key, value in expected.items():
        assert np.array_equal(ours[key], value), key


def saved_reference(segmentor, path, wrapping: str, naming: str) -> str:
    torch.save(WRAPPINGS[wrapping](NAMINGS[naming](segmentor.state_dict())), path)
    return str(path)


@pytest.mark.parametrize("naming", NAMINGS)
@pytest.mark.parametrize("wrapping", WRAPPINGS)
def test_converted_t_matches_reference(reference, images, tmp_path, wrapping, naming):
    """The model is built from the checkpoint: variant and classes detected."""
    model = load_pytorch_checkpoint(saved_reference(reference("t"), tmp_path / "t.pth", wrapping, naming))
    assert isinstance(model, models.SegNeXt) and model.num_classes == NUM_CLASSES
    assert model.backbone.embed_dims == models.VARIANTS["t"].embed_dims
    assert_same_logits(model, reference("t"), images, "t")


@pytest.mark.parametrize("naming", NAMINGS)
@pytest.mark.parametrize("wrapping", WRAPPINGS)
def test_converted_s_matches_reference(reference, images, tmp_path, wrapping, naming):
    """The checkpoint fills a given model."""
    model = models.create("s", NUM_CLASSES, rngs=nnx.Rngs(3))
    path = saved_reference(reference("s"), tmp_path / "s.pth", wrapping, naming)
    assert load_pytorch_checkpoint(path, model) is model
    model.eval()
    assert_same_logits(model, reference("s"), images, "s")


def test_converted_b_matches_reference(reference, images, tmp_path):
    """A deeper variant through the hardest layout: official naming, `module.` prefixes, runner checkpoint."""
    state = {"module." + k: v for k, v in official_naming(reference("b").state_dict()).items()}
    torch.save(LAYOUTS["runner"][0](state, "b"), tmp_path / "b.pth")
    assert_same_logits(load_pytorch_checkpoint(tmp_path / "b.pth"), reference("b"), images, "b")


@pytest.mark.parametrize("variant", ["b", "l"])
def test_imagenet_backbone_fills_backbone_only(reference, tmp_path, caplog, variant):
    state = reference(variant).state_dict()
    torch.save({"state_dict": imagenet_backbone(state, variant)}, tmp_path / f"mscan_{variant}.pth")
    model = models.create(variant, 7, rngs=nnx.Rngs(3))
    head_before = weights(model.decode_head)

    with caplog.at_level(logging.INFO, logger="weights_conversion"):
        assert load_pytorch_checkpoint(tmp_path / f"mscan_{variant}.pth", model) is model

    filled = nnx.state(model.backbone, nnx.Any(nnx.Param, nnx.BatchStat)).flat_state()
    expected = {k for k in state if k.startswith("backbone.") and not k.endswith("num_batches_tracked")}
    assert {"backbone." + path_to_key(path) for path, _ in filled} == expected  # every tensor, nothing else
    for path, variable in filled:
        value = state["backbone." + path_to_key(path)].numpy()
        if path[-1] == "kernel":  # PyTorch OIHW -> HWIO
            value = value.transpose(2, 3, 1, 0)
        assert np.array_equal(np.asarray(variable.get_value()), value), path
    assert_weights_equal(weights(model.decode_head), head_before)
    assert "dropped the ImageNet classification head" in caplog.text
    assert "decode head keeps its initialisation" in caplog.text


def test_export_round_trip_and_strict_mmseg_load(reference, images, tmp_path):
    source = reference("t")
    model = load_pytorch_checkpoint(numpy_state_dict(source))

    exported = export_pytorch_state_dict(model)
    expected = numpy_state_dict(source)
    assert exported.keys() == expected.keys()  # num_batches_tracked included, as in mmseg's own state_dict
    for key, value in expected.items():
        assert exported[key].dtype == value.dtype and np.array_equal(exported[key], value), key
    assert_weights_equal(weights(load_pytorch_checkpoint(exported)), weights(model))

    save_pytorch_checkpoint(model, tmp_path / "exported.pth")
    checkpoint = torch.load(tmp_path / "exported.pth", weights_only=True)
    assert checkpoint["meta"] == {
        "variant": "t",
        "num_classes": NUM_CLASSES,
        "converted_by": "segnext_jax weights_conversion",
    }
    target = reference_segmentor("t", NUM_CLASSES, seed=5)
    versioned = collections.OrderedDict(checkpoint["state_dict"])
    versioned._metadata = target.state_dict()._metadata  # BatchNorm then insists on num_batches_tracked
    target.load_state_dict(versioned, strict=True)
    assert_same_logits(model, target, images, "t")


def test_wrong_variant_is_refused(reference):
    model = models.create("s", NUM_CLASSES, rngs=nnx.Rngs(3))
    before = weights(model)
    with pytest.raises(ValueError, match="a SegNeXt-T checkpoint cannot fill a SegNeXt-S model"):
        load_pytorch_checkpoint(numpy_state_dict(reference("t")), model)
    assert_weights_equal(weights(model), before)


def test_other_classes_need_reinit_head(reference):
    state = numpy_state_dict(reference("t"))
    model = models.create("t", 7, rngs=nnx.Rngs(3))
    before = weights(model)
    with pytest.raises(ValueError, match="decode head has 19 classes, the model 7: pass reinit_head=True"):
        load_pytorch_checkpoint(state, model)
    assert_weights_equal(weights(model), before)

    load_pytorch_checkpoint(state, model, reinit_head=True)
    expected = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    expected.update({k: v for k, v in before.items() if k.startswith("decode_head.conv_seg.")})
    assert_weights_equal(weights(model), expected)

    built = load_pytorch_checkpoint(state, num_classes=7, reinit_head=True)
    assert built.num_classes == 7 and built.decode_head.conv_seg.kernel.shape == (1, 1, 256, 7)


def test_unmapped_missing_and_misshaped_keys_are_all_listed(reference):
    state = numpy_state_dict(reference("t"))
    del state["backbone.norm4.bias"]
    state["decode_head.extra.weight"] = np.zeros(3, np.float32)
    state["decode_head.squeeze.gn.weight"] = np.zeros(128, np.float32)
    model = models.create("t", NUM_CLASSES, rngs=nnx.Rngs(3))
    before = weights(model)
    with pytest.raises(StateDictMismatch, match="3 problem") as info:
        load_pytorch_checkpoint(state, model)
    message = str(info.value)
    assert "unexpected key 'decode_head.extra.weight'" in message
    assert "missing key 'backbone.norm4.bias'" in message
    assert "shape mismatch for 'decode_head.squeeze.gn.weight': checkpoint (128,), model expects (256,)" in message
    assert_weights_equal(weights(model), before)


def test_api_argument_errors(reference):
    state = numpy_state_dict(reference("t"))
    backbone_only = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    with pytest.raises(ValueError, match="backbone-only.*pass num_classes"):
        load_pytorch_checkpoint(backbone_only)
    with pytest.raises(TypeError, match="a model was given"):
        load_pytorch_checkpoint(backbone_only, models.create("t", 3, rngs=nnx.Rngs(3)), num_classes=3)
    with pytest.raises(ValueError, match="has 19 classes, the model 3"):  # refused before the model is built
        load_pytorch_checkpoint(state, num_classes=3)


def test_command_line_both_ways(reference, tmp_path, capsys, caplog):
    source = reference("t")
    expected = {k: v for k, v in numpy_state_dict(source).items() if not k.endswith("num_batches_tracked")}
    pth, model_dir = str(tmp_path / "segnext_t.pth"), str(tmp_path / "segnext_t")
    torch.save(LAYOUTS["runner"][0](official_naming(source.state_dict()), "t"), pth)

    with caplog.at_level(logging.INFO, logger="weights_conversion"):
        assert main([pth, model_dir]) == 0
    assert f"SegNeXt-T, {NUM_CLASSES} classes; {len(expected)} tensors converted" in capsys.readouterr().out
    assert "renamed 26 official-naming keys" in caplog.text
    assert_weights_equal(weights(checkpoints.restore_model(model_dir)), expected)

    listing = sorted(os.listdir(model_dir))
    assert main([pth, model_dir]) == 1
    assert f"error: {model_dir} already exists" in capsys.readouterr().err
    assert sorted(os.listdir(model_dir)) == listing
    assert main([pth, str(tmp_path / "as_s"), "--variant", "s"]) == 1
    assert "a SegNeXt-T checkpoint cannot fill a SegNeXt-S model" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "as_s")

    back = str(tmp_path / "back.pth")
    assert main([model_dir, back]) == 0
    assert f"SegNeXt-T, {NUM_CLASSES} classes; {len(expected)} tensors converted" in capsys.readouterr().out
    target = reference_segmentor("t", NUM_CLASSES, seed=5)
    target.load_state_dict(torch.load(back, weights_only=True)["state_dict"], strict=True)
    for key, tensor in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], tensor), key


def test_command_line_imagenet_backbone(reference, tmp_path, capsys):
    state = reference("t").state_dict()
    pth, model_dir = str(tmp_path / "mscan_t.pth"), str(tmp_path / "mscan_t")
    torch.save({"state_dict": imagenet_backbone(state, "t")}, pth)
    assert main([pth, model_dir]) == 0
    backbone = {k: v.numpy() for k, v in state.items() if k.startswith("backbone.") and "num_batches" not in k}
    assert f"150 classes (backbone-only checkpoint: randomly initialised decode head); {len(backbone)} tensors" in (
        capsys.readouterr().out
    )
    restored = checkpoints.restore_model(model_dir)
    assert_weights_equal(weights(restored.backbone), {k[len("backbone.") :]: v for k, v in backbone.items()})
