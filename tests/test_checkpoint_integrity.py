"""segnext_jax.checkpoints against faults: damaged steps, config mismatches, non-finite states, a full disk, users'
relative paths. A damaged step is moved aside when training resumes and named when read only; nothing is deleted."""

import json
import os
import re
import time
import zlib
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tmpfs
from flax import nnx
from orbax.checkpoint._src.path import atomicity
from test_checkpoints import _assert_trees_equal

from segnext_jax import checkpoints

MODEL_KWARGS = {"variant": "t", "num_classes": 3}


def _state(seed: int) -> dict:
    """A small train-state-like tree: random floats (the largest array file), an integer and a PRNG key."""
    rng = np.random.default_rng(seed)
    return {
        "model": {"w": jnp.asarray(rng.standard_normal((64, 64)), jnp.float32), "b": jnp.full(4, float(seed))},
        "opt": {"count": jnp.int32(seed)},
        "rng": jax.random.key(seed),
    }


def _pipeline() -> grain.DatasetIterator:
    return iter(grain.MapDataset.range(100).to_iter_dataset())


def _two_steps(workdir: Path) -> None:
    """Steps 1 (data position 1, mIoU 0.1) and 2 (position 2, mIoU 0.5: the best) of `_state(step)`."""
    manager = checkpoints.make_manager(str(workdir), keep=3)
    iterator = _pipeline()
    for step, miou in ((1, 0.1), (2, 0.5)):
        next(iterator)
        assert checkpoints.save(manager, step, _state(step), iterator, metrics={"mIoU": miou})
    checkpoints.wait_for_saves(manager)
    manager.close()


def _largest_file(directory: Path) -> Path:
    return max((path for path in directory.rglob("*") if path.is_file()), key=lambda path: path.stat().st_size)


def _flip_bytes(directory: Path) -> None:
    """Flips 16 bytes in the middle of the largest file under `directory` (silent corruption: orbax reads it)."""
    path = _largest_file(directory)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(byte ^ 0xFF for byte in data[middle : middle + 16])
    path.write_bytes(bytes(data))


def _edit_record(step_dir: Path, edit) -> None:
    path = step_dir / checkpoints.STEP_METADATA
    metadata = json.loads(path.read_text())
    edit(metadata["custom_metadata"])
    path.write_text(json.dumps(metadata))


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _garbage(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))


def _wrong_checksum(record: dict) -> None:
    record[checkpoints.CHECKSUMS]["['model']['w']"]["crc32"] ^= 1


DAMAGES = {
    "truncated array file": lambda step: _truncate(_largest_file(step / "state")),
    "deleted state _METADATA": lambda step: (step / "state" / "_METADATA").unlink(),
    "deleted step _CHECKPOINT_METADATA": lambda step: (step / checkpoints.STEP_METADATA).unlink(),
    "garbage array file": lambda step: _garbage(_largest_file(step / "state")),
    "16 flipped bytes": lambda step: _flip_bytes(step / "state"),
    "wrong recorded checksum": lambda step: _edit_record(step, _wrong_checksum),
    "deleted data-iterator file": lambda step: (step / "data" / "process_0-of-1.json").unlink(),
    "garbled metrics file": lambda step: (step / checkpoints.METRICS_FILE).write_text("{garbage"),
}


def test_save_records_checksums_and_restores_them(tmp_path, caplog):
    _two_steps(tmp_path)
    record = json.loads((tmp_path / "checkpoints" / "2" / checkpoints.STEP_METADATA).read_text())["custom_metadata"]
    record = record[checkpoints.CHECKSUMS]
    state = _state(2)
    assert set(record) == {"['model']['w']", "['model']['b']", "['opt']['count']", "['rng']"}
    assert record["['model']['w']"] == {
        "shape": [64, 64],
        "dtype": "float32",
        "crc32": zlib.crc32(np.asarray(state["model"]["w"]).tobytes()),
    }
    assert record["['rng']"] == {
        "shape": [2],
        "dtype": "uint32",
        "crc32": zlib.crc32(np.asarray(jax.random.key_data(state["rng"])).tobytes()),
    }

    manager = checkpoints.make_manager(str(tmp_path), keep=3)
    iterator = _pipeline()
    step, restored = checkpoints.restore_latest(manager, _state(0), iterator)
    assert step == 2 and next(iterator) == 2
    _assert_trees_equal(restored, state)
    assert not [r for r in caplog.records if r.levelname == "WARNING" and "checkpoint" in r.getMessage()]


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_latest_step_is_moved_aside_and_the_previous_one_restored(tmp_path, caplog, damage):
    _two_steps(tmp_path)
    DAMAGES[damage](tmp_path / "checkpoints" / "2")
    manager = checkpoints.make_manager(str(tmp_path), keep=3)
    iterator = _pipeline()
    step, restored = checkpoints.restore_latest(manager, _state(0), iterator)

    assert step == 1
    _assert_trees_equal(restored, _state(1))
    assert next(iterator) == 1  # the position saved with step 1
    moved = tmp_path / "damaged_checkpoints" / "2"
    assert moved.is_dir() and not (tmp_path / "checkpoints" / "2").exists()
    assert manager.all_steps() == [1] and manager.best_step() == 1  # the best step is chosen among the others
    warnings = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert warnings[0].startswith("checkpoint step 2 is damaged (") and f"moved to {moved}" in warnings[0]

    # orbax neither sees nor deletes what was moved aside, on saves or on the next start
    files = sorted(path.relative_to(moved) for path in moved.rglob("*"))
    assert checkpoints.save(manager, 3, _state(3), iterator, force=True)
    checkpoints.wait_for_saves(manager)
    manager.close()
    manager = checkpoints.make_manager(str(tmp_path), keep=1)
    assert checkpoints.save(manager, 4, _state(4), force=True)
    checkpoints.wait_for_saves(manager)
    assert manager.all_steps() == [1, 4]  # the latest, and the best (step 1: the only one with metrics)
    assert sorted(path.relative_to(moved) for path in moved.rglob("*")) == files


def test_no_intact_step_left_starts_from_scratch(tmp_path, caplog):
    _two_steps(tmp_path)
    (tmp_path / "damaged_checkpoints" / "2").mkdir(parents=True)  # moved there by an earlier run: kept
    for step in ("1", "2"):
        _flip_bytes(tmp_path / "checkpoints" / step / "state")
    manager = checkpoints.make_manager(str(tmp_path), keep=3)
    iterator = _pipeline()
    assert checkpoints.restore_latest(manager, _state(0), iterator) is None
    assert next(iterator) == 0  # untouched: neither step's position was restored
    assert sorted(os.listdir(tmp_path / "damaged_checkpoints")) == ["1", "2", "2-1"]
    assert manager.all_steps() == []
    warnings = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert len(warnings) == 2
    assert all(w.endswith("no intact checkpoint is left: training starts from scratch") for w in warnings)


def test_step_without_checksums_restores_unverified(tmp_path, caplog):
    _two_steps(tmp_path)
    _edit_record(tmp_path / "checkpoints" / "2", lambda record: record.pop(checkpoints.CHECKSUMS))
    manager = checkpoints.make_manager(str(tmp_path), keep=3)
    step, restored = checkpoints.restore_latest(manager, _state(0))
    assert step == 2 and not (tmp_path / "damaged_checkpoints").exists()
    _assert_trees_equal(restored, _state(2))
    assert "checkpoint step 2 has no checksums (older version): restored unverified" in caplog.text


@pytest.mark.parametrize(
    "abstract, difference",
    [
        ({**_state(0), "model": {"w": jnp.zeros((64, 32)), "b": jnp.zeros(4)}}, "['model']['w']"),
        ({**_state(0), "extra": jnp.zeros(2)}, "['extra']"),
    ],
    ids=["other shape", "other keys"],
)
def test_config_mismatch_is_a_one_line_error_and_moves_nothing(tmp_path, abstract, difference):
    _two_steps(tmp_path)
    before = sorted(os.listdir(tmp_path / "checkpoints"))
    manager = checkpoints.make_manager(str(tmp_path), keep=3)
    with pytest.raises(checkpoints.CheckpointMismatchError) as raised:
        checkpoints.restore_latest(manager, abstract, _pipeline())
    message = str(raised.value)
    assert "\n" not in message and message.startswith(f"{tmp_path} holds checkpoints that do not fit this config")
    assert f"first difference at {difference}: " in message
    assert message.endswith("use another --workdir or the config it was trained with")
    assert sorted(os.listdir(tmp_path / "checkpoints")) == before and not (tmp_path / "damaged_checkpoints").exists()


def test_non_finite_state_is_refused(tmp_path):
    manager = checkpoints.make_manager(str(tmp_path), keep=3)
    state = _state(1)
    state["model"]["b"] = state["model"]["b"].at[2].set(jnp.nan)
    with pytest.raises(checkpoints.NonFiniteStateError, match=r"step 7: \['model'\]\['b'\] has NaN or infinite"):
        checkpoints.save(manager, 7, state, force=True)
    checkpoints.wait_for_saves(manager)
    assert manager.all_steps() == [] and not os.listdir(tmp_path / "checkpoints")


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    tmpfs.mount(disk, "600k")  # room for one step of `big`, not two
    try:
        yield disk
    finally:
        tmpfs.unmount(disk)


@pytest.mark.parametrize("when", ["before writing", "while writing"])
def test_full_disk_raises_save_error_at_once_keeps_earlier_steps_and_resumes(small_disk, monkeypatch, when):
    """A save that cannot fit is refused before anything is written (a save failing half-way makes TensorStore print
    a traceback per array); one that fails anyway (the disk filled meanwhile) is reported as soon as it fails."""

    def big(seed):
        return {"w": jnp.asarray(np.random.default_rng(seed).standard_normal(100_000), jnp.float32)}

    if when == "while writing":
        monkeypatch.setattr(checkpoints, "_space_shortage", lambda directory, state_tree: None)
    manager = checkpoints.make_manager(str(small_disk), keep=1)
    assert checkpoints.save(manager, 1, big(1), _pipeline(), force=True)
    checkpoints.wait_for_saves(manager)
    started = time.monotonic()
    with pytest.raises(checkpoints.SaveError) as raised:
        checkpoints.save(manager, 2, big(2), _pipeline(), force=True)  # keep=1: step 1 would go once 2 is done
        while time.monotonic() - started < 30:
            checkpoints.check_saves(manager)  # what the trainer calls every step
            time.sleep(0.01)
    assert time.monotonic() - started < 10
    sizes = r" \(0\.\d MiB needed, 0\.\d MiB free\)" if when == "before writing" else ""
    assert re.fullmatch(
        re.escape(f"saving checkpoint step 2 to {small_disk}/checkpoints failed: [Errno 28] No space left on device")
        + sizes
        + re.escape("; steps [1] are intact: free some space and rerun the same command to resume from step 1"),
        str(raised.value),
    ), str(raised.value)
    assert raised.value.errno == 28
    manager.close()  # the failure is reported once
    written = ["1", "2.orbax-checkpoint-tmp"] if when == "while writing" else ["1"]
    assert sorted(os.listdir(small_disk / "checkpoints")) == written

    tmpfs.mount(small_disk, "2m", remount=True)  # space freed: the rerun resumes from step 1
    manager = checkpoints.make_manager(str(small_disk), keep=1)
    deadline = time.monotonic() + 10  # orbax removes temporary directories in the background when it starts
    while (small_disk / "checkpoints" / "2.orbax-checkpoint-tmp").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(os.listdir(small_disk / "checkpoints")) == ["1"]
    step, state = checkpoints.restore_latest(manager, big(0), _pipeline())
    assert step == 1
    _assert_trees_equal(state, big(1))
    assert checkpoints.save(manager, 2, big(2), _pipeline(), force=True)
    checkpoints.wait_for_saves(manager)
    assert sorted(os.listdir(small_disk / "checkpoints")) == ["2"]
    _assert_trees_equal(checkpoints.restore_latest(manager, big(0))[1], big(2))


def test_failed_save_that_is_no_os_error_propagates_unchanged(tmp_path, monkeypatch):
    async def broken_commit(*args, **kwargs):
        raise RuntimeError("a bug in the commit")

    manager = checkpoints.make_manager(str(tmp_path), keep=1)
    assert checkpoints.save(manager, 1, _state(1), force=True)
    checkpoints.wait_for_saves(manager)
    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", broken_commit)
    with pytest.raises(RuntimeError, match="a bug in the commit"):
        checkpoints.save(manager, 2, _state(2), force=True)
        checkpoints.wait_for_saves(manager)


@pytest.fixture(scope="module")
def segnext():
    """SegNeXt-T with random values, built on checkpoints' cached abstract model (no constructor run)."""
    graphdef, state = checkpoints._abstract_model(MODEL_KWARGS)
    rng = np.random.default_rng(0)

    def fill(leaf):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(rng.integers(2**32, size=2, dtype=np.uint32))
        return rng.standard_normal(leaf.shape).astype(leaf.dtype)

    return nnx.merge(graphdef, jax.tree.map(fill, state))


def test_read_only_loads_name_the_damaged_step_and_move_nothing(tmp_path, segnext):
    workdir = tmp_path / "run"
    manager = checkpoints.make_manager(str(workdir), keep=3, metadata={"model": MODEL_KWARGS, "config": {"a": 1}})
    for step in (1, 2):
        assert checkpoints.save(manager, step, {"model": nnx.state(segnext)}, force=True)
    checkpoints.wait_for_saves(manager)
    manager.close()
    _flip_bytes(workdir / "checkpoints" / "2" / "state")
    listing = sorted(str(path) for path in workdir.rglob("*"))

    with pytest.raises(checkpoints.DamagedCheckpointError) as raised:
        checkpoints.restore_model(str(workdir))
    message = str(raised.value)
    assert "\n" not in message and message.startswith(f"{workdir}/checkpoints/2 is damaged (")
    assert message.endswith("pass --step=N with an intact step instead: [1]")
    model, info = checkpoints.load(str(workdir), "1")
    assert info == {"model": MODEL_KWARGS, "config": {"a": 1}, "step": 1}
    _assert_trees_equal(nnx.state(model), nnx.state(segnext))
    assert sorted(str(path) for path in workdir.rglob("*")) == listing  # read only: nothing moved

    with pytest.raises(FileNotFoundError, match=r"^--step=7: no such checkpoint in .*/run/checkpoints \(saved steps"):
        checkpoints.load(str(workdir), "7")


def test_model_directory_checksums(tmp_path, segnext, caplog):
    path = tmp_path / "model"
    checkpoints.save_model(segnext, str(path), {"model": MODEL_KWARGS})
    info = json.loads((path / checkpoints.MODEL_INFO).read_text())
    assert len(info[checkpoints.CHECKSUMS]) == len(jax.tree.leaves(nnx.state(segnext)))
    model, loaded = checkpoints.load(str(path))
    assert loaded == info
    _assert_trees_equal(nnx.state(model), nnx.state(segnext))

    del info[checkpoints.CHECKSUMS]  # a directory written before checksums existed
    (path / checkpoints.MODEL_INFO).write_text(json.dumps(info))
    _assert_trees_equal(nnx.state(checkpoints.restore_model(str(path))), nnx.state(segnext))
    assert "has no checksums (older version): loaded unverified" in caplog.text

    checkpoints.save_model(segnext, str(path), {"model": MODEL_KWARGS}, overwrite=True)
    _flip_bytes(path / "state")
    with pytest.raises(checkpoints.DamagedCheckpointError, match=rf"^{path} is damaged \(.*\): convert or copy it"):
        checkpoints.restore_model(str(path))


def test_relative_paths_are_taken_from_the_working_directory(tmp_path, monkeypatch, segnext):
    monkeypatch.chdir(tmp_path)
    manager = checkpoints.make_manager("runs/demo", keep=1, metadata={"model": MODEL_KWARGS})
    assert checkpoints.save(manager, 5, {"model": nnx.state(segnext)}, force=True)
    checkpoints.wait_for_saves(manager)
    manager.close()
    assert (tmp_path / "runs" / "demo" / "checkpoints" / "5").is_dir()
    model, info = checkpoints.load("runs/demo")
    assert info["step"] == 5
    _assert_trees_equal(nnx.state(model), nnx.state(segnext))
    with pytest.raises(FileNotFoundError, match=r"^--step=best: no such checkpoint in runs/demo/checkpoints "):
        checkpoints.load("runs/demo", "best")

    checkpoints.save_model(segnext, "models/t", {"model": MODEL_KWARGS})
    model = checkpoints.restore_model("runs/demo")
    checkpoints.load_pretrained(model, "models/t", "model")
    _assert_trees_equal(nnx.state(model), nnx.state(segnext))
    with pytest.raises(FileExistsError, match="^models/t already exists"):
        checkpoints.save_model(segnext, "models/t", {"model": MODEL_KWARGS})
