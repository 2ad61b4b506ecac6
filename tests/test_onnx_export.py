"""ONNX export (jax2onnx): onnxruntime on CPU reproduces the JAX model's whole-image logits with a dynamic batch, for
a fixed size (padded to 32 inside) and for dynamic sizes; NMF bases baked in (a fixed-bases model's own, or a seed's)
or given as an input; the README's snippet runs with numpy and onnxruntime alone."""

import contextlib
import io
import os
import subprocess
import sys

import jax
import numpy as np
import onnxruntime as ort
import pytest
from flax import nnx

from segnext_jax import checkpoints, export, models, onnx_export
from segnext_jax.data.transforms import normalize
from segnext_jax.evaluation import inference

TINY = models.Variant((32, 32, 64, 64), (1, 1, 1, 1), 0.1, 64, 8)
MODEL_KWARGS = {"variant": "tiny", "num_classes": 5, "depthwise_impl": "shift_add"}  # in the graph: grouped convs
BASES_SHAPE = (1, 64, 8)  # (S, D, R) of the tiny variant
RTOL = 1e-4  # max |onnxruntime - JAX| / max |JAX|; measured about 2e-6 (float32 rounding of other kernels)

# The README's snippet: numpy and onnxruntime only; `rgb` is an (H, W, 3) uint8 RGB image.
SNIPPET = """\
import numpy as np, onnxruntime as ort
session = ort.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])
mean, std = np.float32([123.675, 116.28, 103.53]), np.float32([58.395, 57.12, 57.375])  # ImageNet, RGB
logits = session.run(["logits"], {"images": ((rgb - mean) / std)[None]})[0]  # (1, H, W, classes)
labels = logits[0].argmax(-1)  # (H, W) class indices
"""

NO_JAX = """
import sys
for name in ("jax", "jaxlib", "flax", "segnext_jax", "torch", "jax2onnx", "onnx"):
    sys.modules[name] = None  # importing any of them now fails
import numpy as np
rgb = np.load("rgb.npy")
exec(open("snippet.py").read())
np.save("logits.npy", logits)
np.save("labels.npy", labels)
"""


@pytest.fixture(scope="module", autouse=True)
def tiny_variant():
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(models.VARIANTS, "tiny", TINY)
        yield


@pytest.fixture(scope="module")
def fixed_model():
    model = models.create(**MODEL_KWARGS, nmf_bases="fixed", rngs=nnx.Rngs(4))
    model.eval()
    return model


@pytest.fixture(scope="module")
def random_model():
    model = models.create(**MODEL_KWARGS, rngs=nnx.Rngs(5))
    model.eval()
    return model


@pytest.fixture(scope="module")
def cli_export(fixed_model, tmp_path_factory):
    """`python -m segnext_jax.export --format=onnx` of a fixed-bases model directory at 40x56: (folder, stdout)."""
    folder = tmp_path_factory.mktemp("onnx")
    checkpoints.save_model(fixed_model, str(folder / "model"), {"model": {**MODEL_KWARGS, "nmf_bases": "fixed"}})
    argv = ["--format=onnx", "--checkpoint", str(folder / "model"), "--output", str(folder / "model.onnx")]
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert export.main([*argv, "--height", "40", "--width", "56"]) == 0
    return folder, out.getvalue()


def session(proto_or_path) -> ort.InferenceSession:
    model = proto_or_path if isinstance(proto_or_path, str) else proto_or_path.SerializeToString()
    return ort.InferenceSession(model, providers=["CPUExecutionProvider"])


def dims(value) -> list:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def assert_close(ours: np.ndarray, expected) -> None:
    expected = np.asarray(expected)
    assert ours.shape == expected.shape and ours.dtype == np.float32
    error = float(np.abs(ours - expected).max() / np.abs(expected).max())
    print(f"relative error of the onnxruntime logits {error:.1e}")
    assert error <= RTOL


def test_command_line_export_of_a_fixed_bases_model(fixed_model, cli_export):
    """Any batch size at the exported size; the stored bases baked in; grouped convolutions, no loop, no custom op."""
    folder, out = cli_export
    assert out == (
        f"{folder / 'model.onnx'}: ONNX opset 23: images float32 (batch, 40, 56, 3) -> logits float32 "
        "(batch, 40, 56, 5); NMF bases baked in\n"
    )
    import onnx

    proto = onnx.load(str(folder / "model.onnx"))
    assert [value.name for value in proto.graph.input] == ["images"]
    assert dims(proto.graph.input[0]) == ["batch", 40, 56, 3] and dims(proto.graph.output[0]) == ["batch", 40, 56, 5]
    ops = {node.op_type for node in proto.graph.node}
    assert not ops & {"Loop", "Scan", "If"} and {node.domain for node in proto.graph.node} <= {"", "ai.onnx"}
    groups = [a.i for node in proto.graph.node if node.op_type == "Conv" for a in node.attribute if a.name == "group"]
    assert max(groups) == 256  # the depth-wise convolutions of stage 1's feed-forward (32 x 8 channels)

    runtime = session(str(folder / "model.onnx"))
    for batch in (1, 3):
        images = np.random.RandomState(batch).randn(batch, 40, 56, 3).astype(np.float32)
        expected = inference.infer_logits(fixed_model, images, nmf_bases=fixed_model.fixed_nmf_bases(batch))
        assert_close(runtime.run(None, {"images": images})[0], expected)


def test_dynamic_size_with_the_bases_as_an_input(random_model):
    """Height and width free (multiples of 32): two sizes and two batch sizes, the reference's random bases given."""
    proto = onnx_export.export_onnx(random_model, nmf_bases_input=True)
    assert [value.name for value in proto.graph.input] == ["images", "nmf_bases"]
    assert dims(proto.graph.input[0]) == ["batch", "height", "width", 3]
    assert dims(proto.graph.input[1]) == ["batch", *BASES_SHAPE]
    runtime = session(proto)
    rng = np.random.RandomState(0)
    for batch, height, width in ((2, 64, 96), (1, 32, 64)):
        images = rng.randn(batch, height, width, 3).astype(np.float32)
        bases = rng.rand(batch, *BASES_SHAPE).astype(np.float32)
        bases /= np.linalg.norm(bases, axis=2, keepdims=True)
        expected = inference.infer_logits(random_model, images, nmf_bases=bases.reshape(-1, *BASES_SHAPE[1:]))
        assert_close(runtime.run(None, {"images": images, "nmf_bases": bases})[0], expected)


def test_a_random_bases_model_gets_the_bases_of_seed_0_for_each_image(random_model):
    """By default (and with nmf_seed=N likewise, as jaxexport's --nmf_bases=seed:N): each image of the batch gets what
    infer_logits(image[None], key=key(0)) gives it."""
    runtime = session(onnx_export.export_onnx(random_model, 32, 32))
    images = np.random.RandomState(3).randn(2, 32, 32, 3).astype(np.float32)
    logits = runtime.run(None, {"images": images})[0]
    for n in (0, 1):
        assert_close(logits[n : n + 1], inference.infer_logits(random_model, images[n : n + 1], key=jax.random.key(0)))
    with pytest.raises(ValueError, match="choose one"):
        onnx_export.export_onnx(random_model, 32, 32, nmf_seed=3, nmf_bases_input=True)
    with pytest.raises(ValueError, match="give both height and width"):
        onnx_export.export_onnx(random_model, 32)


def test_readme_snippet_runs_with_numpy_and_onnxruntime_only(fixed_model, cli_export, tmp_path):
    folder, _ = cli_export
    rgb = np.random.RandomState(7).randint(0, 256, (40, 56, 3), dtype=np.uint8)
    os.symlink(folder / "model.onnx", tmp_path / "model.onnx")
    np.save(tmp_path / "rgb.npy", rgb)
    (tmp_path / "snippet.py").write_text(SNIPPET)
    assert len(SNIPPET.splitlines()) == 5
    subprocess.run([sys.executable, "-c", NO_JAX], check=True, cwd=tmp_path)

    expected = np.asarray(
        inference.infer_logits(fixed_model, normalize(rgb)[None], nmf_bases=fixed_model.fixed_nmf_bases(1))
    )
    assert_close(np.load(tmp_path / "logits.npy"), expected)
    labels = np.load(tmp_path / "labels.npy")
    assert labels.shape == (40, 56) and np.mean(labels == expected[0].argmax(-1)) > 0.99
