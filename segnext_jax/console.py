"""What the command lines print: this package's lines and the warnings that matter, not the libraries' routine noise.

Left out of the console (all of it still goes to the log file of `log_to_file`):
- jax's INFO records, e.g. "Unable to initialize backend 'tpu'" on every machine without a TPU;
- orbax's INFO records (one per save), its routine warnings (`ROUTINE_ORBAX`) and the tracebacks its background
  threads log when a save fails: that error reaches the main thread, which reports it once;
- asyncio's reports of the same failure in orbax's and TensorStore's unfinished writes, at exit.
"""

import functools
import logging
import os
import sys
import traceback
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from absl import logging as absl_logging

ROUTINE_ORBAX = (
    "Requested `tracked_metric`; did not provide metrics.",  # a step saved without validation metrics
    "Given directory is read only",  # every read-only CheckpointManager (evaluation, predict)
)


def _from_orbax(record: logging.LogRecord) -> bool:
    return f"{os.sep}orbax{os.sep}" in record.pathname


def is_noise(record: logging.LogRecord) -> bool:
    """Whether a log record stays out of the console."""
    if record.name.startswith("jax") and record.levelno < logging.WARNING:
        return True
    if record.name == "asyncio":
        return True
    if not _from_orbax(record):
        return False
    message = record.getMessage()
    routine = any(message.startswith(text) for text in ROUTINE_ORBAX)
    return record.levelno < logging.WARNING or routine or record.exc_info is not None or "Traceback" in message


def _console_filter(record: logging.LogRecord) -> bool:
    return not is_noise(record)


def quiet_library_noise() -> None:
    """Filters the console handlers (absl's and the root logger's) with `is_noise`; safe to call more than once."""
    handlers = {absl_logging.get_absl_handler(), *logging.getLogger().handlers}
    for handler in handlers:
        if not isinstance(handler, _LogFile) and _console_filter not in handler.filters:
            handler.addFilter(_console_filter)


class _LogFile(logging.FileHandler):
    """Every record, library noise included; stops writing (silently) once the disk refuses, e.g. when full."""

    def handleError(self, record: logging.LogRecord) -> None:
        logging.getLogger().removeHandler(self)


def log_to_file(path: str) -> str:
    """Appends every log record of this process to `path` (its folder is created); returns `path`."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    handler = _LogFile(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(filename)s:%(lineno)d] %(message)s"))
    logging.getLogger().addHandler(handler)
    return path


# How the command lines end: a user's error is one line (each command names the errors that are the user's); any
# other exception is our bug and keeps its traceback, followed by a hint to report it.
BUG_HINT = (
    "this is a bug in segnext_jax, not a problem with your input: please report it with the command and the "
    "traceback above"
)

P = ParamSpec("P")
R = TypeVar("R")


def reporting_bugs(main: Callable[P, R]) -> Callable[P, R]:
    """`main` with an unexpected exception printed as its traceback plus BUG_HINT, exit status 1 (as Python's own
    for an uncaught exception). SystemExit and KeyboardInterrupt pass through unchanged."""

    @functools.wraps(main)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return main(*args, **kwargs)
        except Exception:
            traceback.print_exc()
            print(BUG_HINT, file=sys.stderr)
            sys.exit(1)

    return run
