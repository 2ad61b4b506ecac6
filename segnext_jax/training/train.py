"""Training: the sharded, jitted train step and the loop around it (checkpoints, evaluation, logs, preemption).

The step is `jax.jit` over a train state replicated on the `data` mesh axis and a batch sharded on it
(segnext_jax.sharding): one program for one CPU, a GPU host or a TPU pod, with BatchNorm statistics over the global
batch (the reference's SyncBN). It is a pure function of (state, batch, step): the random numbers of step s (drop
path, dropout, NMF bases) come from `fold_in(state["rng"], s)`, so a run resumed from a checkpoint repeats the
uninterrupted one exactly.

The train state is a dict: "model" (nnx.state of the SegNeXt: parameters, batch statistics), "opt_state" (the optax
AdamW state of `make_tx`) and "rng" (a PRNG key). Checkpoints hold it with the data iterator's position.
"""

import functools
import threading
import time
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx
from tensorboardX import SummaryWriter

from segnext_jax import checkpoints, models, sharding
from segnext_jax.data import pipeline
from segnext_jax.evaluation import evaluate
from segnext_jax.training.loss import segmentation_loss
from segnext_jax.training.optimizer import SEGNEXT_CUSTOM_KEYS, make_optimizer
from segnext_jax.training.schedule import make_schedule

TrainState = dict[str, Any]


class ConfigError(ValueError):
    """A config value (or a combination of them) training cannot run with; the message names the keys."""


def make_lr_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Factor of the base learning rate at each optimiser step (config.optimizer, over config.train.num_steps)."""
    opt = config.optimizer
    if opt.min_lr != 0.0:
        raise ConfigError(f"config.optimizer.min_lr={opt.min_lr}: only 0.0 (the reference's decay to 0) is supported")
    try:
        return make_schedule(
            config.train.num_steps,
            warmup_iters=opt.warmup_steps,
            warmup_ratio=opt.warmup_ratio,
            power=opt.power,
            form=opt.schedule,
        )
    except ValueError as error:
        raise ConfigError(
            f"config.train.num_steps={config.train.num_steps}, config.optimizer.warmup_steps={opt.warmup_steps}, "
            f"warmup_ratio={opt.warmup_ratio}, schedule={opt.schedule!r}: {error} "
            "(lower config.optimizer.warmup_steps or raise config.train.num_steps)"
        ) from error


def make_tx(params: Any, config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW with the reference's parameter groups (head lr x config.optimizer.head_lr_mult, no decay on norms)."""
    opt = config.optimizer
    custom_keys = {**SEGNEXT_CUSTOM_KEYS, "head": {"lr_mult": opt.head_lr_mult}}
    return make_optimizer(
        params,
        schedule=make_lr_schedule(config),
        lr=opt.lr,
        betas=(opt.b1, opt.b2),
        eps=opt.eps,
        weight_decay=opt.weight_decay,
        custom_keys=custom_keys,
        accumulation_steps=config.train.grad_accum_steps,
    )


def init_state(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> tuple[nnx.GraphDef, TrainState]:
    """The model's graph definition and a fresh train state replicated over `mesh` (pretrained weights loaded)."""
    init_key, train_key = jax.random.split(jax.random.key(config.seed))
    model = models.create(**config.model.to_dict(), rngs=nnx.Rngs(init_key))
    if config.init.pretrained:
        checkpoints.load_pretrained(model, config.init.pretrained, config.init.pretrained_kind)
    graphdef, model_state = nnx.split(model)
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    state = {"model": model_state, "opt_state": make_tx(params, config).init(params), "rng": train_key}
    return graphdef, replicate(state, mesh)


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


@functools.partial(jax.jit, static_argnames=("graphdef", "config", "mesh"), donate_argnames="state")
def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    step: jax.Array,
    *,
    graphdef: nnx.GraphDef,
    config: ml_collections.FrozenConfigDict,
    mesh: jax.sharding.Mesh,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimiser step on the global `batch` dict(image (B, H, W, 3), label (B, H, W)): returns (state, metrics).

    With config.train.grad_accum_steps = k the batch is split into k micro-batches of B/k images (micro-batch j takes
    rows j, j+k, ..., so every device keeps its own rows), each with its own BatchNorm statistics as in the
    reference's gradient accumulation; their gradients are averaged by optax's MultiSteps and applied once. Static
    arguments are hashable, so equal runs in one process share the compilation.
    """
    k = config.train.grad_accum_steps
    batch = jax.lax.with_sharding_constraint(batch, sharding.data_sharding(mesh))
    keys = jax.random.split(jax.random.fold_in(state["rng"], step), k)
    model_state, opt_state = state["model"], state["opt_state"]
    tx = make_tx(nnx.state(nnx.merge(graphdef, model_state), nnx.Param), config)
    losses = []
    for j in range(k):  # unrolled: XLA:CPU runs the step several times slower inside a lax.scan
        images, labels = (x.reshape(x.shape[0] // k, k, *x.shape[1:])[:, j] for x in (batch["image"], batch["label"]))
        model = nnx.merge(graphdef, model_state)
        loss, grads = nnx.value_and_grad(_loss)(model, images, labels, keys[j])
        params = nnx.as_pure(nnx.state(model, nnx.Param))
        updates, opt_state = tx.update(nnx.as_pure(grads), opt_state, params)
        nnx.update(model, optax.apply_updates(params, updates))
        model_state = nnx.state(model)
        losses.append(loss)
    new_state = {"model": model_state, "opt_state": opt_state, "rng": state["rng"]}
    new_state = jax.lax.with_sharding_constraint(new_state, sharding.replicated_sharding(mesh))
    return new_state, {"loss": sum(losses) / k}


def eval_model(graphdef: nnx.GraphDef, state: TrainState) -> nnx.Module:
    """The model of `state` in evaluation mode, on this process's first device (each host evaluates on its own)."""
    local = jax.tree.map(lambda x: x.addressable_data(0), state["model"])
    model = nnx.merge(graphdef, local)
    model.eval()
    return model


def check_batch(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
    """Raises a one-line ConfigError unless every micro-batch splits evenly over the devices."""
    batch, k, devices = config.train.global_batch_size, config.train.grad_accum_steps, mesh.devices.size
    if k < 1 or batch % (k * devices):
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
        source=config.data.source,
        process_index=process_index,
        process_count=process_count,
    )


def _format_duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}"


class _Progress:
    """Console and TensorBoard training scalars: loss, learning rate, images/s and ETA over each logging window."""

    def __init__(self, config: ml_collections.ConfigDict, step: int, writer: SummaryWriter | None):
        self.config = config
        self.schedule = make_lr_schedule(config)
        self.writer = writer
        self.restart(step)

    def restart(self, step: int) -> None:
        """Starts a new timing window at `step` (after compilation, evaluation or a restore)."""
        self.window_start, self.window_step = time.perf_counter(), step

    def log(self, step: int, loss: float, num_skipped: int) -> None:
        """Logs step `step`; speed and ETA over the steps since the window started (none right after a restart)."""
        lr = self.config.optimizer.lr * float(self.schedule(step - 1))
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


def train(
    config: ml_collections.ConfigDict, workdir: str, *, stop: threading.Event | None = None
) -> dict[str, Any] | None:
    """Trains as `config` says in `workdir`, resuming from its latest checkpoint; returns the last validation metrics.

    Every process of a multi-host run calls it with the same arguments. `stop` (e.g. from
    `checkpoints.install_preemption_handler()`, set by SIGTERM) makes the run save the current step and return; a
    multi-host preemption notice does the same. Checkpoints go to WORKDIR/checkpoints, validation results to
    WORKDIR/eval, TensorBoard events to WORKDIR/tensorboard.
    """
    mesh = sharding.make_mesh()
    check_batch(config, mesh)
    data = make_train_data(config)
    data_iterator = iter(data)
    graphdef, state = init_state(config, mesh)
    metadata = {"model": config.model.to_dict(), "config": config.to_dict()}
    manager = checkpoints.make_manager(
        workdir, config.train.keep_checkpoints, metadata=metadata, save_every=config.train.checkpoint_every
    )
    step = 0
    restored = checkpoints.restore_latest(manager, state, data_iterator)
    if restored is not None:
        step, state = restored
        logging.info("resumed from %s/checkpoints at step %d", workdir, step)
    writer = _summary_writer(workdir)
    stop = threading.Event() if stop is None else stop
    static = {"graphdef": graphdef, "config": ml_collections.FrozenConfigDict(config), "mesh": mesh}
    progress = _Progress(config, step, writer)
    num_steps, eval_every = config.train.num_steps, config.train.eval_every
    if step < num_steps:
        logging.info(
            "training %d steps of %d images on %d devices (%d processes); the first step compiles",
            num_steps - step, config.train.global_batch_size, mesh.devices.size, jax.process_count(),
        )
    results = None
    first_step, started = step, time.perf_counter()
    try:
        while step < num_steps:
            batch = sharding.global_batch(next(data_iterator), mesh)
            state, step_metrics = train_step(state, batch, step, **static)
            step += 1
            if step == first_step + 1:
                jax.block_until_ready(step_metrics)
                logging.info("step %d done in %.1f s (compilation included)", step, time.perf_counter() - started)
                progress.restart(step)
            if step % config.train.log_every == 0 or step == num_steps:
                progress.log(step, float(step_metrics["loss"]), data_iterator.num_skipped)
            evaluated = None
            if eval_every and (step % eval_every == 0 or step == num_steps):
                model = eval_model(graphdef, state)
                results = evaluate.evaluate(model, config, step=step, workdir=workdir, writer=writer)
                evaluated = {name: results[name] for name in ("mIoU", "mAcc", "aAcc")}
                progress.restart(step)
            stopping = checkpoints.preempted(manager, step, stop)
            checkpoints.save(manager, step, state, data_iterator, evaluated, force=stopping or step == num_steps)
            if stopping:
                logging.info("stop requested: saved step %d to %s/checkpoints, exiting", step, workdir)
                break
    finally:
        manager.wait_until_finished()
        manager.close()
        data_iterator.close()
        if writer is not None:
            writer.close()
    return results


def _summary_writer(workdir: str) -> SummaryWriter | None:
    """TensorBoard writer for WORKDIR/tensorboard on process 0 (None elsewhere)."""
    return SummaryWriter(f"{workdir}/tensorboard") if jax.process_index() == 0 else None
