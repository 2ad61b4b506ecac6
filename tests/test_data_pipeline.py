"""grain pipelines on tiny fake datasets: batches, determinism, host sharding, exact resume, bad examples,
evaluation examples, the demo data, global batches and the TFDS ArrayRecord round trip."""

import importlib.util
import os
import sys

import grain
import numpy as np
import pytest
from absl import flags

sys.path.insert(0, os.path.dirname(__file__))
import data_fakes
from huge_png import huge_png

from segnext_jax.data import datasets, demo, loading, pipeline, sources, transforms

CROP = (32, 32)
SCALE = (96, 32)


@pytest.fixture(scope="module")
def ade(tmp_path_factory) -> str:
    return data_fakes.make_ade20k(str(tmp_path_factory.mktemp("ade")), num_train=6, num_val=3)


def _train(root, name="ade20k", **kwargs):
    options = {"crop_size": CROP, "scale": SCALE, "global_batch_size": 4, "seed": 0, "num_workers": 0}
    options.update(kwargs)
    return pipeline.make_train_dataset(name, root, **options)


def _take(iterator, count: int) -> list[dict[str, np.ndarray]]:
    return [next(iterator) for _ in range(count)]


def _assert_same_batches(first: list[dict], second: list[dict]) -> None:
    assert len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        assert a.keys() == b.keys() == {"image", "label"}
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])


def test_train_batches_are_normalised_crops_and_reproducible(ade):
    batches = _take(iter(_train(ade)), 4)
    image, label = batches[0]["image"], batches[0]["label"]
    assert image.shape == (4, *CROP, 3) and image.dtype == np.float32
    assert label.shape == (4, *CROP) and label.dtype == np.int32
    values = np.unique(np.concatenate([b["label"].ravel() for b in batches]))
    assert values.min() >= 0 and set(values[values >= 150]) <= {255} and len(values) > 20
    lowest = (0 - transforms.IMAGENET_MEAN) / transforms.IMAGENET_STD  # black is the darkest normalised pixel
    assert (image >= lowest - 1e-6).all() and np.abs(image).max() < 3.0
    _assert_same_batches(batches, _take(iter(_train(ade)), 4))
    other_seed = next(iter(_train(ade, seed=1)))
    assert not np.array_equal(other_seed["image"], image)


def test_hosts_share_the_global_batch_exactly(ade):
    single = _take(iter(_train(ade, process_index=0, process_count=1)), 3)
    hosts = [_take(iter(_train(ade, process_index=p, process_count=2)), 3) for p in (0, 1)]
    for step, batch in enumerate(single):
        for p in (0, 1):
            assert hosts[p][step]["image"].shape[0] == 2
            np.testing.assert_array_equal(hosts[p][step]["image"], batch["image"][p::2])
            np.testing.assert_array_equal(hosts[p][step]["label"], batch["label"][p::2])
    with pytest.raises(ValueError, match="not divisible by 3 processes"):
        _train(ade, process_index=0, process_count=3)


def test_restored_iterator_yields_the_next_batches(ade):
    iterator = iter(_train(ade))
    _take(iterator, 2)
    state = iterator.get_state()
    expected = _take(iterator, 3)  # crosses the epoch boundary (6 images, 4 per batch)
    restored = iter(_train(ade))
    restored.set_state(state)
    _assert_same_batches(_take(restored, 3), expected)


def _with_corrupt_image(tmp_path, index: int) -> tuple[str, str]:
    root = data_fakes.make_ade20k(str(tmp_path / "ade_bad"), num_train=6, num_val=1)
    bad = f"{root}/images/training/ADE_train_{index:08d}.jpg"
    with open(bad, "r+b") as f:
        f.truncate(200)
    return root, bad


def _bad_positions_until(root: str, bad: str, seed: int, num_good: int) -> int:
    """How many bad examples precede the num_good-th good one in the seeded shuffled stream."""
    records = datasets.list_examples(datasets.DATASETS["ade20k"], root, "train")
    order = grain.MapDataset.source(records).seed(seed).shuffle().repeat()
    good = skipped = 0
    for position in range(10 * num_good):
        if order[position]["image"] == bad:
            skipped += 1
        else:
            good += 1
            if good == num_good:
                return skipped
    raise AssertionError("unreachable")


def test_bad_example_is_skipped_and_counted_or_stops(tmp_path):
    root, bad = _with_corrupt_image(tmp_path, 2)
    iterator = iter(_train(root, bad_example="skip"))
    _take(iterator, 5)
    assert iterator.num_skipped == _bad_positions_until(root, bad, 0, 20) >= 2
    state = iterator.get_state()
    restored = iter(_train(root, bad_example="skip"))
    restored.set_state(state)
    assert restored.num_skipped == iterator.num_skipped
    with pytest.raises(pipeline.BadDataError, match=f"{bad}: truncated JPEG"):
        _take(iter(_train(root, bad_example="stop")), 5)


def test_oversized_label_or_image_is_skipped_and_counted_or_stops_in_one_line(tmp_path):
    """A 30000 x 30000 PNG header as example 2's label, then as example 4's image (written over the JPEG)."""
    root = data_fakes.make_ade20k(str(tmp_path / "ade_huge"), num_train=6, num_val=1)
    image = f"{root}/images/training/ADE_train_%08d.jpg"
    label = f"{root}/annotations/training/ADE_train_%08d.png"
    reason = "30000 x 30000 = 900.0 M pixels, over the limit of 89.5 M (config.data.max_image_pixels)"
    for bad, example in ((label % 2, image % 2), (image % 4, image % 4)):
        original = open(bad, "rb").read()
        with open(bad, "wb") as f:
            f.write(huge_png(30000, 30000))
        iterator = iter(_train(root, bad_example="skip"))
        _take(iterator, 5)
        assert iterator.num_skipped == _bad_positions_until(root, example, 0, 20) >= 2
        with pytest.raises(pipeline.BadDataError) as stopped:
            _take(iter(_train(root, bad_example="stop")), 5)
        assert str(stopped.value) == f"bad training example (bad_example='stop'): {bad}: {reason}"
        with open(bad, "wb") as f:
            f.write(original)


def test_stop_reaches_the_caller_as_one_line_bad_data_error_from_a_worker(tmp_path):
    """With prefetch workers the worker's BadDataError is re-raised in this process, type and message intact."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # grain's worker processes read an absl flag
    root = data_fakes.make_ade20k(str(tmp_path / "ade_huge"), num_train=4, num_val=1)
    label = f"{root}/annotations/training/ADE_train_00000001.png"
    with open(label, "wb") as f:
        f.write(huge_png(30000, 30000))
    iterator = iter(_train(root, bad_example="stop", num_workers=1, global_batch_size=2))
    try:
        with pytest.raises(pipeline.BadDataError) as stopped:
            _take(iterator, 4)
    finally:
        iterator.close()
    reason = "30000 x 30000 = 900.0 M pixels, over the limit of 89.5 M (config.data.max_image_pixels)"
    assert str(stopped.value) == f"bad training example (bad_example='stop'): {label}: {reason}"


def test_lower_pixel_limit_applies_to_training_and_evaluation(ade):
    """Training images are (40 + 4i) x (56 - 2i): only example 5 (46 x 60 = 2760 pixels) is over 2700."""
    iterator = iter(_train(ade, bad_example="skip", max_image_pixels=2700))
    _take(iterator, 5)
    example = f"{ade}/images/training/ADE_train_00000005.jpg"
    assert iterator.num_skipped == _bad_positions_until(ade, example, 0, 20) >= 2
    with pytest.raises(pipeline.BadDataError, match=r"ADE_train_00000005.jpg: 46 x 60 = 2,760 pixels, over the limit"):
        _take(iter(_train(ade, bad_example="stop", max_image_pixels=2700)), 5)
    _take(iter(_train(ade, bad_example="stop", max_image_pixels=2760)), 5)
    with pytest.raises(pipeline.BadDataError, match=r"^bad evaluation example: .*ADE_val_00000000.jpg: 56 x 40 = "):
        list(pipeline.make_eval_dataset(sources.open_source("ade20k", ade, "val"), max_image_pixels=2000))


def test_multiworker_prefetch_resumes_through_orbax_and_counts_skips(tmp_path):
    import orbax.checkpoint as ocp

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # grain's worker processes read an absl flag
    root, _ = _with_corrupt_image(tmp_path, 4)
    dataset = _train(root, num_workers=2, global_batch_size=2)
    iterator = iter(dataset)
    _take(iterator, 3)
    manager = ocp.CheckpointManager(str(tmp_path / "ckpt"))
    manager.save(0, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
    manager.wait_until_finished()
    expected = _take(iterator, 6)
    skipped = iterator.num_skipped
    iterator.close()
    restored = iter(_train(root, num_workers=2, global_batch_size=2))
    manager.restore(0, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
    try:
        _assert_same_batches(_take(restored, 6), expected)
        assert restored.num_skipped == skipped >= 1  # 18 examples read: at least 2 epochs of 6, one bad each
    finally:
        restored.close()
        manager.close()


def test_eval_examples_are_the_original_images_and_labels_with_their_index(ade):
    """Evaluation reads images at their own size (inference resizes them once per test scale); each example carries
    its position in the split, which seeds its NMF bases; a process reads every process_count-th example."""
    data = sources.open_source("ade20k", ade, "val")
    examples = list(pipeline.make_eval_dataset(data))
    records = datasets.list_examples(datasets.DATASETS["ade20k"], ade, "val")
    assert [e["name"] for e in examples] == [r["name"] for r in records] and len(data.records) == 3
    assert [e["index"] for e in examples] == [0, 1, 2]
    for example, record in zip(examples, records, strict=True):
        loaded = loading.load_example(record, data.spec)
        np.testing.assert_array_equal(example["image"], loaded["image"])
        assert example["image"].dtype == np.uint8 and example["label"].dtype == np.int32
        np.testing.assert_array_equal(example["label"], loaded["label"])
        assert 255 in example["label"] and example["label"].max() == 255  # reduce_zero_label: raw 0 -> 255
    shard = list(pipeline.make_eval_dataset(data, process_index=1, process_count=2))
    assert [(e["name"], e["index"]) for e in shard] == [(records[1]["name"], 1)]


def test_demo_data_is_deterministic_varied_and_split_seeded():
    first, again = demo.generate("train", 3), demo.generate("train", 3)
    np.testing.assert_array_equal(first["image"], again["image"])
    np.testing.assert_array_equal(first["label"], again["label"])
    assert first["image"].shape == (demo.IMAGE_SIZE, demo.IMAGE_SIZE, 3) and first["image"].dtype == np.uint8
    assert not np.array_equal(demo.generate("val", 3)["image"], first["image"])
    labels = np.stack([demo.generate("train", i)["label"] for i in range(20)])
    assert len(demo.CLASSES) >= 5 and set(np.unique(labels)) == set(range(len(demo.CLASSES)))
    per_image = [len(np.unique(label)) for label in labels]
    assert min(per_image) >= 2 and max(per_image) >= 4  # several (overlapping) shapes per scene
    batch = next(iter(_train(None, name="demo", crop_size=(64, 64), scale=(128, 64))))
    assert batch["image"].shape == (4, 64, 64, 3)
    with pytest.raises(ValueError, match="demo data is generated"):
        sources.open_source("demo", "/data", "train")


def _prepare_tfds_script():
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "prepare_tfds.py")
    spec = importlib.util.spec_from_file_location("prepare_tfds", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_tfds_arrayrecord_round_trip_gives_identical_batches(ade, tmp_path):
    script = _prepare_tfds_script()
    data_dir = str(tmp_path / "tfds")
    assert script.main(["--dataset=ade20k", f"--root={ade}", f"--data_dir={data_dir}"]) == 0
    for split in ("train", "val"):
        files, arrays = (
            sources.open_source("ade20k", ade, split),
            sources.open_source("ade20k", data_dir, split, "tfds"),
        )
        assert len(arrays.records) == len(files.records)
        for i in range(len(files.records)):
            from_files, from_tfds = files.load(files.records[i]), arrays.load(arrays.records[i])
            assert from_tfds["name"] == from_files["name"]
            np.testing.assert_array_equal(from_tfds["image"], from_files["image"])
            np.testing.assert_array_equal(from_tfds["label"], from_files["label"])
    _assert_same_batches(_take(iter(_train(data_dir, source="tfds")), 2), _take(iter(_train(ade)), 2))
    with pytest.raises(FileNotFoundError, match="scripts/prepare_tfds.py --dataset=cityscapes"):
        sources.open_source("cityscapes", data_dir, "train", "tfds")
    bad_root, _ = _with_corrupt_image(tmp_path, 1)
    assert script.main(["--dataset=ade20k", f"--root={bad_root}", f"--data_dir={tmp_path / 'refused'}"]) == 1
    assert not os.path.exists(tmp_path / "refused")
