"""Command line: train or evaluate SegNeXt from a config file, or compile it for a Cloud TPU slice.

    python -m segnext_jax.main --config=configs/ade20k_t.py --workdir=runs/ade20k_t [--config.train.num_steps=...]
    python -m segnext_jax.main --config=configs/ade20k_t.py --workdir=runs/ade20k_t --mode=eval [--step=best]
    python -m segnext_jax.main --config=configs/ade20k_t.py --workdir=runs/ade20k_t --mode=compile --topology=v5e:2x2

Training resumes from the latest checkpoint in --workdir and evaluates every config.train.eval_every steps.
Evaluation scores a checkpoint of --workdir (or the model given by --checkpoint, e.g. a converted published one) and
writes WORKDIR/eval/step_<N>.json. Compilation compiles the training and evaluation steps for a Cloud TPU slice on
this host (segnext_jax.aot) and writes WORKDIR/compile/<topology>_<program>.json. Run the same command on every
host of a multi-host job: JAX's cluster detection (SLURM, Open MPI, Cloud TPU) joins the processes, or pass
--coordinator_address, --num_processes and --process_id.
"""

# Restarted with huge pages for malloc (segnext_jax.malloc) before the imports below, which take 5-8 s and which
# the restarted process would otherwise pay for twice.
if __name__ == "__main__":
    from segnext_jax import malloc

    malloc.restart_with_huge_pages()

import errno
import os
import sys

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from segnext_jax import aot, checkpoints, configuration, console, paths, sharding
from segnext_jax.data import pipeline
from segnext_jax.evaluation import evaluate
from segnext_jax.kernels import build
from segnext_jax.serving import loading
from segnext_jax.training import interrupts, train, workdir_lock

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/ade20k_t.py.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, evaluation results and TensorBoard logs.")
_MODE = flags.DEFINE_enum(
    "mode",
    "train",
    ["train", "eval", "compile"],
    "Train (evaluating periodically), evaluate once, or compile the steps for a Cloud TPU slice (--topology).",
)
_TOPOLOGY = flags.DEFINE_string(
    "topology", "v5e:2x2", "--mode=compile: the Cloud TPU slice, e.g. v5e:2x2, v5e:4x4, v4:2x2x1, v5p:2x2x1, v6e:2x2."
)
_PROGRAMS = flags.DEFINE_list("programs", ["train", "eval"], "--mode=compile: the programs to compile.")
_FIND_MAX_BATCH = flags.DEFINE_bool(
    "find_max_batch", False, "--mode=compile: also search the largest per-chip batch that fits (a compile per try)."
)
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint",
    None,
    "--mode=eval: a training workdir, model directory or PyTorch .pth to evaluate (default: --workdir).",
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


def run_eval(config: ml_collections.ConfigDict, workdir: str, checkpoint: str | None, step: str) -> None:
    """Evaluates a checkpoint (step N of a workdir; step 0 for a model directory or .pth) into
    WORKDIR/eval/step_<N>.json."""
    model, metadata = loading.load(checkpoint or workdir, step)
    number = metadata.get("step", 0)
    results = evaluate.evaluate(model, config, step=number, workdir=workdir)
    logging.info(
        "done: step %d: mIoU %.4f, mAcc %.4f, aAcc %.4f; results: %s/eval/step_%d.json",
        number,
        results["mIoU"],
        results["mAcc"],
        results["aAcc"],
        workdir,
        number,
    )


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


# Errors of the user's input or environment: one line saying what to do (anything else keeps its traceback).
USER_ERRORS = (
    FileNotFoundError,
    configuration.ConfigError,
    pipeline.BadDataError,
    train.NonFiniteError,
    workdir_lock.WorkdirLockedError,
    checkpoints.SaveError,
    *loading.CHECKPOINT_ERRORS,
    aot.CompileError,
)
# OS errors of a full or read-only disk, or a folder the run may not write to.
STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def load_config() -> ml_collections.ConfigDict:
    """The --config file's config (overrides applied); a file that does not exist is a one-line error."""
    filename = config_flags.get_config_filename(flags.FLAGS["config"])
    if not os.path.isfile(filename):
        sys.exit(f"error: --config={filename}: no such file (paths are relative to {os.getcwd()})")
    return _CONFIG.value


def resolve_workdir(workdir: str) -> str:
    """--workdir as an absolute path; one line if it names a file."""
    resolved = paths.resolve(workdir)
    if os.path.exists(resolved) and not os.path.isdir(resolved):
        sys.exit(f"error: --workdir={workdir} is a file, not a folder: choose another --workdir")
    return resolved


def run(mode: str, config: ml_collections.ConfigDict, workdir: str) -> int:
    """Trains, evaluates or compiles; returns the exit status (130 after Ctrl-C, whose step was saved)."""
    if mode == "eval":
        run_eval(config, workdir, _CHECKPOINT.value and paths.resolve(_CHECKPOINT.value), _STEP.value)
        return 0
    if mode == "compile":
        for program in _PROGRAMS.value:  # each logs its summary and where its report is
            aot.compile_report(config, _TOPOLOGY.value, program, workdir, find_max_batch=_FIND_MAX_BATCH.value)
        return 0
    os.makedirs(workdir, exist_ok=True)
    log_file = console.log_to_file(os.path.join(workdir, "logs", f"train_process{jax.process_index()}.log"))
    logging.info("full log (library messages included): %s", log_file)
    stop = interrupts.install_handlers()
    train.train(config, workdir, stop=stop)
    return 130 if stop.signal_name == "SIGINT" else 0


def main(argv: list[str]) -> None:
    console.quiet_library_noise()
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {' '.join(argv[1:])} (flags are --name=value)")
    config, workdir = load_config(), resolve_workdir(_WORKDIR.value)
    try:
        configuration.check(config)  # before anything is compiled or written
        configuration.resolve_paths(config)
        configuration.fill_from_dataset(config)
    except configuration.ConfigError as error:
        sys.exit(f"error: {error}")
    if _MODE.value == "compile":  # for a TPU slice, from this host: no dataset, weights or accelerator needed
        aot.use_host_cpu_only()
    else:
        enable_compilation_cache(_COMPILATION_CACHE.value)
        sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
        logging.info(
            "%s on %d %s devices, %d processes",
            _MODE.value,
            jax.device_count(),
            jax.default_backend(),
            jax.process_count(),
        )
    try:
        status = run(_MODE.value, config, workdir)
    except USER_ERRORS as error:
        sys.exit(f"error: {error}")
    except KeyboardInterrupt:
        print(
            f"error: interrupted: stopped without saving the current step; the checkpoints in {workdir}/checkpoints "
            "are intact: run the same command again to resume from the newest",
            file=sys.stderr,
        )
        sys.exit(130)
    except OSError as error:
        if error.errno not in STORAGE_ERRNOS:
            raise
        sys.exit(
            f"error: writing {error.filename or workdir} failed: {error.strerror}: free some space (or fix the "
            "permissions) and run the same command again (training resumes from the newest checkpoint)"
        )
    sys.exit(status)


if __name__ == "__main__":
    app.run(console.reporting_bugs(main), flags_parser=parse_flags)
