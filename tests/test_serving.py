"""segnext_jax.serving: one loader for every checkpoint kind, the shared helpers (batching by size, per-image keys,
drawing), how command lines report our bugs, and a package that never imports the converter."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from segnext_jax import checkpoints, console, models
from segnext_jax.evaluation import inference
from segnext_jax.serving import drawing, loading
from segnext_jax.serving.batching import batches_by_size
from weights_conversion import save_pytorch_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = models.Variant((32, 32, 64, 64), (1, 1, 1, 1), 0.1, 64, 8)
MODEL_KWARGS = {"variant": "tiny", "num_classes": 6, "depthwise_impl": "xla"}


@pytest.fixture(scope="module")
def tiny_model():
    """The tiny model, registered as variant 'tiny' for the module: checkpoints record it by name, and a .pth's
    variant is recognised among the registered ones."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(models.VARIANTS, "tiny", TINY)
        model = models.create(**MODEL_KWARGS, rngs=nnx.Rngs(2))
        model.eval()
        yield model


def _weights(model: nnx.Module) -> list[np.ndarray]:
    return [np.asarray(leaf) for leaf in jax.tree.leaves(nnx.state(model, nnx.Param))]


def _assert_same_weights(got: nnx.Module, want: nnx.Module) -> None:
    for a, b in zip(_weights(got), _weights(want), strict=True):
        np.testing.assert_array_equal(a, b)


def test_load_reads_a_workdir_a_model_directory_and_a_pytorch_file(tiny_model, tmp_path, monkeypatch):
    """One entry point: the model with what was recorded (a workdir's step and config, a model
    directory's segnext.json, nothing for a .pth); relative paths from the working directory."""
    config = {"data": {"dataset": "demo"}}
    metadata = {"model": MODEL_KWARGS, "config": config}
    manager = checkpoints.make_manager(str(tmp_path / "run"), keep=2, metadata=metadata)
    for step in (3, 5):
        checkpoints.save(manager, step, {"model": nnx.state(tiny_model)}, force=True)
    checkpoints.wait_for_saves(manager)
    manager.close()
    checkpoints.save_model(tiny_model, str(tmp_path / "model"), {"model": MODEL_KWARGS})
    save_pytorch_checkpoint(tiny_model, tmp_path / "model.pth")
    monkeypatch.chdir(tmp_path)

    model, metadata = loading.load("run")
    assert metadata == {"model": MODEL_KWARGS, "config": config, "step": 5}
    _assert_same_weights(model, tiny_model)
    assert loading.load("run", 3)[1]["step"] == 3
    model, metadata = loading.load("model")
    assert metadata["model"] == MODEL_KWARGS and checkpoints.CHECKSUMS in metadata
    _assert_same_weights(model, tiny_model)
    model, metadata = loading.load("model.pth")
    assert metadata == {}
    _assert_same_weights(model, tiny_model)

    with pytest.raises(FileNotFoundError, match=f"^checkpoint {tmp_path / 'missing'}: no such file or directory$"):
        loading.load("missing")
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    with pytest.raises(loading.CHECKPOINT_ERRORS, match="notes.txt: not a PyTorch checkpoint"):
        loading.load("notes.txt")


def test_batches_group_one_size_and_bound_the_waiting_images():
    shapes = [(2, 2, 3), (3, 3, 3), (2, 2, 3), (4, 4, 3), (5, 5, 3), (6, 6, 3), (2, 2, 3)]
    items = list(enumerate(shapes))
    batches = [[index for index, _ in batch] for batch in batches_by_size(items, 2, lambda item: item[1])]
    # 0 and 2 fill a batch; when 5 images wait (at 6), the oldest group (1) goes alone; the rest at the end.
    assert batches == [[0, 2], [1], [3], [4], [5], [6]]


def test_image_keys_follow_the_index_alone():
    key = jax.random.key(4)
    keys = inference.indexed_keys(key, [5, 2])
    for got, index in zip(keys, (5, 2)):
        np.testing.assert_array_equal(jax.random.key_data(got), jax.random.key_data(jax.random.fold_in(key, index)))
    np.testing.assert_array_equal(
        jax.random.key_data(inference.image_keys(key, 3)), jax.random.key_data(inference.indexed_keys(key, [0, 1, 2]))
    )


def test_comparison_panel_is_image_ground_truth_prediction():
    image = np.full((2, 2, 3), 100, np.uint8)
    label = np.array([[0, 255], [1, 0]])
    prediction = np.array([[1, 1], [0, 0]])
    palette = np.array([(0, 0, 0), (200, 100, 0)], np.uint8)
    panel = drawing.comparison_panel(image, label, prediction, palette)
    class0, class1 = [50, 50, 50], [150, 100, 50]  # half image, half class colour
    np.testing.assert_array_equal(panel[:, :2], image)
    np.testing.assert_array_equal(panel[:, 2:4], [[class0, [100, 100, 100]], [class1, class0]])  # 255: the image
    np.testing.assert_array_equal(panel[:, 4:], [[class1, class1], [class0, class0]])


def test_overlay_with_legend_paints_the_classes_over_the_image():
    image = np.full((8, 240, 3), 100, np.uint8)
    labels = np.zeros((8, 240), np.int64)
    labels[:, 120:] = 2
    palette = drawing.default_palette(3)
    picture = drawing.overlay_with_legend(image, labels, ["a", "b", "c"], palette)
    assert picture.shape[1] == 240 and picture.shape[0] > 8  # the legend below
    np.testing.assert_array_equal(picture[:8], drawing.colorize(labels, image, palette))


def test_a_command_line_bug_keeps_its_traceback_with_a_hint_to_report_it(tmp_path):
    """`python -m segnext_jax.predict` meeting an exception that is no user error (here planted in the loader):
    its traceback, then the hint, exit status 1."""
    (tmp_path / "model.pth").write_bytes(b"")
    script = (
        "import runpy, sys\n"
        "from segnext_jax.serving import loading\n"
        "def bug(*args, **kwargs):\n"
        '    raise ValueError("axes don\'t match array")\n'
        "loading.load = bug\n"
        "sys.argv = ['predict', '--checkpoint', 'model.pth', '--input', 'images', '--output', 'out']\n"
        "runpy.run_module('segnext_jax.predict', run_name='__main__')\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 1
    assert "Traceback (most recent call last):" in result.stderr
    assert "ValueError: axes don't match array\n" in result.stderr
    assert result.stderr.rstrip("\n").endswith(console.BUG_HINT)


def test_reporting_bugs_passes_results_and_exits_through(capsys):
    assert console.reporting_bugs(lambda: 3)() == 3
    with pytest.raises(SystemExit) as exited:
        console.reporting_bugs(lambda: sys.exit("error: a user's mistake"))()
    assert exited.value.code == "error: a user's mistake" and capsys.readouterr().err == ""


def test_the_package_never_imports_the_converter():
    """weights_conversion depends on segnext_jax, never the other way: no entry point or module loads it."""
    script = (
        "import sys\n"
        "import segnext_jax.main, segnext_jax.predict, segnext_jax.export, segnext_jax.onnx_export\n"
        "import segnext_jax.evaluation.evaluate, segnext_jax.serving.folder\n"
        "from segnext_jax import Segmenter\n"
        "print(sorted(name for name in sys.modules if name.startswith('weights_conversion')))\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
