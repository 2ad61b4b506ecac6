"""Command line: train or evaluate SegNeXt from a config file.

    python -m segnext_jax.main --config=configs/ade20k_t.py --workdir=runs/ade20k_t [--config.train.num_steps=...]
    python -m segnext_jax.main --config=configs/ade20k_t.py --workdir=runs/ade20k_t --mode=eval [--step=best]

Training resumes from the latest checkpoint in --workdir and evaluates every config.train.eval_every steps.
Evaluation scores a checkpoint of --workdir (or the model given by --checkpoint, e.g. a converted published one) and
writes WORKDIR/eval/step_<N>.json. Run the same command on every host of a multi-host job: JAX's cluster detection
(SLURM, Open MPI, Cloud TPU) joins the processes, or pass --coordinator_address, --num_processes and --process_id.
"""

# Restarted with huge pages for malloc (segnext_jax.malloc) before the imports below, which take 5-8 s and which
# the restarted process would otherwise pay for twice.
if __name__ == "__main__":
    from segnext_jax import malloc

    malloc.restart_with_huge_pages()

import logging as std_logging
import os
import sys

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from segnext_jax import checkpoints, sharding
from segnext_jax.evaluation import evaluate
from segnext_jax.kernels import build
from segnext_jax.training import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/ade20k_t.py.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, evaluation results and TensorBoard logs.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"], "Train (evaluating periodically), or evaluate once.")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "--mode=eval: a training workdir or model directory to evaluate (default: --workdir)."
)
_STEP = flags.DEFINE_string("step", "latest", "--mode=eval in a training workdir: 'latest', 'best' or a step number.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for custom launchers.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes, with --coordinator_address.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, with --coordinator_address.")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache_dir",
    None,
    "Where compiled programs are kept between runs (default: $JAX_COMPILATION_CACHE_DIR, else "
    "$SEGNEXT_JAX_CACHE/xla, i.e. ~/.cache/segnext_jax/xla); '' turns the cache off.",
)
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with one-line errors instead of tracebacks (ml_collections raises a raw KeyError or
    AttributeError for a config key that does not exist)."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as error:
        sys.exit(f"error: {_unknown_key_message(error, argv)}")
    except flags.Error as error:
        sys.exit(f"error: {error}")


def _unknown_key_message(error: Exception, argv: list[str]) -> str:
    """'unknown config key 'lrr' in --config.optimizer.lrr (Did you mean "lr" ...?)' from ml_collections' error."""
    cause = error.args[0] if error.args else error
    text = str(cause.args[0] if isinstance(cause, KeyError) and cause.args else cause)
    key, _, hint = text.partition("\n")
    key = key.strip("'\"")
    names = [arg.split("=")[0] for arg in argv[1:] if arg.startswith("--config.")]
    where = next((f" in {name}" for name in names if key in name.split(".")[1:]), "")
    return f"unknown config key {key!r}{where}" + (f" ({hint})" if hint else "")


def checkpoint_step(workdir: str, step: str) -> int:
    """The step number that 'latest', 'best' or 'N' names among WORKDIR/checkpoints (read only)."""
    options = ocp.CheckpointManagerOptions(
        read_only=True, create=False, best_fn=lambda m: m[checkpoints.BEST_METRIC], best_mode="max"
    )
    with ocp.CheckpointManager(epath.Path(workdir) / "checkpoints", options=options) as manager:
        steps = manager.all_steps()
        chosen = {"latest": manager.latest_step(), "best": manager.best_step()}.get(step)
    if chosen is None and step.isdigit() and int(step) in steps:
        chosen = int(step)
    if chosen is None:
        raise FileNotFoundError(f"--step={step}: no such checkpoint in {workdir}/checkpoints (saved steps: {steps})")
    return chosen


def run_eval(config: ml_collections.ConfigDict, workdir: str, checkpoint: str | None, step: str) -> None:
    """Evaluates a checkpoint (step N of a workdir; step 0 for a model directory) into WORKDIR/eval/step_<N>.json."""
    source = checkpoint or workdir
    if os.path.isdir(os.path.join(source, "checkpoints")):
        number = checkpoint_step(source, step)
        model = checkpoints.restore_model(source, number)
    else:
        number, model = 0, checkpoints.restore_model(source)
    evaluate.evaluate(model, config, step=number, workdir=workdir)


def enable_compilation_cache(directory: str | None) -> None:
    """Keeps compiled training and evaluation steps on disk, so that a resumed run, an evaluation or a rerun loads
    them instead of compiling again (SegNeXt-T's training step: 45 s to compile, 17 s to trace and load on 2 CPU
    cores). `directory`: None for the default (jax's own setting, else the package's cache folder), '' for none."""
    if directory is None:
        directory = jax.config.jax_compilation_cache_dir or str(build.cache_dir() / "xla")
    jax.config.update("jax_compilation_cache_dir", directory or None)
    # The native kernels' sharding rules (custom_partitioning) otherwise put a per-process pointer into the cache key
    # of every multi-device program, which then never hits; the rules depend only on shapes, so this is safe.
    jax.config.update("jax_remove_custom_partitioning_ptr_from_cache_key", bool(directory))


def _quiet_orbax(record: std_logging.LogRecord) -> bool:
    """Keeps orbax's per-save INFO lines out of the console (its warnings and errors still show)."""
    return record.levelno >= std_logging.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname


def main(argv: list[str]) -> None:
    logging.get_absl_handler().addFilter(_quiet_orbax)
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {' '.join(argv[1:])} (flags are --name=value)")
    enable_compilation_cache(_COMPILATION_CACHE.value)
    sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    config, workdir = _CONFIG.value, _WORKDIR.value
    logging.info("%s on %d %s devices, %d processes", _MODE.value, jax.device_count(), jax.default_backend(),
                 jax.process_count())
    try:
        if _MODE.value == "train":
            os.makedirs(workdir, exist_ok=True)
            train.train(config, workdir, stop=checkpoints.install_preemption_handler())
        else:
            run_eval(config, workdir, _CHECKPOINT.value, _STEP.value)
    except (FileNotFoundError, train.ConfigError) as error:  # missing inputs or an unusable config: says what to do
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
