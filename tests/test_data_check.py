"""The data check CLI on a fake ADE20K tree seeded with every kind of bad file, and on clean data."""

import os
import subprocess
import sys
import warnings

import cv2
import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
import data_fakes
from huge_png import huge_png

from segnext_jax.data import check, datasets, loading

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _break(root: str) -> dict[str, str]:
    """Damages a fake ADE20K training split; returns {bad path: expected reason fragment}."""
    images, labels = f"{root}/images/training", f"{root}/annotations/training"

    def stem(i: int) -> str:
        return f"ADE_train_{i:08d}"

    def image_shape(i: int) -> tuple[int, int]:
        with open(f"{images}/{stem(i)}.jpg", "rb") as f:
            return loading.decode_image(f.read(), "image").shape[:2]

    with open(f"{images}/{stem(0)}.jpg", "r+b") as f:  # cut short in the middle of the scan
        f.truncate(os.path.getsize(f"{images}/{stem(0)}.jpg") // 2)
    with open(f"{images}/{stem(1)}.jpg", "wb") as f:  # not an image at all
        f.write(np.random.default_rng(0).integers(0, 256, 500, np.uint8).tobytes())
    os.remove(f"{labels}/{stem(2)}.png")
    data_fakes.write_label(f"{labels}/{stem(3)}.png", np.ones((10, 10), np.uint8))  # wrong size
    shape = image_shape(4)
    out_of_range = np.ones(shape, np.uint8)
    out_of_range[0, 0] = 200
    data_fakes.write_label(f"{labels}/{stem(4)}.png", out_of_range)
    shape = image_shape(5)
    Image.fromarray(np.ones(shape, np.uint16)).save(f"{labels}/{stem(5)}.png")  # 16-bit label
    shape = image_shape(6)
    Image.fromarray(np.ones((*shape, 3), np.uint8)).save(f"{labels}/{stem(6)}.png")  # colour label
    open(f"{images}/{stem(7)}.jpg", "wb").close()  # empty
    with open(f"{labels}/{stem(8)}.png", "r+b") as f:  # label cut short
        f.truncate(60)
    shape = image_shape(9)
    data_fakes.write_label(f"{labels}/{stem(9)}.png", np.full(shape, 3, np.uint8), mode="P")  # palette: fine
    with open(f"{images}/{stem(10)}.jpg", "ab") as f:  # bytes after the end-of-image marker: fine
        f.write(b"\x00" * 300)
    with open(f"{images}/{stem(11)}.jpg", "wb") as f:  # both files of one pair bad: both reported
        f.write(b"GIF89a")
    Image.fromarray(np.ones((4, 4, 4), np.uint8)).save(f"{labels}/{stem(11)}.png")
    data_fakes.write_label(f"{labels}/orphan.png", np.ones((8, 8), np.uint8))  # no image
    return {
        f"{images}/{stem(0)}.jpg": "truncated JPEG",
        f"{images}/{stem(1)}.jpg": "not a decodable image",
        f"{labels}/{stem(2)}.png": "file missing",
        f"{labels}/{stem(3)}.png": "label size 10x10 differs from image size",
        f"{labels}/{stem(4)}.png": "label values 199 after reduce_zero_label are outside 0..149 and not 255",
        f"{labels}/{stem(5)}.png": "16/32-bit label (PIL mode I;16)",
        f"{labels}/{stem(6)}.png": "colour label (PIL mode RGB)",
        f"{images}/{stem(7)}.jpg": "empty file",
        f"{labels}/{stem(8)}.png": "truncated PNG",
        f"{labels}/orphan.png": "label file has no matching image",
        f"{images}/{stem(11)}.jpg": "not a decodable image",
        f"{labels}/{stem(11)}.png": "colour label (PIL mode RGBA)",
    }


def test_check_reports_every_bad_file_once(tmp_path, capsys):
    root = data_fakes.make_ade20k(str(tmp_path / "ade"), num_train=12, num_val=2)
    expected = _break(root)
    assert check.main(["--dataset=ade20k", f"--root={root}", "--threads=2"]) == 1
    lines = capsys.readouterr().out.splitlines()
    reported = dict(line.split(": ", 1) for line in lines)
    assert len(lines) == len(reported) == len(expected)
    for path, reason in expected.items():
        assert reason in reported[path], (path, reported[path])


def test_loader_rejects_out_of_range_without_reduce_zero_label(tmp_path):
    image = str(tmp_path / "a.png")
    data_fakes.write_image(image, 8, 8, seed=0)
    data_fakes.write_label(str(tmp_path / "a_label.png"), np.array([[19, 255] * 4] * 8, np.uint8))
    record = {"image": image, "label": str(tmp_path / "a_label.png"), "name": "a"}
    with pytest.raises(loading.BadExampleError, match="label values 19 are outside 0..18 and not 255"):
        loading.load_example(record, datasets.DATASETS["cityscapes"])


def test_check_cli_on_clean_and_missing_data(tmp_path):
    root = data_fakes.make_cityscapes(str(tmp_path / "city"))
    command = [sys.executable, "-m", "segnext_jax.data.check", "--dataset=cityscapes", f"--root={root}"]
    clean = subprocess.run(command, capture_output=True, text=True, cwd=_REPO, check=False)
    assert clean.returncode == 0 and "cityscapes (train,val) is clean: 8 examples checked" in clean.stdout
    missing = str(tmp_path / "none")
    assert check.main(["--dataset=cityscapes", f"--root={missing}"]) == 2


def test_check_accepts_demo_data(capsys):
    assert check.main(["--dataset=demo", "--splits=val"]) == 0
    assert "demo (val) is clean: 100 examples checked" in capsys.readouterr().out


def test_oversized_files_are_reported_from_their_header(tmp_path, monkeypatch, capsys):
    """A 30000 x 30000 PNG (a few hundred bytes; it cannot be decoded) as an image and as a label: each reported on
    one line; OpenCV never sees it. A lower --max_image_pixels flags ordinary files too."""
    root = data_fakes.make_ade20k(str(tmp_path / "ade"), num_train=3, num_val=2)
    image = f"{root}/images/training/ADE_train_00000000.jpg"
    label = f"{root}/annotations/training/ADE_train_00000001.png"
    for path in (image, label):
        with open(path, "wb") as f:
            f.write(huge_png(30000, 30000))
    imdecode = cv2.imdecode

    def small_only(data, flags):
        assert len(data) != len(huge_png(30000, 30000)), "the oversized image was decoded"
        return imdecode(data, flags)

    monkeypatch.setattr(cv2, "imdecode", small_only)
    assert check.main(["--dataset=ade20k", f"--root={root}", "--threads=2"]) == 1
    reason = "30000 x 30000 = 900.0 M pixels, over the limit of 89.5 M (config.data.max_image_pixels)"
    assert capsys.readouterr().out.splitlines() == sorted([f"{image}: {reason}", f"{label}: {reason}"])

    # Validation images are 56 x 40 = 2240 and 54 x 44 = 2376 pixels (image and label alike).
    assert check.main(["--dataset=ade20k", f"--root={root}", "--splits=val", "--max_image_pixels=2300"]) == 1
    stem = f"{root}/%s/validation/ADE_val_00000001"
    reason = "54 x 44 = 2,376 pixels, over the limit of 2,300 (config.data.max_image_pixels)"
    expected = [f"{stem % 'annotations'}.png: {reason}", f"{stem % 'images'}.jpg: {reason}"]
    assert capsys.readouterr().out.splitlines() == expected


def test_size_limit_needs_no_decoder_and_raises_no_pil_warning():
    """Above PIL's own limit PIL warns (an exception under -W error) and above twice it raises before the size can
    be read; the loader reads it all the same and reports one line. Above OpenCV's own limit (2^30 pixels), an
    image accepted by a raised limit is a bad example too, not an OpenCV traceback."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for decode in (loading.decode_image, loading.decode_label):
            for side in (10000, 30000):
                with pytest.raises(loading.BadExampleError, match=f"^x.png: {side} x {side} = .* over the limit of"):
                    decode(huge_png(side, side), "x.png")
    assert Image.MAX_IMAGE_PIXELS == loading.DEFAULT_MAX_IMAGE_PIXELS  # PIL's own check is back on
    assert str(loading.BadExampleError("x.png", "a library's\n  message")) == "x.png: a library's message"
    with pytest.raises(loading.BadExampleError, match=r"^x.png: not a decodable image \(OpenCV: .*\)$"):
        loading.decode_image(huge_png(40000, 40000), "x.png", max_image_pixels=2 * 10**9)
