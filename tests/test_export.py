"""`python -m segnext_jax.export`: the serialized artifact reproduces the model's logits for two batch sizes, and runs
in a process that has only jax (flax, segnext_jax and torch made unimportable); NMF bases baked in (a seed, or a
fixed-bases model's own) make an artifact that takes the images alone."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from segnext_jax import checkpoints, export, models
from segnext_jax.evaluation import inference

TINY = models.Variant((32, 32, 64, 64), (1, 1, 1, 1), 0.1, 64, 8)
MODEL_KWARGS = {"variant": "tiny", "num_classes": 5, "depthwise_impl": "xla"}
SEED = 7

JAX_ONLY = """
import sys
for name in ("flax", "segnext_jax", "torch", "orbax"):
    sys.modules[name] = None  # importing any of them now fails
import jax, numpy as np
exported = jax.export.deserialize(bytearray(open(sys.argv[1], "rb").read()))
np.save(sys.argv[3], np.asarray(exported.call(np.load(sys.argv[2]), np.int32(sys.argv[4]))))
"""


@pytest.fixture(scope="module")
def tiny_model():
    """The tiny model, registered as variant 'tiny' for the module: its model directories name it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(models.VARIANTS, "tiny", TINY)
        model = models.create(**MODEL_KWARGS, rngs=nnx.Rngs(4))
        model.eval()
        yield model


def test_exported_artifact_reproduces_the_model_for_two_batch_sizes(tiny_model, tmp_path, monkeypatch, capsys):
    """Relative paths (orbax takes absolute ones only), the artifact in a folder that does not exist yet."""
    checkpoints.save_model(tiny_model, str(tmp_path / "model"), {"model": MODEL_KWARGS})
    monkeypatch.chdir(tmp_path)
    output = os.path.join("artifacts", "model.jaxexport")
    assert export.main(["--checkpoint", "model", "--output", output, "--height", "40", "--width", "56"]) == 0
    assert capsys.readouterr().out.startswith(f"{output}: float32 (b, 40, 56, 3) normalised images + int32 seed -> ")
    artifact = str(tmp_path / output)

    images = np.random.RandomState(0).randn(2, 40, 56, 3).astype(np.float32)
    keys = inference.image_keys(jax.random.key(SEED), 2)  # what the artifact derives from the seed
    expected = np.concatenate(
        [inference.infer_logits(tiny_model, images[n : n + 1], key=keys[n : n + 1]) for n in (0, 1)]
    )
    exported = export.load_exported(artifact)
    np.testing.assert_allclose(exported.call(images[:1], np.int32(SEED)), expected[:1], rtol=1e-5, atol=1e-6)
    other_seed = exported.call(images[:1], np.int32(SEED + 1))  # the seed drives the NMF bases
    assert not np.allclose(other_seed, expected[:1], atol=1e-3)

    np.save(tmp_path / "images.npy", images)
    command = [sys.executable, "-c", JAX_ONLY, artifact, str(tmp_path / "images.npy"), str(tmp_path / "out.npy")]
    subprocess.run([*command, str(SEED)], check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, cwd=tmp_path)
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, rtol=1e-5, atol=1e-6)


def test_baked_bases_from_a_seed_and_from_a_fixed_bases_model(tiny_model, tmp_path, capsys):
    """--nmf_bases=seed:N: every image gets the bases infer_logits draws for a lone image with key(N), whatever the
    batch; a fixed-bases model's artifact uses its stored bases. Both take the images alone."""
    checkpoints.save_model(tiny_model, str(tmp_path / "model"), {"model": MODEL_KWARGS})
    output = str(tmp_path / "seeded.jaxexport")
    argv = ["--checkpoint", str(tmp_path / "model"), "--output", output, "--height", "40", "--width", "56"]
    assert export.main([*argv, "--nmf_bases=seed:3"]) == 0
    assert "normalised images (NMF bases baked in) -> logits (b, 40, 56, 5)" in capsys.readouterr().out
    images = np.random.RandomState(1).randn(2, 40, 56, 3).astype(np.float32)
    exported = export.load_exported(output)
    assert len(exported.in_avals) == 1
    seeded = exported.call(images)
    for n in (0, 1):
        expected = inference.infer_logits(tiny_model, images[n : n + 1], key=jax.random.key(3))
        np.testing.assert_allclose(seeded[n : n + 1], expected, rtol=1e-5, atol=1e-6)

    fixed = models.create(**{**MODEL_KWARGS, "variant": TINY}, nmf_bases="fixed", rngs=nnx.Rngs(4))
    fixed.eval()
    stored = export.export_model(fixed, 40, 56).call(images)
    for n in (0, 1):  # the same weights as tiny_model (same rngs), with the stored bases
        expected = inference.infer_logits(tiny_model, images[n : n + 1], nmf_bases=fixed.fixed_nmf_bases(1))
        np.testing.assert_allclose(stored[n : n + 1], expected, rtol=1e-5, atol=1e-6)


def test_a_native_model_is_exported_without_the_native_kernels():
    """A model built with 'auto' (the C++ kernels on CPU) exports its depth-wise convolutions in the 'portable' form:
    no call into this package's kernels, which a jax-only process does not have."""
    model = models.create(TINY, 5, rngs=nnx.Rngs(0), depthwise_impl="native")
    model.eval()
    exported = export.export_model(model, 32, 32)
    assert "segnext_depthwise" not in exported.mlir_module()
    # the model itself keeps its implementation
    assert (
        "segnext_depthwise" in jax.jit(lambda x: model(x, rngs=nnx.Rngs(0))).lower(np.zeros((1, 32, 32, 3))).as_text()
    )


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err.rstrip("\n")


def test_command_line_errors(tmp_path, monkeypatch, capsys):
    """A user's mistake is one line (argparse's usage + one line for the sizes); nothing is loaded or written."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    os.mkdir("empty_folder")

    def run(checkpoint="notes.txt", output="model.jaxexport", height="32", width="32"):
        return export.main(["--checkpoint", checkpoint, "--output", output, "--height", height, "--width", width])

    assert run(checkpoint="missing") == 1
    assert one_line_error(capsys) == "error: --checkpoint missing: no such file or directory"
    assert run(output=os.path.join("notes.txt", "model.jaxexport")) == 1
    assert one_line_error(capsys).endswith(f"cannot be created, {tmp_path / 'notes.txt'} is a file, not a folder")
    assert run(output="empty_folder") == 1
    assert "--output empty_folder is a folder" in one_line_error(capsys)
    assert run() == 1
    assert f"error: {tmp_path / 'notes.txt'}: not a PyTorch checkpoint" in one_line_error(capsys)
    assert run(checkpoint="empty_folder") == 1
    assert str(tmp_path / "empty_folder") in one_line_error(capsys)
    for size, reason in [("0", "0: give a size in pixels > 0"), ("-8", "-8: give a size"), ("x", "'x' is not an int")]:
        for name in ("height", "width"):
            with pytest.raises(SystemExit) as info:
                run(**{name: size})
            assert info.value.code == 2 and f"argument --{name}: {reason}" in capsys.readouterr().err
    assert sorted(os.listdir()) == ["empty_folder", "notes.txt"]


def test_command_line_option_errors(tmp_path, monkeypatch, capsys):
    """Options of the other format, missing sizes, a bad --nmf_bases: argparse errors; no jax2onnx: one line."""
    from segnext_jax import onnx_export

    monkeypatch.chdir(tmp_path)
    base = ["--checkpoint", "model", "--output", "model.out"]
    size = ["--height", "32", "--width", "32"]
    cases = [
        ([*base, *size, "--dynamic_size", "--format=onnx"], "--dynamic_size takes any height and width"),
        ([*base, "--height", "32"], "required: --height, --width (or, for onnx, --dynamic_size)"),
        ([*base, "--dynamic_size"], "--dynamic_size and --nmf_bases=input apply to --format=onnx only"),
        ([*base, *size, "--nmf_bases=input"], "--dynamic_size and --nmf_bases=input apply to --format=onnx only"),
        ([*base, *size, "--format=onnx", "--platforms", "cpu"], "--platforms applies to --format=jaxexport only"),
        ([*base, *size, "--nmf_bases=seed:x"], "give seed:N (N an integer >= 0, e.g. seed:0) or input"),
        ([*base, *size, "--format=tflite"], "invalid choice: 'tflite'"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as info:
            export.main(argv)
        assert info.value.code == 2 and message in capsys.readouterr().err, argv

    def missing():
        raise onnx_export.OnnxExportUnavailable("ONNX export needs jax2onnx and onnx (No module named 'jax2onnx')")

    (tmp_path / "model.pth").write_bytes(b"")
    monkeypatch.setattr(onnx_export, "require_jax2onnx", missing)
    assert export.main(["--checkpoint", "model.pth", "--output", "m.onnx", *size, "--format=onnx"]) == 1
    assert one_line_error(capsys) == "error: ONNX export needs jax2onnx and onnx (No module named 'jax2onnx')"
    assert sorted(os.listdir()) == ["model.pth"]


def test_command_line_keeps_the_traceback_of_a_bug(tmp_path, monkeypatch):
    """Only bad checkpoints are one-line errors: a ValueError from inside the loading is not hidden."""
    from segnext_jax.serving import loading

    def bug(path):
        raise ValueError("axes don't match array")

    monkeypatch.setattr(loading, "load", bug)
    (tmp_path / "model.pth").write_bytes(b"")
    argv = ["--checkpoint", str(tmp_path / "model.pth"), "--output", str(tmp_path / "m.jaxexport")]
    with pytest.raises(ValueError, match="axes don't match array"):
        export.main([*argv, "--height", "32", "--width", "32"])
