"""Checkpoints: orbax's CheckpointManager for training runs, and self-describing model directories.

A training workdir:
    WORKDIR/checkpoints/<step>/state     the state tree given to `save` ({"model": nnx.state(model), ...})
    WORKDIR/checkpoints/<step>/data      the grain iterator's position (one file per process)
    WORKDIR/checkpoints/<step>/metrics   validation metrics, when the step was evaluated
    WORKDIR/checkpoints/<step>/_CHECKPOINT_METADATA   orbax's step metadata; its custom_metadata["checksums"] holds
                                         the shape, dtype and CRC-32 of every array of the state tree
    WORKDIR/checkpoints/metadata/        JSON given to `make_manager`: {"model": the model record, "config": ...}
    WORKDIR/damaged_checkpoints/<step>   steps that `restore_latest` found damaged, moved aside (never deleted)
A model directory (`save_model`, e.g. written by the PyTorch converter):
    DIR/segnext.json                     {"format": MODEL_FORMAT, "model": the model record, "checksums": ...}
    DIR/state/                           orbax checkpoint of nnx.state(model)

Saves are asynchronous and atomic: orbax writes a step into a temporary directory and renames it when complete, so a
run killed mid-save (kill -9) leaves only a temporary directory, which is ignored and removed on restart. A save that
fails (disk full) raises SaveError at the next `save` or `check_saves`, and leaves the earlier steps as they were. The
latest `keep` steps are kept, plus the step with the best validation `BEST_METRIC`.

Integrity: a step is damaged when orbax's files cannot be read (a metadata file missing or garbled, an array file
truncated or missing, the data-iterator file missing) or when a restored array's CRC-32, shape or dtype differs from
the record written at save time. A step without a checksum record in otherwise readable step metadata was written
before checksums existed: it is restored unverified, with a warning (its metadata file missing counts as damage). A
saved tree that reads fine but has other keys, shapes or dtypes than the state the current config builds is no damage
but a user's mistake: CheckpointMismatchError, and nothing is moved.
"""

import errno
import functools
import gc
import json
import os
import re
import shutil
import sys
import weakref
import zlib
from collections.abc import Callable
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from segnext_jax import configuration, paths

BEST_METRIC = "mIoU"  # the validation metric that picks the best checkpoint (higher is better)
MODEL_INFO = "segnext.json"
MODEL_FORMAT = "segnext_jax.model.v1"
WEIGHTS = (nnx.Param, nnx.BatchStat)  # what a pretrained checkpoint provides (an nnx filter: either type)
CHECKSUMS = "checksums"  # the checksum record's key in a step's custom metadata and in segnext.json
DAMAGED_DIR = "damaged_checkpoints"  # WORKDIR/damaged_checkpoints/<step>: damaged steps, moved aside
STEP_METADATA = "_CHECKPOINT_METADATA"  # orbax's per-step JSON file (custom_metadata holds the checksum record)
METRICS_FILE = os.path.join("metrics", "metrics")  # orbax's file of a step's metrics (JSON)

# Errors that never mean damaged files (bugs, out of memory, XLA's runtime errors): a read that fails with one, or
# with an error caused by one, raises it as it is instead of calling the step damaged.
_NOT_DAMAGE = (TypeError, AttributeError, NameError, AssertionError, ImportError, RuntimeError, MemoryError)
_saving: "weakref.WeakKeyDictionary[ocp.CheckpointManager, int]" = weakref.WeakKeyDictionary()  # step in flight


class CheckpointMismatchError(ValueError):
    """The saved tree reads fine but does not fit the state this config builds: a user's mistake, nothing is moved."""


class DamagedCheckpointError(ValueError):
    """A checkpoint opened for reading only (evaluation, prediction, conversion) is damaged."""


class SaveError(OSError):
    """A checkpoint could not be written (disk full, no permission); the steps saved before are intact."""


class NonFiniteStateError(RuntimeError):
    """`save` was given a state with NaN or infinite values: a bug of the caller (the trainer never saves one)."""


class _Damaged(Exception):
    """Why a step cannot be trusted: its files cannot be read, or its arrays differ from their record."""


def make_manager(
    workdir: str, keep: int, *, metadata: dict[str, Any] | None = None, save_every: int = 1
) -> ocp.CheckpointManager:
    """Opens (or creates) WORKDIR/checkpoints: asynchronous saves, the last `keep` steps plus the best one kept.

    `metadata` (JSON-serialisable) is recorded once per workdir; its "model" entry (the keyword arguments of
    `configuration.model_record(config)`) lets `restore_model` rebuild the network. Reopening a
    workdir with a different variant or class count is a CheckpointMismatchError, so a run never mixes checkpoints of
    two models. `save` writes a step when `save_every` divides it, on the first call, at a multi-host preemption sync
    point, or when forced. A step whose metrics file is garbled (orbax could not even open the workdir) is moved to
    WORKDIR/damaged_checkpoints.
    """
    directory = epath.Path(paths.resolve(workdir)) / "checkpoints"
    for step, reason in _unreadable_metrics(directory).items():
        logging.warning("checkpoint step %d is damaged (%s): moved to %s", step, reason, _move_aside(directory, step))
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_every,
        best_fn=_best_metric,
        best_mode="max",
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(
            [
                ocp.checkpoint_managers.LatestN(keep),
                ocp.checkpoint_managers.BestN(get_metric_fn=_best_metric, n=1, keep_checkpoints_without_metrics=False),
            ]
        ),
        cleanup_tmp_directories=True,
        enable_async_checkpointing=True,
    )
    manager = ocp.CheckpointManager(directory, options=options, metadata=metadata)
    recorded = manager.metadata().custom_metadata.get("model", {})  # the first run's: orbax never rewrites it
    wanted = (metadata or {}).get("model", {})
    for key in ("variant", "num_classes"):
        if key in recorded and key in wanted and recorded[key] != wanted[key]:
            manager.close()
            raise CheckpointMismatchError(
                f"{workdir} holds checkpoints of a model with {key}={recorded[key]!r}, but the config has "
                f"{wanted[key]!r}: use another --workdir or the config it was trained with"
            )
    return manager


def _best_metric(metrics: dict[str, float]) -> float:
    return metrics[BEST_METRIC]


def _read_only() -> ocp.CheckpointManagerOptions:
    return ocp.CheckpointManagerOptions(
        read_only=True, save_interval_steps=0, create=False, best_fn=_best_metric, best_mode="max"
    )


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state_tree: Any,
    data_iterator: grain.DatasetIterator | None = None,
    metrics: dict[str, Any] | None = None,
    force: bool = False,
) -> bool:
    """Starts an asynchronous save of `step` if due (or `force`); returns whether it did. Call on every process.

    `state_tree` is everything to resume: {"model": nnx.state(model), "optimizer": ..., "rng": ...}; the "model"
    entry is what `restore_model` reads. `data_iterator` is a grain iterator whose position is saved alongside.
    `metrics` are the step's validation results: a step with metrics is always saved, and the scalar entries are
    recorded to choose the best step. A step that is already saved is left as it is (returns False). The checksums of
    the state's arrays are recorded with the step; a state with NaN or infinite values is refused
    (NonFiniteStateError). A previous save that failed raises SaveError first (see `check_saves`).
    """
    check_saves(manager)
    if step in manager.all_steps():
        return False
    force = force or metrics is not None
    if not (force or manager.should_save(step)):
        return False
    record, non_finite = _checksums(state_tree)
    if non_finite is not None:
        raise NonFiniteStateError(f"refusing to save checkpoint step {step}: {non_finite} has NaN or infinite values")
    items = {"state": ocp.args.StandardSave(state_tree)}
    if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    if metrics is not None:
        metrics = {name: float(value) for name, value in metrics.items() if np.ndim(value) == 0}
    _wait(manager)  # a failure of the previous save is reported with that save's step
    short = _space_shortage(manager.directory, state_tree)
    if short is not None:  # refused before writing: a save failing half-way floods the console from TensorStore
        raise _save_error(manager, step, short)
    try:
        saved = manager.save(
            step, args=ocp.args.Composite(**items), metrics=metrics, force=True, custom_metadata={CHECKSUMS: record}
        )
    except Exception as error:
        failure = _save_error(manager, step, error)
        if failure is None:
            raise
        raise failure from error
    if saved:
        _saving[manager] = step
    return saved


def _space_shortage(directory: epath.Path, state_tree: Any) -> OSError | None:
    """An ENOSPC error when the file system of `directory` (local paths only) has less free space than the state's
    arrays need, with a margin for orbax's metadata; else None."""
    if "://" in str(directory):
        return None
    needed = int(1.1 * sum(_nbytes(leaf) for leaf in jax.tree.leaves(state_tree))) + 2**16
    free = shutil.disk_usage(directory).free
    if free >= needed:
        return None
    sizes = f"{needed / 2**20:.1f} MiB needed, {free / 2**20:.1f} MiB free"
    return OSError(errno.ENOSPC, f"No space left on device ({sizes})")


def _nbytes(leaf: Any) -> int:
    if not hasattr(leaf, "dtype"):
        return 0
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        leaf = jax.random.key_data(leaf)
    return int(np.dtype(leaf.dtype).itemsize * np.prod(leaf.shape))


def check_saves(manager: ocp.CheckpointManager) -> None:
    """Raises SaveError as soon as the asynchronous save started by `save` has failed for a reason of the system
    (disk full, no permission); other failures are re-raised as they are (a bug). Cheap: call it every step.

    orbax's own `manager.check_for_errors()` does not serve: its save-finalising thread consumes the error first, and
    a call that won the race would let that thread go on to delete the old steps after a failed save.
    """
    if manager in _saving and not manager.is_saving_in_progress():
        _wait(manager)


def wait_for_saves(manager: ocp.CheckpointManager) -> None:
    """Blocks until the save in flight is complete; raises SaveError (or the bug) if it failed, as `check_saves`."""
    _wait(manager)


def _wait(manager: ocp.CheckpointManager) -> None:
    step = _saving.pop(manager, None)
    try:
        manager.wait_until_finished()
    except Exception as error:
        failure = _save_error(manager, step, error)
        if failure is None:
            raise
        raise failure from error


def _save_error(manager: ocp.CheckpointManager, step: int | None, error: Exception) -> SaveError | None:
    """The one-line SaveError for a save that failed with an OS error somewhere in `error`, else None."""
    cause = _os_error(error)
    if cause is None:
        return None
    manager.reload()  # the steps on disk: orbax's list already lacks those it meant to delete after this save
    intact = list(manager.all_steps())
    advice = "free some space" if cause.errno in (errno.ENOSPC, errno.EDQUOT) else "fix that"
    if intact:
        then = f"steps {intact} are intact: {advice} and rerun the same command to resume from step {intact[-1]}"
    else:
        then = f"no earlier step is saved: {advice} and rerun the same command"
    what = "a checkpoint" if step is None else f"checkpoint step {step}"
    failure = SaveError(f"saving {what} to {manager.directory} failed: {cause}; {then}")
    failure.errno = cause.errno
    return failure


def _os_error(error: BaseException) -> OSError | None:
    """The OSError in `error`'s chain (causes, contexts, exception-group members), if any. TensorStore reports one
    as a ValueError whose message ends in "[os_error_code='28']"."""
    pending, seen = [error], set()
    while pending:
        current = pending.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError):
            return current
        code = re.search(r"\[os_error_code='?(\d+)", str(current))
        if code:
            return OSError(int(code.group(1)), os.strerror(int(code.group(1))))
        pending += [current.__cause__, current.__context__, *getattr(current, "exceptions", ())]
    return None


def restore_latest(
    manager: ocp.CheckpointManager, abstract_state: Any, data_iterator: grain.DatasetIterator | None = None
) -> tuple[int, Any] | None:
    """Restores the latest intact step: (step, state tree), or None when the workdir has no intact checkpoint.

    `abstract_state` has the structure of the saved tree; its leaves (arrays or jax.ShapeDtypeStruct with a
    sharding) decide where each restored array is placed. `data_iterator` (the freshly built pipeline) is moved to
    the saved position, so it yields what the interrupted run would have yielded next. A damaged step is moved to
    WORKDIR/damaged_checkpoints/<step> (one warning line each) and the next newest is tried; the iterator is only
    moved once the state is verified, and is back at its start when no step is intact. A tree that does not fit
    `abstract_state` raises CheckpointMismatchError.
    """
    workdir = manager.directory.parent
    start = data_iterator.get_state() if data_iterator is not None else None
    moved, outcome = [], "then the restore stopped with an error"
    try:
        while (step := manager.latest_step()) is not None:
            try:
                state = _restore_state(
                    manager,
                    step,
                    abstract_state,
                    f"{workdir} holds checkpoints that do not fit this config (first difference at {{}}): "
                    "use another --workdir or the config it was trained with",
                )
                if data_iterator is not None:
                    _restore_data(manager, step, data_iterator)
            except _Damaged as damage:
                where = _move_aside(manager.directory, step)
                moved.append(f"checkpoint step {step} is damaged ({damage}): moved to {where}")
                manager.reload()
                continue
            outcome = f"resuming from step {step}"
            return step, state
        if moved:
            outcome = "no intact checkpoint is left: training starts from scratch"
            if data_iterator is not None:
                data_iterator.set_state(start)
        return None
    finally:
        for line in moved:
            logging.warning("%s; %s", line, outcome)


def _restore_state(
    manager: ocp.CheckpointManager, step: int, abstract: Any, mismatch: str, partial: bool = False
) -> Any:
    """The state item of `step`, verified against its checksum record; raises _Damaged, or CheckpointMismatchError
    (`mismatch`, with {} for the first differing key) when the saved tree does not fit `abstract`. `partial`: only
    the top-level entries of `abstract` are read."""
    step_dir = manager.directory / str(step)  # orbax's default step names
    record = _step_record(step_dir)
    saved = _saved_layout(step_dir / "state")
    if partial:
        saved = {key: value for key, value in saved.items() if key.startswith(tuple(f"[{k!r}]" for k in abstract))}
    difference = _first_difference(saved, _layout(abstract))
    if difference is not None:
        raise CheckpointMismatchError(mismatch.format(difference))
    if partial:
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
        args = ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args, partial_restore=True)
    else:
        args = ocp.args.StandardRestore(abstract)
    state = _read(lambda: manager.restore(step, args=ocp.args.Composite(state=args)).state, "the arrays")
    if record is None:
        logging.warning("checkpoint step %d has no checksums (older version): restored unverified", step)
    else:
        _verify(state, record)
    return state


def _restore_data(manager: ocp.CheckpointManager, step: int, data_iterator: grain.DatasetIterator) -> None:
    """Moves `data_iterator` to the position saved with `step`; raises _Damaged if the file cannot be read."""
    data = grain.checkpoint.CheckpointRestore(data_iterator)
    _read(lambda: manager.restore(step, args=ocp.args.Composite(data=data)), "the data-iterator file")


def _step_record(step_dir: epath.Path) -> dict[str, Any] | None:
    """The checksum record of a step, or None for a step saved before checksums existed (readable metadata)."""
    try:
        metadata = json.loads((step_dir / STEP_METADATA).read_text())
    except (OSError, ValueError) as error:
        raise _Damaged(f"missing or unreadable {STEP_METADATA}") from error
    if not isinstance(metadata, dict):
        raise _Damaged(f"unreadable {STEP_METADATA}")
    return (metadata.get("custom_metadata") or {}).get(CHECKSUMS)


def _saved_layout(item_dir: epath.Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """{key: (shape, dtype)} of the tree saved in `item_dir`, from its _METADATA file (missing: damaged)."""
    handler = ocp.PyTreeCheckpointHandler()
    try:
        return _layout(_read(lambda: handler.metadata(item_dir).tree, f"{item_dir.name}/_METADATA"))
    finally:
        handler.close()


def _read(read: Callable[[], Any], what: str) -> Any:
    """`read()`; any error but a bug means the files are damaged."""
    try:
        return read()
    except Exception as error:
        root = error
        while root.__cause__ is not None:  # orbax wraps TensorStore's error, which says what is wrong with which file
            root = root.__cause__
        if isinstance(error, _NOT_DAMAGE) or isinstance(root, _NOT_DAMAGE):
            raise
        message = " ".join(str(root).split())
        reason = f"{type(root).__name__}: {message if len(message) < 200 else message[:100] + ' ... ' + message[-100:]}"
    # orbax leaves the reads of the other arrays behind as coroutines that print a traceback when collected
    hook, sys.unraisablehook = sys.unraisablehook, lambda unraisable: None
    try:
        gc.collect()
    finally:
        sys.unraisablehook = hook
    raise _Damaged(f"cannot read {what}: {reason}")


def _move_aside(directory: epath.Path, step: int) -> epath.Path:
    """Renames DIRECTORY/<step> to WORKDIR/damaged_checkpoints/<step> (with a suffix if taken); returns the new path."""
    target, suffix = directory.parent / DAMAGED_DIR / str(step), 1
    while target.exists():
        target, suffix = directory.parent / DAMAGED_DIR / f"{step}-{suffix}", suffix + 1
    if jax.process_index() == 0:
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(directory / str(step), target)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"segnext_jax: step {step} moved aside")
    return target


def _unreadable_metrics(directory: epath.Path) -> dict[int, str]:
    """{step: reason} of the steps whose metrics file is garbled (orbax fails to open a workdir holding one)."""
    unreadable = {}
    for step_dir in directory.iterdir() if directory.is_dir() else ():
        if step_dir.name.isdigit() and (step_dir / METRICS_FILE).exists():
            try:
                json.loads((step_dir / METRICS_FILE).read_text())
            except (OSError, ValueError):
                unreadable[int(step_dir.name)] = f"unreadable {METRICS_FILE}"
    return dict(sorted(unreadable.items()))


def _checksums(tree: Any) -> tuple[dict[str, dict[str, Any]], str | None]:
    """({key: {"shape", "dtype", "crc32"}} of every array leaf, the key of the first leaf with NaN or inf or None).

    One pass over a host copy of each array's first addressable shard (the state is replicated); PRNG keys through
    their raw bits. A leaf whose first shard is not the whole array gets no CRC.
    """
    record, non_finite = {}, None
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if not isinstance(leaf, jax.Array | np.ndarray):
            continue
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        host = np.ascontiguousarray(leaf.addressable_shards[0].data if isinstance(leaf, jax.Array) else leaf)
        key = _key(path)
        whole = host.shape == tuple(leaf.shape)
        record[key] = {
            "shape": list(leaf.shape),
            "dtype": host.dtype.name,
            "crc32": zlib.crc32(host.reshape(-1).view(np.uint8)) if whole else None,
        }
        if non_finite is None and jax.dtypes.issubdtype(host.dtype, np.inexact) and not np.isfinite(host).all():
            non_finite = key
    return record, non_finite


def _verify(tree: Any, record: dict[str, dict[str, Any]]) -> None:
    """Raises _Damaged unless every array of `tree` has the shape, dtype and CRC-32 that `record` gives."""
    for key, got in _checksums(tree)[0].items():
        want = record.get(key)
        if want is None:
            raise _Damaged(f"no checksum recorded for {key}")
        if (got["shape"], got["dtype"]) != (want["shape"], want["dtype"]):
            raise _Damaged(f"{key} is {got['dtype']}{got['shape']}, recorded as {want['dtype']}{want['shape']}")
        if None not in (got["crc32"], want["crc32"]) and got["crc32"] != want["crc32"]:
            raise _Damaged(f"checksum mismatch in {key}")


def _key(path: tuple[Any, ...]) -> str:
    """keystr of `path` with every entry as a string key, as orbax's metadata tree has it: ['block1']['0']['value']."""
    names = (getattr(entry, "key", getattr(entry, "idx", getattr(entry, "name", entry))) for entry in path)
    return "".join(f"[{str(name)!r}]" for name in names)


def _layout(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """{key: (shape, dtype name)} of the leaves of a tree of arrays, abstract arrays, scalars or orbax metadata."""
    layout = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if not hasattr(leaf, "dtype"):
            leaf = np.asarray(leaf)
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.eval_shape(jax.random.key_data, leaf)
        layout[_key(path)] = (tuple(leaf.shape), np.dtype(leaf.dtype).name)
    return layout


def _first_difference(saved: dict[str, tuple], wanted: dict[str, tuple]) -> str | None:
    """'KEY: saved float32[3, 4], expected float32[3, 5]' for the first key where two layouts differ, else None."""
    keys = sorted(key for key in saved.keys() | wanted.keys() if saved.get(key) != wanted.get(key))
    if not keys:
        return None

    def describe(entry: tuple | None) -> str:
        return "nothing" if entry is None else f"{entry[1]}{list(entry[0])}"

    return f"{keys[0]}: saved {describe(saved.get(keys[0]))}, expected {describe(wanted.get(keys[0]))}"


def save_model(model: nnx.Module, path: str, metadata: dict[str, Any], *, overwrite: bool = False) -> None:
    """Writes `model` as a model directory that `restore_model` reads back (single process).

    `metadata["model"]` must hold the keyword arguments of `segnext_jax.models.create` that rebuild it (at least
    variant and num_classes); everything else in `metadata` (JSON) is recorded as given, e.g. the source file, and
    the arrays' checksums are added. An existing non-empty `path` is an error unless `overwrite`; the new directory is
    complete before it replaces it.
    """
    model_kwargs = metadata.get("model")
    if not isinstance(model_kwargs, dict) or not {"variant", "num_classes"} <= model_kwargs.keys():
        raise ValueError("save_model: metadata['model'] must give models.create's variant and num_classes")
    if _shapes(_abstract_model(model_kwargs)[1]) != _shapes(nnx.state(model)):
        raise ValueError(f"save_model: the model's parameters do not match metadata['model'] = {model_kwargs}")
    record, non_finite = _checksums(nnx.state(model))
    if non_finite is not None:
        raise NonFiniteStateError(f"save_model: {non_finite} has NaN or infinite values")
    given, path = path, epath.Path(paths.resolve(path))
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{given} already exists: choose a new directory, or overwrite it explicitly")
    partial = path.parent / f"{path.name}.partial"  # left over only by a killed save_model: never a finished model
    if partial.exists():
        partial.rmtree()
    partial.mkdir(parents=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(partial / "state", nnx.state(model))
        checkpointer.wait_until_finished()
    (partial / MODEL_INFO).write_text(json.dumps({"format": MODEL_FORMAT, **metadata, CHECKSUMS: record}, indent=2))
    if path.exists():
        path.rmtree()
    partial.rename(path)


def load(path: str, step: int | str = "latest") -> tuple[nnx.Module, dict[str, Any]]:
    """(model in eval mode, its recorded metadata) of a model directory (`save_model`) or a training workdir.

    For a workdir, `step` picks the checkpoint ('latest', 'best' or a step number) and the metadata is
    {"model": ..., "config": ..., "step": the step loaded}; for a model directory it is segnext.json's content
    (`segnext_jax.serving.loading.load` also reads PyTorch checkpoint files). The arrays are placed on the first
    local device. Nothing is ever moved: a damaged checkpoint is a DamagedCheckpointError naming the intact steps, a
    tree that does not fit its recorded model a CheckpointMismatchError.
    """
    directory = epath.Path(paths.resolve(path))
    if (directory / MODEL_INFO).exists():
        info = _model_info(directory, path)
        graphdef, abstract = _abstract_model(info["model"])
        state = _restore_model_directory(directory, path, abstract, info.get(CHECKSUMS))
    elif (directory / "checkpoints").is_dir():
        with _open_read_only(directory, path) as manager:
            info = dict(manager.metadata().custom_metadata or {})
            if info.get("model") is None:
                raise ValueError(f"{path}: the checkpoints record no model (make_manager got no metadata['model'])")
            chosen = _pick_step(manager, path, step)
            graphdef, abstract = _abstract_model(info["model"])
            state = _restore_model_step(manager, path, chosen, {"model": _on_first_device(abstract)})["model"]
        info["step"] = chosen
    else:
        raise FileNotFoundError(
            f"{path}: neither a model directory (no {MODEL_INFO}) nor a training workdir (no checkpoints/)"
        )
    model = nnx.merge(graphdef, state)
    model.eval()
    return model, info


def restore_model(path: str, step: int | str = "latest") -> nnx.Module:
    """The model of a model directory or training workdir, in eval mode (`load` without the metadata)."""
    return load(path, step)[0]


def _model_info(directory: epath.Path, given: str) -> dict[str, Any]:
    try:
        info = json.loads((directory / MODEL_INFO).read_text())
    except (OSError, ValueError) as error:
        raise DamagedCheckpointError(
            f"{given} is damaged (unreadable {MODEL_INFO}): convert or copy it anew"
        ) from error
    if not isinstance(info, dict) or not isinstance(info.get("model"), dict):
        raise DamagedCheckpointError(f"{given} is damaged ({MODEL_INFO} records no model): convert or copy it anew")
    return info


def _restore_model_directory(directory: epath.Path, given: str, abstract: nnx.State, record: dict | None) -> Any:
    try:
        difference = _first_difference(_saved_layout(directory / "state"), _layout(abstract))
        if difference is not None:
            raise CheckpointMismatchError(
                f"{given} does not fit the model its {MODEL_INFO} describes (first difference at {difference}): "
                "written by another version of segnext_jax?"
            )
        with ocp.StandardCheckpointer() as checkpointer:
            state = _read(lambda: checkpointer.restore(directory / "state", _on_first_device(abstract)), "the arrays")
        if record is None:
            logging.warning("model directory %s has no checksums (older version): loaded unverified", given)
        else:
            _verify(state, record)
    except _Damaged as damage:
        raise DamagedCheckpointError(f"{given} is damaged ({damage}): convert or copy it anew") from damage
    return state


def _restore_model_step(manager: ocp.CheckpointManager, given: str, step: int, item: dict[str, Any]) -> Any:
    """The "model" entry of a workdir's step; DamagedCheckpointError naming the intact steps if it is damaged."""
    mismatch = (
        f"{given}: step {step} does not fit the model its recorded config builds (first difference at {{}}): "
        "written by another version of segnext_jax?"
    )
    try:
        return _restore_state(manager, step, item, mismatch, partial=True)
    except _Damaged as damage:
        intact = []
        for other in manager.all_steps():
            try:
                if other != step and _restore_state(manager, other, item, mismatch, partial=True) is not None:
                    intact.append(other)
            except _Damaged:
                pass
        where = os.path.join(given, "checkpoints", str(step))
        then = f"pass --step=N with an intact step instead: {intact}" if intact else "no other step is intact"
        raise DamagedCheckpointError(f"{where} is damaged ({damage}): {then}") from damage


def _open_read_only(directory: epath.Path, given: str) -> ocp.CheckpointManager:
    unreadable = _unreadable_metrics(directory / "checkpoints")
    if unreadable:
        step, reason = next(iter(unreadable.items()))
        where = os.path.join(given, "checkpoints")
        raise DamagedCheckpointError(
            f"{os.path.join(where, str(step))} is damaged ({reason}): move it out of {where} to read the other steps"
        )
    return ocp.CheckpointManager(directory / "checkpoints", options=_read_only())


def _pick_step(manager: ocp.CheckpointManager, given: str, step: int | str) -> int:
    steps = list(manager.all_steps())
    if step == "latest":
        chosen = manager.latest_step()
    elif step == "best":
        chosen = manager.best_step()
    else:
        chosen = int(step) if str(step).isdigit() and int(step) in steps else None
    if chosen is None:
        hint = "; 'best' needs an evaluated step" if step == "best" else ""
        raise FileNotFoundError(
            f"--step={step}: no such checkpoint in {os.path.join(given, 'checkpoints')} (saved steps: {steps}{hint})"
        )
    return chosen


def _abstract_model(model_kwargs: dict[str, Any]) -> tuple[nnx.GraphDef, nnx.State]:
    """Graph definition and abstract state (shapes only) of the model a model record describes."""
    return _abstract_model_cached(json.dumps(model_kwargs, sort_keys=True))


@functools.lru_cache(maxsize=8)
def _abstract_model_cached(model_kwargs_json: str) -> tuple[nnx.GraphDef, nnx.State]:
    # Tracing the constructor takes seconds; loading several checkpoints of one model pays it once.
    model_kwargs = json.loads(model_kwargs_json)
    return nnx.split(nnx.eval_shape(lambda: configuration.create_model(model_kwargs, rngs=nnx.Rngs(0))))


def _on_first_device(abstract: nnx.State) -> nnx.State:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device), abstract)


def _shapes(state: nnx.State) -> dict[str, tuple[int, ...]]:
    return {jax.tree_util.keystr(key): leaf.shape for key, leaf in jax.tree_util.tree_leaves_with_path(state)}


def load_pretrained(model: nnx.Module, path: str, kind: str) -> None:
    """Copies the parameters and batch statistics of a model directory or workdir into `model` (config.init).

    `kind` 'backbone' fills `model.backbone` only (ImageNet MSCAN weights: the decode head keeps its init); 'model'
    fills everything. Shapes must match: a checkpoint of another variant or class count is an error.
    """
    if kind not in ("backbone", "model"):
        raise ValueError(f"config.init.pretrained_kind={kind!r}: choose 'backbone' or 'model'")
    if not os.path.exists(paths.resolve(path)):
        raise FileNotFoundError(
            f"config.init.pretrained={path!r} does not exist: convert the published ImageNet backbone with "
            f"`python -m weights_conversion mscan_<variant>.pth {path}` (download links in README.md), or set "
            "--config.init.pretrained='' to train from random weights"
        )
    source = restore_model(path)
    target, source = (model.backbone, source.backbone) if kind == "backbone" else (model, source)
    weights = nnx.state(source, WEIGHTS)
    wanted, given = _shapes(nnx.state(target, WEIGHTS)), _shapes(weights)
    if wanted != given:
        first = min(set(wanted.items()) ^ set(given.items()))[0]
        raise ValueError(
            f"{path}: its {kind} does not fit this model (first difference at {first}): another variant or number "
            "of classes?"
        )
    nnx.update(target, weights)
