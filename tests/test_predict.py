"""`python -m segnext_jax.predict` and `Segmenter`: outputs equal the inference path, bad files are skipped.

A tiny SegNeXt keeps compilation short; every network call here has one of two shapes.
"""

import os
import sys

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
from huge_png import huge_png

from segnext_jax import Segmenter, checkpoints, models, predict
from segnext_jax.data import demo, loading
from segnext_jax.evaluation import inference

TINY = models.Variant((32, 32, 64, 64), (1, 1, 1, 1), 0.1, 64, 8)
MODEL_KWARGS = {"variant": "tiny", "num_classes": 6, "depthwise_impl": "xla"}
TEST_SCALE = (256, 128)  # the demo dataset's: a 64 x 64 image becomes 128 x 128


@pytest.fixture(scope="module")
def tiny_model():
    """The tiny model, registered as variant 'tiny' for the module: its workdirs and model directories name it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(models.VARIANTS, "tiny", TINY)
        model = models.create(**MODEL_KWARGS, rngs=nnx.Rngs(3))
        model.eval()
        yield model


@pytest.fixture(scope="module")
def workdir(tiny_model, tmp_path_factory):
    """A training workdir whose recorded config names the demo dataset, whole-image evaluation, seed 0."""
    path = str(tmp_path_factory.mktemp("workdir"))
    config = {"data": {"dataset": "demo", "test_scale": list(TEST_SCALE)}, "eval": {"mode": "whole", "seed": 0}}
    manager = checkpoints.make_manager(path, keep=1, metadata={"model": MODEL_KWARGS, "config": config})
    checkpoints.save(manager, 10, {"model": nnx.state(tiny_model)}, force=True)
    manager.wait_until_finished()
    manager.close()
    return path


def keys(*indices: int) -> jax.Array:
    return jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(0), jnp.asarray(indices))


def random_image(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, shape).astype(np.uint8)


def test_folder_run_skips_broken_file_and_matches_inference(tiny_model, workdir, tmp_path, capsys):
    folder, out = tmp_path / "images", tmp_path / "out"
    (folder / "sub").mkdir(parents=True)
    rgb, rgba = random_image((64, 64, 3), 0), random_image((64, 64, 4), 1)
    grey, large = random_image((64, 64), 2), random_image((96, 128, 3), 3)
    Image.fromarray(rgb).save(folder / "a.png")
    Image.fromarray(random_image((64, 64, 3), 4)).save(folder / "b.jpg")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a PNG")
    Image.fromarray(rgba).save(folder / "d.png")
    Image.fromarray(large).save(folder / "e.png")
    Image.fromarray(grey).save(folder / "sub" / "c.png")
    (folder / "notes.txt").write_text("not an image")

    # 64 x 64 images -> 128 x 128 inputs (whole); 96 x 128 -> 128 x 171 > max pixels -> 128 x 128 windows.
    argv = ["--checkpoint", workdir, "--input", str(folder), "--output", str(out), "--batch-size", "2"]
    argv += ["--save-logits", "--max-pixels", "20000", "--crop-size", "128", "128"]
    assert predict.main(argv) == 1
    printed = capsys.readouterr().out
    assert "segmented 5 image(s)" in printed and "(1 by sliding window)" in printed
    assert "skipped 1 file(s):\n  broken.png: " in printed

    for name, size in [("a", 64), ("b", 64), ("d", 64), ("sub/c", 64), ("e", 96)]:
        labels = cv2.imread(str(out / "labels" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        logits = np.load(out / "logits" / f"{name}.npy")
        assert labels.dtype == np.uint8 and labels.shape == logits.shape[:2] and labels.shape[0] == size
        np.testing.assert_array_equal(labels, np.argmax(logits, -1))
        overlay = cv2.imread(str(out / "overlays" / f"{name}.png"))
        assert overlay.shape[0] > labels.shape[0] and overlay.shape[1] >= max(labels.shape[1], 200)
    assert not (out / "labels" / "broken.png").exists()

    jpeg = loading.decode_image((folder / "b.jpg").read_bytes(), "b.jpg")
    options = dict(test_scale=TEST_SCALE)
    whole_ab = inference.infer_augmented_logits(tiny_model, np.stack([rgb, jpeg]), key=keys(0, 1), **options)
    whole_dc = inference.infer_augmented_logits(  # sorted order: a b broken d e sub/c
        tiny_model, np.stack([rgba[..., :3], np.repeat(grey[..., None], 3, -1)]), key=keys(3, 5), **options
    )
    slide_e = inference.infer_augmented_logits(
        tiny_model,
        np.stack([large, large]),
        key=keys(4, 4),
        mode="slide",
        crop_size=(128, 128),
        stride=(85, 85),
        **options,
    )
    for name, expected in [("a", whole_ab[0]), ("b", whole_ab[1]), ("d", whole_dc[0]), ("sub/c", whole_dc[1])]:
        np.testing.assert_allclose(np.load(out / "logits" / f"{name}.npy"), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.load(out / "logits" / "e.npy"), slide_e[0], rtol=1e-5, atol=1e-5)


def test_segmenter_returns_labels_and_probs_at_the_images_size(tiny_model, tmp_path):
    model_dir = str(tmp_path / "model")
    checkpoints.save_model(tiny_model, model_dir, {"model": MODEL_KWARGS})
    segmenter = Segmenter.from_checkpoint(model_dir)  # no recorded dataset: the demo's by its 6 classes
    assert segmenter.class_names == demo.CLASSES and segmenter.test_scale == TEST_SCALE

    grey = random_image((50, 60), 5)
    labels, probs = segmenter(grey, return_probs=True)
    assert labels.shape == (50, 60) and probs.shape == (50, 60, 6)
    logits = inference.infer_augmented_logits(
        tiny_model, np.repeat(grey[None, ..., None], 3, -1), test_scale=TEST_SCALE, key=keys(0)
    )
    np.testing.assert_allclose(probs, jax.nn.softmax(logits[0], -1), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(labels, np.argmax(probs, -1))
    np.testing.assert_array_equal(segmenter(np.dstack([grey] * 3 + [grey])), labels)  # RGBA: alpha ignored

    with pytest.raises(ValueError, match="uint8"):
        segmenter(grey.astype(np.float32))
    with pytest.raises(ValueError, match="shape"):
        segmenter(np.zeros((4, 50, 60, 3), np.uint8))


def test_pytorch_checkpoint_loads_with_dataset_presentation(tmp_path):
    from weights_conversion import save_pytorch_checkpoint

    model = models.create("t", 19, rngs=nnx.Rngs(0))
    save_pytorch_checkpoint(model, tmp_path / "segnext_t.pth")
    segmenter = Segmenter.from_checkpoint(str(tmp_path / "segnext_t.pth"))
    assert segmenter.class_names[0] == "road" and segmenter.test_scale == (2048, 1024)  # 19 classes: Cityscapes
    kernel = segmenter.model.decode_head.conv_seg.kernel[...]
    np.testing.assert_array_equal(kernel, model.decode_head.conv_seg.kernel[...])


def test_unusable_input_is_a_one_line_error(workdir, tmp_path, capsys):
    missing = os.fspath(tmp_path / "missing")
    assert predict.main(["--checkpoint", workdir, "--input", missing, "--output", str(tmp_path / "o")]) == 1
    assert capsys.readouterr().err.strip() == f"error: --input {missing}: no such file or folder"


def test_missing_checkpoint_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Image.fromarray(random_image((64, 64, 3), 0)).save(tmp_path / "a.png")
    assert predict.main(["--checkpoint", "missing.pth", "--input", "a.png", "--output", "out"]) == 1
    assert capsys.readouterr().err.strip() == "error: --checkpoint missing.pth: no such file or directory"
    with pytest.raises(FileNotFoundError, match=f"checkpoint {tmp_path / 'missing'}: no such file or directory"):
        Segmenter.from_checkpoint("missing")


def test_relative_paths_are_relative_to_the_working_directory(tiny_model, tmp_path, monkeypatch, capsys):
    checkpoints.save_model(tiny_model, str(tmp_path / "model"), {"model": MODEL_KWARGS})
    (tmp_path / "images").mkdir()
    Image.fromarray(random_image((64, 64, 3), 0)).save(tmp_path / "images" / "a.png")
    monkeypatch.chdir(tmp_path)
    argv = ["--checkpoint", "model", "--input", "images", "--output", "out", "--test-scale", "256", "128"]
    assert predict.main(argv) == 0, capsys.readouterr()
    assert (tmp_path / "out" / "labels" / "a.png").is_file() and (tmp_path / "out" / "overlays" / "a.png").is_file()
    assert Segmenter.from_checkpoint("model").num_classes == 6


@pytest.fixture
def model_spy(monkeypatch):
    """Records the shapes of the images given to the network and of the scores resized after it."""
    shapes = {"network": [], "finish": []}
    network_logits, finish = inference._network_logits, inference._finish

    def network_spy(graphdef, state, images, bases):
        shapes["network"].append(images.shape)
        return network_logits(graphdef, state, images, bases)

    def finish_spy(*args):
        result = finish(*args)
        shapes["finish"].append(result.shape)
        return result

    monkeypatch.setattr(inference, "_network_logits", network_spy)
    monkeypatch.setattr(inference, "_finish", finish_spy)
    return shapes


def test_partial_batch_runs_at_its_own_size_without_full_size_scores(workdir, tmp_path, model_spy, capsys):
    """3 images with --batch-size 4: one network call on 3 images, not 4 (no copies to fill the batch). The 64 x 64
    images enter the network at 32 x 32 (test scale 64 x 32) and the scores are never resized to 64 x 64 at once."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(random_image((64, 64, 3), i)).save(folder / f"{i}.png")
    argv = ["--checkpoint", workdir, "--input", str(folder), "--output", str(tmp_path / "out")]
    assert predict.main(argv + ["--batch-size", "4", "--test-scale", "64", "32"]) == 0, capsys.readouterr()
    assert model_spy["network"] == [(3, 32, 32, 3)]
    assert model_spy["finish"] == [(3, 32, 32, 6)]
    for i in range(3):
        assert cv2.imread(str(tmp_path / "out" / "labels" / f"{i}.png"), cv2.IMREAD_UNCHANGED).shape == (64, 64)


def test_images_over_the_pixel_limit_are_skipped_from_their_header(workdir, tmp_path, capsys):
    """A 30000 x 30000 PNG header (it cannot be decoded) is refused by default; --max-image-pixels 4096 also
    refuses an 80 x 64 image and keeps a 64 x 64 one (the limit is inclusive)."""
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(random_image((64, 64, 3), 0)).save(folder / "a.png")
    (folder / "huge.png").write_bytes(huge_png(30000, 30000))
    Image.fromarray(random_image((64, 80, 3), 1)).save(folder / "wide.png")
    argv = ["--checkpoint", workdir, "--output", str(tmp_path / "out"), "--test-scale", "64", "32"]
    assert predict.main(argv + ["--input", str(folder), "--max-image-pixels", "4096"]) == 1
    printed = capsys.readouterr().out
    assert "segmented 1 image(s)" in printed and "skipped 2 file(s):\n" in printed
    assert "  huge.png: 30000 x 30000 = 900.0 M pixels, over the limit of 4,096 (--max-image-pixels)\n" in printed
    assert "  wide.png: 80 x 64 = 5,120 pixels, over the limit of 4,096 (--max-image-pixels)\n" in printed
    assert (tmp_path / "out" / "labels" / "a.png").exists() and not (tmp_path / "out" / "labels" / "wide.png").exists()
    assert predict.main(argv + ["--input", str(folder / "huge.png")]) == 1
    printed = capsys.readouterr().out
    assert "segmented 0 image(s)" in printed
    assert "  huge.png: 30000 x 30000 = 900.0 M pixels, over the limit of 89.5 M (--max-image-pixels)\n" in printed
