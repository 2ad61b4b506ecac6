"""`python -m segnext_jax.export`: the serialized artifact reproduces the model's logits for two batch sizes, and runs
in a process that has only jax (flax, segnext_jax and torch made unimportable)."""

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
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(models.VARIANTS, "tiny", TINY)
        model = models.create(**MODEL_KWARGS, rngs=nnx.Rngs(4))
        model.eval()
        yield model


def test_exported_artifact_reproduces_the_model_for_two_batch_sizes(tiny_model, tmp_path, capsys):
    checkpoints.save_model(tiny_model, str(tmp_path / "model"), {"model": MODEL_KWARGS})
    artifact = str(tmp_path / "model.jaxexport")
    argv = ["--checkpoint", str(tmp_path / "model"), "--output", artifact, "--height", "40", "--width", "56"]
    assert export.main(argv) == 0
    assert "logits (b, 40, 56, 5)" in capsys.readouterr().out

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


def test_a_native_model_is_exported_without_the_native_kernels():
    """A model built with 'auto' (the C++ kernels on CPU) exports its depth-wise convolutions in the 'portable' form:
    no call into this package's kernels, which a jax-only process does not have."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(models.VARIANTS, "tiny", TINY)
        model = models.create("tiny", 5, rngs=nnx.Rngs(0), depthwise_impl="native")
    model.eval()
    exported = export.export_model(model, 32, 32)
    assert "segnext_depthwise" not in exported.mlir_module()
    # the model itself keeps its implementation
    assert (
        "segnext_depthwise" in jax.jit(lambda x: model(x, rngs=nnx.Rngs(0))).lower(np.zeros((1, 32, 32, 3))).as_text()
    )
