"""Checkpoints: orbax's CheckpointManager for training runs, and self-describing model directories.

A training workdir:
    WORKDIR/checkpoints/<step>/state     the state tree given to `save` ({"model": nnx.state(model), ...})
    WORKDIR/checkpoints/<step>/data      the grain iterator's position (one file per process)
    WORKDIR/checkpoints/<step>/metrics   validation metrics, when the step was evaluated
    WORKDIR/checkpoints/metadata/        JSON given to `make_manager`: {"model": models.create kwargs, "config": ...}
A model directory (`save_model`, e.g. written by the PyTorch converter):
    DIR/segnext.json                     {"format": MODEL_FORMAT, "model": models.create kwargs, ...}
    DIR/state/                           orbax checkpoint of nnx.state(model)

Saves are asynchronous and atomic: orbax writes a step into a temporary directory and renames it when complete, so a
run killed mid-save (kill -9) leaves only a temporary directory, which is ignored and removed on restart. The latest
`keep` steps are kept, plus the step with the best validation `BEST_METRIC`.
"""

import functools
import json
import signal
import threading
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from segnext_jax import models

BEST_METRIC = "mIoU"  # the validation metric that picks the best checkpoint (higher is better)
MODEL_INFO = "segnext.json"
MODEL_FORMAT = "segnext_jax.model.v1"
WEIGHTS = (nnx.Param, nnx.BatchStat)  # what a pretrained checkpoint provides (an nnx filter: either type)


def make_manager(
    workdir: str, keep: int, *, metadata: dict[str, Any] | None = None, save_every: int = 1
) -> ocp.CheckpointManager:
    """Opens (or creates) WORKDIR/checkpoints: asynchronous saves, the last `keep` steps plus the best one kept.

    `metadata` (JSON-serialisable) is recorded once per workdir; its "model" entry (the keyword arguments of
    `segnext_jax.models.create`, i.e. `config.model.to_dict()`) lets `restore_model` rebuild the network. Reopening a
    workdir with a different variant or class count is an error, so a run never mixes checkpoints of two models.
    `save` writes a step when `save_every` divides it, on the first call, at a multi-host preemption sync point, or
    when forced.
    """
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
    manager = ocp.CheckpointManager(epath.Path(workdir) / "checkpoints", options=options, metadata=metadata)
    recorded = manager.metadata().custom_metadata.get("model", {})  # the first run's: orbax never rewrites it
    wanted = (metadata or {}).get("model", {})
    for key in ("variant", "num_classes"):
        if key in recorded and key in wanted and recorded[key] != wanted[key]:
            manager.close()
            raise ValueError(
                f"{workdir} holds checkpoints of a model with {key}={recorded[key]!r}, but the config has "
                f"{wanted[key]!r}: use another --workdir"
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
    recorded to choose the best step. A step that is already saved is left as it is (returns False).
    """
    if step in manager.all_steps():
        return False
    items = {"state": ocp.args.StandardSave(state_tree)}
    if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    if metrics is not None:
        metrics = {name: float(value) for name, value in metrics.items() if np.ndim(value) == 0}
    return manager.save(
        step, args=ocp.args.Composite(**items), metrics=metrics, force=force or metrics is not None
    )


def restore_latest(
    manager: ocp.CheckpointManager, abstract_state: Any, data_iterator: grain.DatasetIterator | None = None
) -> tuple[int, Any] | None:
    """Restores the latest complete step: (step, state tree), or None when the workdir has no checkpoint yet.

    `abstract_state` has the structure of the saved tree; its leaves (arrays or jax.ShapeDtypeStruct with a
    sharding) decide where each restored array is placed. `data_iterator` (the freshly built pipeline) is moved to
    the saved position, so it yields what the interrupted run would have yielded next.
    """
    step = manager.latest_step()
    if step is None:
        return None
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    return step, manager.restore(step, args=ocp.args.Composite(**items)).state


def save_model(model: nnx.Module, path: str, metadata: dict[str, Any], *, overwrite: bool = False) -> None:
    """Writes `model` as a model directory that `restore_model` reads back (single process).

    `metadata["model"]` must hold the keyword arguments of `segnext_jax.models.create` that rebuild it (at least
    variant and num_classes); everything else in `metadata` (JSON) is recorded as given, e.g. the source file. An
    existing non-empty `path` is an error unless `overwrite`; the new directory is complete before it replaces it.
    """
    model_kwargs = metadata.get("model")
    if not isinstance(model_kwargs, dict) or not {"variant", "num_classes"} <= model_kwargs.keys():
        raise ValueError("save_model: metadata['model'] must give models.create's variant and num_classes")
    if _shapes(_abstract_model(model_kwargs)[1]) != _shapes(nnx.state(model)):
        raise ValueError(f"save_model: the model's parameters do not match metadata['model'] = {model_kwargs}")
    path = epath.Path(path)
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} already exists: choose a new directory, or overwrite it explicitly")
    partial = path.parent / f"{path.name}.partial"  # left over only by a killed save_model: never a finished model
    if partial.exists():
        partial.rmtree()
    partial.mkdir(parents=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(partial / "state", nnx.state(model))
        checkpointer.wait_until_finished()
    (partial / MODEL_INFO).write_text(json.dumps({"format": MODEL_FORMAT, **metadata}, indent=2))
    if path.exists():
        path.rmtree()
    partial.rename(path)


def restore_model(path: str, step: int | str = "latest") -> nnx.Module:
    """Loads a model in eval mode from a model directory (`save_model`) or a training workdir.

    For a workdir, `step` picks the checkpoint: 'latest', 'best' (highest validation BEST_METRIC) or a step number.
    The arrays are placed on the first local device.
    """
    path = epath.Path(path)
    if (path / MODEL_INFO).exists():
        model_kwargs = json.loads((path / MODEL_INFO).read_text())["model"]
        graphdef, abstract = _abstract_model(model_kwargs)
        with ocp.StandardCheckpointer() as checkpointer:
            state = checkpointer.restore(path / "state", _on_first_device(abstract))
    elif (path / "checkpoints").is_dir():
        manager = ocp.CheckpointManager(path / "checkpoints", options=_read_only())
        model_kwargs = manager.metadata().custom_metadata.get("model")
        if model_kwargs is None:
            raise ValueError(f"{path}: the checkpoints record no model (make_manager was given no metadata['model'])")
        chosen = _pick_step(manager, path, step)
        graphdef, abstract = _abstract_model(model_kwargs)
        item = {"model": _on_first_device(abstract)}  # only the model out of the saved state tree
        args = ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True
        )
        state = manager.restore(chosen, args=ocp.args.Composite(state=args)).state["model"]
    else:
        raise FileNotFoundError(
            f"{path}: neither a model directory (no {MODEL_INFO}) nor a training workdir (no checkpoints/)"
        )
    model = nnx.merge(graphdef, state)
    model.eval()
    return model


def _abstract_model(model_kwargs: dict[str, Any]) -> tuple[nnx.GraphDef, nnx.State]:
    """Graph definition and abstract state (shapes only) of the model `models.create(**model_kwargs)` builds."""
    return _abstract_model_cached(json.dumps(model_kwargs, sort_keys=True))


@functools.lru_cache(maxsize=8)
def _abstract_model_cached(model_kwargs_json: str) -> tuple[nnx.GraphDef, nnx.State]:
    # Tracing the constructor takes seconds (SegNeXt-T: ~2 s); loading several checkpoints of one model pays it once.
    model_kwargs = json.loads(model_kwargs_json)
    return nnx.split(nnx.eval_shape(lambda: models.create(**model_kwargs, rngs=nnx.Rngs(0))))


def _on_first_device(abstract: nnx.State) -> nnx.State:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device), abstract)


def _shapes(state: nnx.State) -> dict[str, tuple[int, ...]]:
    return {jax.tree_util.keystr(key): leaf.shape for key, leaf in jax.tree_util.tree_leaves_with_path(state)}


def _pick_step(manager: ocp.CheckpointManager, path: epath.Path, step: int | str) -> int:
    if step == "latest":
        chosen = manager.latest_step()
    elif step == "best":
        chosen = manager.best_step()
    else:
        chosen = step
    if chosen is None or chosen not in manager.all_steps():
        raise ValueError(
            f"{path}: no checkpoint for step={step!r} "
            f"(saved: {list(manager.all_steps())}; 'best' needs an evaluated one)"
        )
    return chosen


def load_pretrained(model: nnx.Module, path: str, kind: str) -> None:
    """Copies the parameters and batch statistics of a model directory or workdir into `model` (config.init).

    `kind` 'backbone' fills `model.backbone` only (ImageNet MSCAN weights: the decode head keeps its init); 'model'
    fills everything. Shapes must match: a checkpoint of another variant or class count is an error.
    """
    if kind not in ("backbone", "model"):
        raise ValueError(f"config.init.pretrained_kind={kind!r}: choose 'backbone' or 'model'")
    if not epath.Path(path).exists():
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


def install_preemption_handler() -> threading.Event:
    """Makes SIGTERM (preemption, `kill`) set the returned event instead of killing the process at once.

    The train loop polls `preempted(...)` each step and, when it is true, saves and exits. Single process only: with
    several processes JAX's preemption service receives SIGTERM and `manager.reached_preemption(step)` tells every
    host at the same step, so no handler is installed there.
    """
    requested = threading.Event()
    if jax.process_count() == 1:
        signal.signal(signal.SIGTERM, lambda signum, frame: requested.set())
    return requested


def preempted(manager: ocp.CheckpointManager, step: int, requested: threading.Event) -> bool:
    """Whether the run must save `step` and stop: SIGTERM received here, or a multi-host preemption sync point."""
    return requested.is_set() or manager.reached_preemption(step)
