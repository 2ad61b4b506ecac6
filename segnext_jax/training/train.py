"""Training: the sharded, jitted train step and the loop around it (checkpoints, evaluation, logs, preemption).

The step is `jax.jit` over a train state replicated on the `data` mesh axis and a batch sharded on it
(segnext_jax.sharding): one program for one CPU, a GPU host or a TPU pod, with BatchNorm statistics over the global
batch (the reference's SyncBN). It is a pure function of (state, batch, step): the random numbers of step s (drop
path, dropout, NMF bases) come from `fold_in(state["rng"], s)`, so a run resumed from a checkpoint repeats the
uninterrupted one exactly.

The train state is a dict: "model" (nnx.state of the SegNeXt: parameters, batch statistics), "opt_state" (the optax
state of the run's `Optimizer`) and "rng" (a PRNG key). Checkpoints hold it with the data iterator's position.
"""

import functools
import os
import threading
import time
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx
from tensorboardX import SummaryWriter

from segnext_jax import checkpoints, configuration, paths, sharding
from segnext_jax.configuration import ConfigError
from segnext_jax.data import pipeline
from segnext_jax.evaluation import evaluate
from segnext_jax.training import interrupts, workdir_lock
from segnext_jax.training.loss import segmentation_loss
from segnext_jax.training.optimizer import SEGNEXT_CUSTOM_KEYS, make_optimizer

TrainState = dict[str, Any]


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss, gradient, learning rate or state (config.train.on_nonfinite); nothing was
    saved."""


class Optimizer:
    """The run's AdamW with the reference's parameter groups (`tx`: head lr x config.optimizer.head_lr_mult, no decay
    on norms, config.train.grad_accum_steps micro-batches per update) and its learning-rate `schedule`, built once.

    A static argument of `train_step`: two built from equal config values compare (and hash) equal, so equal runs in
    one process share the compiled step. The parameter groups also depend on the parameters' names, which the step's
    other static argument, the graph definition, fixes.
    """

    def __init__(self, config: ml_collections.ConfigDict, params: Any):
        opt = config.optimizer
        self._values = (tuple(opt.items()), config.train.num_steps, config.train.grad_accum_steps)
        self.lr = opt.lr
        self.group_lrs = (opt.lr, opt.lr * opt.head_lr_mult)  # backbone and head, before the schedule
        self.accumulation_steps = config.train.grad_accum_steps
        self.schedule = configuration.make_lr_schedule(config)
        self.tx = make_optimizer(
            params,
            schedule=self.schedule,
            lr=opt.lr,
            betas=(opt.b1, opt.b2),
            eps=opt.eps,
            weight_decay=opt.weight_decay,
            custom_keys={**SEGNEXT_CUSTOM_KEYS, "head": {"lr_mult": opt.head_lr_mult}},
            accumulation_steps=self.accumulation_steps,
        )

    def learning_rate(self, step: int) -> float:
        """The base (backbone) learning rate of optimiser step `step` (0-based)."""
        return self.lr * float(self.schedule(step))

    def rates_finite(self, step: jax.Array) -> jax.Array:
        """Whether the backbone's and the head's learning rates at step `step` are finite in float32 (the schedule
        is finite at every step, so this holds at every step or at none)."""
        factor = self.schedule(step)
        return jnp.all(jnp.isfinite(jnp.asarray(self.group_lrs, jnp.float32) * factor))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Optimizer) and self._values == other._values

    def __hash__(self) -> int:
        return hash(self._values)


def init_state(
    config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
) -> tuple[nnx.GraphDef, TrainState, Optimizer]:
    """The model's graph definition, a fresh train state replicated over `mesh` (pretrained weights loaded) and the
    run's optimiser."""
    init_key, train_key = jax.random.split(jax.random.key(config.seed))
    model = configuration.create_model(config.model.to_dict(), rngs=nnx.Rngs(init_key))
    if config.init.pretrained:
        checkpoints.load_pretrained(model, config.init.pretrained, config.init.pretrained_kind)
    graphdef, model_state = nnx.split(model)
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    optimizer = Optimizer(config, params)
    state = {"model": model_state, "opt_state": optimizer.tx.init(params), "rng": train_key}
    return graphdef, replicate(state, mesh), optimizer


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    """`tree` copied to every device of `mesh`, as global arrays; every process passes the same values.

    `jax.device_put` only reaches this process's devices, so a multi-host mesh needs the arrays built from each
    process's local copy. PRNG keys travel as their raw bits.
    """
    replicated = sharding.replicated_sharding(mesh)

    def put(x: jax.Array) -> jax.Array:
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=jax.random.key_impl(x))
        return jax.make_array_from_process_local_data(replicated, np.asarray(x))

    return jax.tree.map(put, tree)


def _loss(model: nnx.Module, images: jax.Array, labels: jax.Array, key: jax.Array) -> jax.Array:
    return segmentation_loss(model(images, rngs=nnx.Rngs(key)), labels)


@functools.partial(jax.jit, static_argnames=("graphdef", "optimizer", "mesh"), donate_argnames="state")
def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    step: jax.Array,
    *,
    graphdef: nnx.GraphDef,
    optimizer: Optimizer,
    mesh: jax.sharding.Mesh,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimiser step on the global `batch` dict(image (B, H, W, 3), label (B, H, W)): returns (state, metrics).

    With optimizer.accumulation_steps = k the batch is split into k micro-batches of B/k images (micro-batch j takes
    rows j, j+k, ..., so every device keeps its own rows), each with its own BatchNorm statistics as in the
    reference's gradient accumulation; their gradients are averaged by optax's MultiSteps and applied once.

    The step is applied only where the loss, the gradients and the learning rates are finite (`finite` in the
    metrics); otherwise the state comes back as it was. Checking these inputs of the update, not the new state, lets
    XLA fuse the choice into the optimiser's own pass over the parameters and moments: checking the new state too
    took a second pass over all of them (measured: benchmarks/README.md). An update that overflows from finite
    inputs is caught by the next step's loss, or by the trainer's state check before it evaluates or saves.
    """
    k = optimizer.accumulation_steps
    previous = jax.tree.leaves(state)  # the arrays themselves: nnx.merge reuses the state's Variables, updated below
    batch = jax.lax.with_sharding_constraint(batch, sharding.data_sharding(mesh))
    keys = jax.random.split(jax.random.fold_in(state["rng"], step), k)
    model_state, opt_state = state["model"], state["opt_state"]
    losses, finite = [], optimizer.rates_finite(step)
    for j in range(k):  # unrolled: XLA:CPU runs the step several times slower inside a lax.scan
        images, labels = (x.reshape(x.shape[0] // k, k, *x.shape[1:])[:, j] for x in (batch["image"], batch["label"]))
        model = nnx.merge(graphdef, model_state)
        loss, grads = nnx.value_and_grad(_loss)(model, images, labels, keys[j])
        finite &= jnp.isfinite(loss) & _all_finite(grads)
        params = nnx.as_pure(nnx.state(model, nnx.Param))
        updates, opt_state = optimizer.tx.update(nnx.as_pure(grads), opt_state, params)
        new_params = optax.apply_updates(params, updates)
        nnx.update(model, new_params)
        model_state = nnx.state(model)
        losses.append(loss)
    new_state = {"model": model_state, "opt_state": opt_state, "rng": state["rng"]}
    # A non-finite loss, gradient or learning rate leaves the state as it was (the host stops or skips the step).
    kept = [_keep_if_not(finite, new, old) for new, old in zip(jax.tree.leaves(new_state), previous, strict=True)]
    new_state = jax.tree.unflatten(jax.tree.structure(new_state), kept)
    new_state = jax.lax.with_sharding_constraint(new_state, sharding.replicated_sharding(mesh))
    return new_state, {"loss": sum(losses) / k, "finite": finite}


def _all_finite(tree: Any) -> jax.Array:
    return jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


_all_finite_jit = jax.jit(_all_finite)


def _keep_if_not(finite: jax.Array, new: jax.Array, old: jax.Array) -> jax.Array:
    """`new` where the step was finite, else `old` (optimiser step counts included: a skipped step is not counted)."""
    return new if jax.dtypes.issubdtype(new.dtype, jax.dtypes.prng_key) else jnp.where(finite, new, old)


def eval_model(graphdef: nnx.GraphDef, state: TrainState) -> nnx.Module:
    """The model of `state` in evaluation mode, on this process's first device (each host evaluates on its own)."""
    local = jax.tree.map(lambda x: x.addressable_data(0), state["model"])
    model = nnx.merge(graphdef, local)
    model.eval()
    return model


def check_batch(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
    """Raises a one-line ConfigError unless every micro-batch splits evenly over the devices."""
    batch, k, devices = config.train.global_batch_size, config.train.grad_accum_steps, mesh.devices.size
    if batch % (k * devices):
        raise ConfigError(
            f"config.train.global_batch_size={batch} must be a multiple of grad_accum_steps={k} x {devices} devices"
        )


def make_train_data(
    config: ml_collections.ConfigDict, *, process_index: int | None = None, process_count: int | None = None
) -> grain.IterDataset:
    """This process's share of the training batches (config.data, config.train.global_batch_size, config.seed)."""
    return pipeline.make_train_dataset(
        config.data.dataset,
        config.data.root,
        crop_size=config.data.crop_size,
        scale=config.data.scale,
        ratio_range=config.data.ratio_range,
        cat_max_ratio=config.data.cat_max_ratio,
        global_batch_size=config.train.global_batch_size,
        seed=config.seed,
        num_workers=config.data.num_workers,
        bad_example=config.data.bad_example,
        max_image_pixels=config.data.max_image_pixels,
        source=config.data.source,
        process_index=process_index,
        process_count=process_count,
        reduce_zero_label=config.data.reduce_zero_label,
    )


def _format_duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}"


class _Progress:
    """Console and TensorBoard training scalars: loss, learning rate, images/s and ETA over each logging window."""

    def __init__(
        self, config: ml_collections.ConfigDict, optimizer: Optimizer, step: int, writer: SummaryWriter | None
    ):
        self.config, self.optimizer = config, optimizer
        self.writer = writer
        self.restart(step)

    def restart(self, step: int) -> None:
        """Starts a new timing window at `step` (after compilation, evaluation or a restore)."""
        self.window_start, self.window_step = time.perf_counter(), step

    def log(self, step: int, loss: float, num_skipped: int) -> None:
        """Logs step `step`; speed and ETA over the steps since the window started (none right after a restart)."""
        lr = self.optimizer.learning_rate(step - 1)
        speed = ""
        if step > self.window_step:
            steps_per_second = (step - self.window_step) / (time.perf_counter() - self.window_start)
            images_per_second = steps_per_second * self.config.train.global_batch_size
            eta = _format_duration((self.config.train.num_steps - step) / steps_per_second)
            speed = f"  {images_per_second:.1f} images/s  ETA {eta}"
            if self.writer is not None:
                self.writer.add_scalar("train/images_per_second", images_per_second, step)
        skipped = f"  skipped examples {num_skipped}" if num_skipped else ""
        logging.info("step %d/%d  loss %.4f  lr %.3g%s%s", step, self.config.train.num_steps, loss, lr, speed, skipped)
        if self.writer is not None:
            self.writer.add_scalar("train/loss", loss, step)
            self.writer.add_scalar("train/lr", lr, step)
        self.restart(step)


class _Profiler:
    """A `jax.profiler` trace of training steps first..last (config.train.profile_steps) in WORKDIR/profile, for
    TensorBoard's profile plugin or XProf; each step is annotated with its number."""

    def __init__(self, steps: tuple[int, int], workdir: str):
        self.first, self.last = steps
        self.directory = f"{workdir}/profile"
        self.tracing = False

    def before(self, step: int) -> None:
        if self.first and step == self.first:
            jax.profiler.start_trace(self.directory)
            self.tracing = True

    def after(self, step: int, state: TrainState) -> None:
        if self.tracing and step >= self.last:
            jax.block_until_ready(state)
            self.stop()
            logging.info("profile of steps %d-%d written to %s", self.first, self.last, self.directory)

    def stop(self) -> None:
        if self.tracing:
            self.tracing = False
            jax.profiler.stop_trace()


class _NonFiniteGuard:
    """config.train.on_nonfinite for steps whose loss, gradients or learning rate were not finite.

    The step itself left the state unchanged (`train_step`); here the run stops ('stop') or goes on ('skip') until
    config.train.max_nonfinite_in_a_row such steps follow each other. Either way nothing non-finite is saved.
    """

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, manager: Any, optimizer: Optimizer):
        self.learning_rate = optimizer.learning_rate
        self.policy, self.max_in_a_row = config.train.on_nonfinite, config.train.max_nonfinite_in_a_row
        self.workdir, self.manager = workdir, manager
        self.in_a_row = self.total = 0

    def check(self, step: int, metrics: dict[str, jax.Array]) -> None:
        """Raises NonFiniteError when step `step` (its `metrics`) was not finite and the run must stop."""
        if bool(metrics["finite"]):
            self.in_a_row = 0
            return
        self.in_a_row, self.total = self.in_a_row + 1, self.total + 1
        loss = float(metrics["loss"])
        kept = self._kept()
        if self.policy == "stop":
            raise NonFiniteError(
                f"step {step}: the loss, gradients or learning rate are not finite (loss {loss}, learning rate "
                f"{self.learning_rate(step - 1):.3g}); stopped without saving it ({kept}): "
                "lower config.optimizer.lr, or set --config.train.on_nonfinite=skip to skip such steps"
            )
        if self.in_a_row >= self.max_in_a_row:
            raise NonFiniteError(
                f"step {step}: {self.in_a_row} steps in a row with a non-finite loss, gradients or learning rate "
                f"(config.train.max_nonfinite_in_a_row={self.max_in_a_row}); stopped without saving them ({kept}): "
                "lower config.optimizer.lr"
            )
        logging.warning(
            "step %d: the loss, gradients or learning rate are not finite (loss %s): update skipped (%d in a row, "
            "%d in all)",
            step,
            loss,
            self.in_a_row,
            self.total,
        )

    def _kept(self) -> str:
        latest = self.manager.latest_step()
        if latest is None:
            return "no checkpoint was saved yet"
        return f"the newest checkpoint, step {latest}, is in {self.workdir}/checkpoints"

    def check_state(self, step: int, state: TrainState) -> None:
        """Raises NonFiniteError when the state is not finite although every step's inputs were: an update that
        overflowed (the step checks its inputs only, `train_step`). Called before evaluating or saving, so a
        non-finite model is neither evaluated nor saved; no policy can skip it, the step is already applied."""
        if bool(_all_finite_jit([x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.inexact)])):
            return
        raise NonFiniteError(
            f"step {step}: the parameters or optimiser moments are not finite although every step's loss, gradients "
            f"and learning rate were (an update at or before step {step} overflowed); stopped without saving it "
            f"({self._kept()}): lower config.optimizer.lr"
        )


def train(
    config: ml_collections.ConfigDict, workdir: str, *, stop: threading.Event | None = None
) -> dict[str, Any] | None:
    """Trains as `config` says in `workdir`, resuming from its latest checkpoint; returns the last validation metrics.

    Every process of a multi-host run calls it with the same arguments. `stop` (e.g. from
    `interrupts.install_handlers()`, set by SIGTERM or Ctrl-C) makes the run save the current step and return None;
    a multi-host preemption notice does the same. Checkpoints go to WORKDIR/checkpoints, validation results to
    WORKDIR/eval, TensorBoard events to WORKDIR/tensorboard. Relative paths (workdir, config.init.pretrained,
    config.data.root) are taken from the current directory. Process 0 holds WORKDIR/train.lock meanwhile.
    """
    configuration.check(config)
    config = config.copy_and_resolve_references()
    configuration.resolve_paths(config)
    configuration.fill_from_dataset(config)
    workdir = paths.resolve(workdir)
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() != 0:
        return _train(config, workdir, threading.Event() if stop is None else stop)
    with workdir_lock.hold(workdir):
        return _train(config, workdir, threading.Event() if stop is None else stop)


def _train(config: ml_collections.ConfigDict, workdir: str, stop: threading.Event) -> dict[str, Any] | None:
    mesh = sharding.make_mesh()
    check_batch(config, mesh)
    data = make_train_data(config)
    data_iterator = iter(data)
    graphdef, state, optimizer = init_state(config, mesh)
    metadata = {"model": configuration.model_record(config), "config": config.to_dict()}
    manager = checkpoints.make_manager(
        workdir, config.train.keep_checkpoints, metadata=metadata, save_every=config.train.checkpoint_every
    )
    step = 0
    restored = checkpoints.restore_latest(manager, state, data_iterator)
    if restored is not None:
        step, state = restored
        logging.info("resumed from %s/checkpoints at step %d", workdir, step)
    writer = _summary_writer(workdir)
    static = {"graphdef": graphdef, "optimizer": optimizer, "mesh": mesh}
    progress = _Progress(config, optimizer, step, writer)
    guard = _NonFiniteGuard(config, workdir, manager, optimizer)
    num_steps, eval_every = config.train.num_steps, config.train.eval_every
    if step < num_steps:
        logging.info(
            "training %d steps of %d images on %d devices (%d processes); the first step compiles",
            num_steps - step,
            config.train.global_batch_size,
            mesh.devices.size,
            jax.process_count(),
        )
    results, stopped = None, False
    first_step, started = step, time.perf_counter()
    unchecked = None  # (step, metrics) of the previous step: checked once the next one is queued, so both overlap
    profiler = _Profiler(config.train.profile_steps, workdir)
    try:
        while step < num_steps:
            batch = sharding.global_batch(next(data_iterator), mesh)
            profiler.before(step + 1)
            with jax.profiler.StepTraceAnnotation("train", step_num=step + 1):
                state, step_metrics = train_step(state, batch, step, **static)
            step += 1
            profiler.after(step, state)
            if unchecked is not None:
                guard.check(*unchecked)
            unchecked = (step, step_metrics)
            if step == first_step + 1:
                jax.block_until_ready(step_metrics)
                logging.info("step %d done in %.1f s (compilation included)", step, time.perf_counter() - started)
                progress.restart(step)
            checkpoints.check_saves(manager)
            stopped = interrupts.requested(manager, step, stop)
            evaluating = bool(eval_every) and (step % eval_every == 0 or step == num_steps)
            logging_now = step % config.train.log_every == 0 or step == num_steps
            saving = stopped or step == num_steps or manager.should_save(step)
            if logging_now or evaluating or saving:
                guard.check(*unchecked)  # before anything of this step is logged, evaluated or saved
                unchecked = None
            if evaluating or saving:
                guard.check_state(step, state)
            if logging_now:
                progress.log(step, float(step_metrics["loss"]), data_iterator.num_skipped)
            evaluated = None
            if evaluating:
                model = eval_model(graphdef, state)
                results = evaluate.evaluate(model, config, step=step, workdir=workdir, writer=writer)
                evaluated = {name: results[name] for name in ("mIoU", "mAcc", "aAcc")}
                progress.restart(step)
            checkpoints.save(manager, step, state, data_iterator, evaluated, force=stopped or step == num_steps)
            if stopped:
                break
        checkpoints.wait_for_saves(manager)
        logging.info("%s", _closing_line(workdir, manager, step, num_steps, results, stopped, stop))
    finally:
        profiler.stop()
        manager.close()
        data_iterator.close()
        if writer is not None:
            writer.close()
    return None if stopped else results


def _closing_line(
    workdir: str,
    manager: Any,
    step: int,
    num_steps: int,
    results: dict[str, Any] | None,
    stopped: bool,
    stop: threading.Event,
) -> str:
    """Where the run stands and where its outputs are."""
    saved = ", ".join(map(str, manager.all_steps()))
    if stopped:
        why = getattr(stop, "signal_name", None) or "a preemption notice"
        return (
            f"stopped by {why} after step {step}/{num_steps}: saved to {workdir}/checkpoints (steps {saved}); "
            "run the same command again to resume"
        )
    scores = f"val mIoU {results['mIoU']:.4f}, aAcc {results['aAcc']:.4f}; " if results else ""
    evaluated = f"evaluation: {workdir}/eval/step_{step}.json; " if results else ""
    best = manager.best_step()
    best = f", best {best}" if best is not None else ""
    return (
        f"done: step {step}/{num_steps}; {scores}checkpoints: {workdir}/checkpoints (steps {saved}{best}); "
        f"{evaluated}TensorBoard: tensorboard --logdir {workdir}/tensorboard"
    )


def _summary_writer(workdir: str) -> SummaryWriter | None:
    """TensorBoard writer for WORKDIR/tensorboard on process 0 (None elsewhere)."""
    return SummaryWriter(f"{workdir}/tensorboard") if jax.process_index() == 0 else None
