"""Stop requests for the train loop: SIGTERM (preemption, `kill`) and Ctrl-C save the current step, then exit.

The handlers only set an event; the loop polls it once per step (`requested`), saves that step and returns. The first
Ctrl-C hands SIGINT back to the system, so a second one ends the process at once, even inside a long compilation
(nothing more is saved; checkpoints are written atomically, so those already written stay intact). With several
processes JAX's preemption service owns SIGTERM and `manager.reached_preemption(step)` makes every host stop at the
same step; no handler is installed there (hosts that each saw a Ctrl-C at a different step would wait for each other
forever), so Ctrl-C stops them at once.
"""

import signal
import sys
import threading

import jax
import orbax.checkpoint as ocp


class StopRequest(threading.Event):
    """Set by SIGTERM or the first Ctrl-C; `signal_name` says which ('SIGTERM' or 'SIGINT')."""

    signal_name: str | None = None


def install_handlers() -> StopRequest:
    """Routes SIGTERM and SIGINT to the returned event (single process); call from the main thread."""
    request = StopRequest()

    def on_sigterm(signum, frame) -> None:
        request.signal_name = request.signal_name or "SIGTERM"
        request.set()

    def on_sigint(signum, frame) -> None:
        request.signal_name = request.signal_name or "SIGINT"
        request.set()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        print(
            "\nCtrl-C: the current step will be saved, then the run stops (Ctrl-C again to stop at once, without "
            "saving it)",
            file=sys.stderr,
            flush=True,
        )

    if jax.process_count() == 1:
        signal.signal(signal.SIGTERM, on_sigterm)
        signal.signal(signal.SIGINT, on_sigint)
    return request


def requested(manager: ocp.CheckpointManager, step: int, request: threading.Event) -> bool:
    """Whether the run must save `step` and stop: a signal here, or a multi-host preemption sync point."""
    return request.is_set() or manager.reached_preemption(step)
