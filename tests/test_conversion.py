"""PyTorch checkpoints -> SegNeXt -> PyTorch against the mmseg reference: same logits, identity round trips, strict
loads in both directions, clear errors, and the command line."""

import collections
import logging
import os
import zipfile

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from oracle import fix_reference_bases
from test_layouts import LAYOUTS, imagenet_backbone, official_naming, reference_segmentor
from test_model_parity import reference_bases, relative_error

import weights_conversion.__main__ as command_line
from segnext_jax import checkpoints, models
from segnext_jax.models.naming import path_to_key
from segnext_jax.serving.pytorch import export_state_dict, logger
from weights_conversion import (
    StateDictMismatch,
    export_pytorch_state_dict,
    load_pytorch_checkpoint,
    save_pytorch_checkpoint,
)
from weights_conversion.__main__ import main

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

    with caplog.at_level(logging.INFO, logger=logger.name):
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
    with pytest.raises(StateDictMismatch, match="^state_dict: 3 problems: ") as info:
        load_pytorch_checkpoint(state, model)
    message = str(info.value)
    assert "unexpected key 'decode_head.extra.weight'" in message
    assert "missing key 'backbone.norm4.bias'" in message
    assert "decode_head.squeeze.gn.weight has shape (128,), expected (256,)" in message
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


def test_command_line_both_ways_with_relative_paths(reference, tmp_path, monkeypatch, capsys, caplog):
    """Relative paths (orbax takes absolute ones only) and outputs in folders that do not exist yet."""
    source = reference("t")
    expected = {k: v for k, v in numpy_state_dict(source).items() if not k.endswith("num_batches_tracked")}
    monkeypatch.chdir(tmp_path)
    pth, model_dir = "segnext_t.pth", os.path.join("models", "segnext_t")
    torch.save(LAYOUTS["runner"][0](official_naming(source.state_dict()), "t"), pth)

    with caplog.at_level(logging.INFO, logger=logger.name):
        assert main([pth, model_dir]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{pth}: SegNeXt-T, {NUM_CLASSES} classes; {len(expected)} tensors converted -> {model_dir}")
    assert "renamed 26 official-naming keys" in caplog.text
    assert_weights_equal(weights(checkpoints.restore_model(str(tmp_path / model_dir))), expected)

    listing = sorted(os.listdir(model_dir))
    assert main([pth, model_dir]) == 1
    assert capsys.readouterr().err == f"error: {model_dir} already exists: choose a new output path\n"
    assert sorted(os.listdir(model_dir)) == listing
    assert main([pth, "as_s", "--variant", "s"]) == 1
    assert "a SegNeXt-T checkpoint cannot fill a SegNeXt-S model" in capsys.readouterr().err
    assert not os.path.exists("as_s")

    back = os.path.join("exports", "back.pth")
    assert main([model_dir, back]) == 0
    assert capsys.readouterr().out.startswith(f"{model_dir}: SegNeXt-T, {NUM_CLASSES} classes; {len(expected)} ")
    target = reference_segmentor("t", NUM_CLASSES, seed=5)
    target.load_state_dict(torch.load(tmp_path / back, weights_only=True)["state_dict"], strict=True)
    for key, tensor in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], tensor), key


def one_line_error(capsys) -> str:
    """The command's stderr, checked to be one line starting with 'error: '."""
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err.rstrip("\n")


@pytest.mark.parametrize(
    "key,reshape,expected",
    [
        (
            "backbone.patch_embed1.proj.0.weight",
            lambda w: w[..., 0],
            "(16, 3, 3), expected 4-D (out, in, kh, kw) (16, 3, 3, 3)",
        ),
        ("decode_head.conv_seg.weight", lambda w: w[:, :, 0, 0], "(19, 256), expected 4-D (out, in, kh, kw)"),
    ],
)
def test_command_line_names_a_misshaped_tensor(reference, tmp_path, capsys, key, reshape, expected):
    """A kernel of the wrong rank: a one-line error naming the key and both shapes (it was 'axes don't match')."""
    state = reference("t").state_dict()
    pth = str(tmp_path / "segnext.pth")
    torch.save({"state_dict": {**state, key: reshape(state[key])}}, pth)
    assert main([pth, str(tmp_path / "model")]) == 1
    assert one_line_error(capsys) == f"error: {pth}: {key} has shape {expected}"
    assert not os.path.exists(tmp_path / "model")


def test_command_line_refuses_files_that_are_no_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with open("random.pth", "wb") as f:
        f.write(np.random.RandomState(0).bytes(1000))
    with open("notes.txt", "w") as f:
        f.write("mscan_t weights are on the cloud drive\n")
    open("empty.pth", "wb").close()
    with zipfile.ZipFile("other.zip", "w") as zf:
        zf.writestr("readme.txt", "hello")
    torch.save([torch.zeros(2)], "list.pth")
    torch.save({"fc.weight": torch.zeros(2, 2)}, "resnet.pth")
    os.mkdir("empty_folder")
    cases = {
        "random.pth": "not a PyTorch checkpoint",
        "notes.txt": "not a PyTorch checkpoint",
        "empty.pth": "not a PyTorch checkpoint",
        "other.zip": "a zip archive but not a torch.save checkpoint",
        "list.pth": "expected a dict",
        "resnet.pth": "checkpoint matches no SegNeXt variant",
        "empty_folder": "neither a model directory",
    }
    for name, reason in cases.items():
        assert main([name, "out"]) == 1, name
        message = one_line_error(capsys)
        assert os.path.join(tmp_path, name) in message and reason in message, message
    assert main(["missing.pth", "out"]) == 1
    assert one_line_error(capsys) == "error: missing.pth: no such file or directory"
    assert sorted(os.listdir()) == sorted(cases)  # no output


def test_command_line_refuses_an_output_it_cannot_create(tmp_path, monkeypatch, capsys):
    """Checked before the input is read (a conversion takes seconds): the input here is not even a checkpoint."""
    monkeypatch.chdir(tmp_path)
    with open("notes.txt", "w") as f:
        f.write("not read\n")
    assert main(["notes.txt", os.path.join("notes.txt", "model")]) == 1
    assert one_line_error(capsys) == f"error: {os.path.join('notes.txt', 'model')}: cannot be created, " + (
        f"{tmp_path / 'notes.txt'} is a file, not a folder"
    )
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # works as root too, unlike a chmod
    assert main(["notes.txt", os.path.join("new", "model")]) == 1
    assert one_line_error(capsys) == f"error: {os.path.join('new', 'model')}: cannot be created, " + (
        f"no permission to write into {tmp_path}"
    )
    assert sorted(os.listdir()) == ["notes.txt"]


def test_command_line_urls_are_left_to_orbax(tmp_path, capsys):
    """URLs (kept by paths.resolve) are not checked as local paths; only orbax's model directories may be one."""
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    assert main([str(tmp_path / "notes.txt"), "gs://bucket/model"]) == 1  # the input is read, then refused
    assert "not a PyTorch checkpoint" in one_line_error(capsys)
    assert main([str(tmp_path), "gs://bucket/segnext.pth"]) == 1
    assert one_line_error(capsys) == "error: gs://bucket/segnext.pth: a .pth is written to a local path only"
    assert os.listdir(tmp_path) == ["notes.txt"]


def test_command_line_keeps_the_traceback_of_a_bug(tmp_path, monkeypatch):
    """Only bad inputs are one-line errors: a ValueError from inside the conversion is not hidden."""

    def bug(path):
        raise ValueError("axes don't match array")

    monkeypatch.setattr(command_line, "read_pytorch_checkpoint", bug)
    (tmp_path / "segnext.pth").write_bytes(b"")
    with pytest.raises(ValueError, match="axes don't match array"):
        main([str(tmp_path / "segnext.pth"), str(tmp_path / "model")])


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
