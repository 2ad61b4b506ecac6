"""The guards around a training run, in-process: config checks, the workdir lock, Ctrl-C / SIGTERM handling."""

import errno
import fcntl
import json
import os
import runpy
import signal
import socket
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest
from absl import logging

from segnext_jax import configuration, paths
from segnext_jax.training import interrupts, train, workdir_lock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(name for name in os.listdir(os.path.join(REPO, "configs")) if name.endswith(".py"))


def load(name: str):
    return runpy.run_path(os.path.join(REPO, "configs", name))["get_config"]()


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_every_shipped_config_passes_the_checks(name):
    config = load(name)
    if config.data.dataset == "folder":  # the user's folder, given on the command line
        config.data.root = "/data/cracks"
    configuration.check(config)


BAD_VALUES = {
    "model.variant": ("x", "config.model.variant='x': choose one of t, s, b, l"),
    "data.bad_example": ("ignore", "config.data.bad_example='ignore': choose one of skip, stop"),
    "train.checkpoint_every": (0, "config.train.checkpoint_every=0: must be an integer >= 1"),
    "train.eval_every": (-1, "config.train.eval_every=-1: must be an integer >= 0"),
    "train.max_nonfinite_in_a_row": (0, "config.train.max_nonfinite_in_a_row=0: must be an integer >= 1"),
    "eval.stride": ((0, 4), 'config.eval.stride=(0, 4): must be two positive integers, e.g. "(512, 512)"'),
    "eval.scales": ((), "config.eval.scales=(): must be positive resize ratios"),
    "data.ratio_range": ((2.0, 0.5), "config.data.ratio_range=(2.0, 0.5): must be (low, high) with 0 < low <= high"),
    "model.dropout_ratio": ("0.1", "config.model.dropout_ratio='0.1': must be a number"),
    "optimizer.min_lr": (1e-6, "config.optimizer.min_lr=1e-06: choose one of 0.0"),
}


@pytest.mark.parametrize("key", BAD_VALUES)
def test_a_bad_value_is_named_in_one_line(key):
    config = load("demo.py")
    section, name = key.split(".")
    value, message = BAD_VALUES[key]
    with config.unlocked():
        config[section][name] = value
    with pytest.raises(configuration.ConfigError) as error:
        configuration.check(config)
    assert str(error.value) == message


TINY = dict(embed_dims=(32, 32, 64, 64), depths=(1, 1, 1, 1), drop_path_rate=0.1, head_channels=64, nmf_rank=8)
BAD_SPECS = {
    "field missing": (
        {"embed_dims": (32, 32, 64, 64)},
        "config.model.variant: a variant spec has the fields embed_dims, depths, drop_path_rate, head_channels, "
        "nmf_rank, mlp_ratios (mlp_ratios optional): missing depths, drop_path_rate, head_channels, nmf_rank",
    ),
    "field unknown": (
        {**TINY, "width": 2},
        "config.model.variant: a variant spec has the fields embed_dims, depths, drop_path_rate, head_channels, "
        "nmf_rank, mlp_ratios (mlp_ratios optional): unknown width",
    ),
    "three stages": ({**TINY, "depths": (1, 1, 1)},
                     "config.model.variant.depths=(1, 1, 1): must be 4 positive integers"),
    "rate": ({**TINY, "drop_path_rate": 1.5}, "config.model.variant.drop_path_rate=1.5: must be a rate in [0, 1)"),
    "not a spec": (3, "config.model.variant=3: give a registered name or a spec (embed_dims, depths, drop_path_rate, "
                   "head_channels, nmf_rank, mlp_ratios)"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_SPECS)
def test_a_variant_spec_passes_and_a_bad_one_is_named_in_one_line(case):
    config = load("demo.py")
    config.model.variant = TINY
    configuration.check(config)
    spec, message = BAD_SPECS[case]
    config.model.variant = spec
    with pytest.raises(configuration.ConfigError) as error:
        configuration.check(config)
    assert str(error.value) == message


def test_a_missing_or_unknown_key_is_named_in_one_line():
    config = load("demo.py")
    config.train.num_stepz = 10
    with pytest.raises(configuration.ConfigError, match=r"^config.train.num_stepz is not a config key"):
        configuration.check(config)
    del config.train["num_stepz"]
    del config.eval["flip"]
    with pytest.raises(configuration.ConfigError, match=r"^config.eval.flip is missing: start the config from "):
        configuration.check(config)


def test_a_crop_beyond_the_resize_bound_at_ratio_1_is_a_warning(caplog):
    config = load("demo.py")
    config.data.crop_size = (200, 200)  # demo scale (256, 128): padded below ratio 1.56, still possible up to 2.0
    with caplog.at_level(logging.WARNING):
        configuration.check(config)
    assert "config.data.crop_size=(200, 200) is larger than config.data.scale=(256, 128): crops of images " in (
        caplog.text
    )


def test_relative_config_paths_are_resolved_against_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load("ade20k_t.py")
    config.data.root = "~/data/ade"
    configuration.resolve_paths(config)
    assert config.init.pretrained == str(tmp_path / "pretrained" / "mscan_t")
    assert config.data.root == os.path.expanduser("~/data/ade")
    assert paths.resolve("gs://bucket/run") == "gs://bucket/run"


HOLD_LOCK = textwrap.dedent(
    """
    import sys, time
    from segnext_jax.training import workdir_lock
    with workdir_lock.hold(sys.argv[1]):
        print("held", flush=True)
        time.sleep(60)
    """
)


def test_the_lock_refuses_a_second_holder_and_is_free_once_the_holder_dies(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(workdir_lock.WorkdirLockedError, match=rf"\(PID {holder.pid} on host "):
            with workdir_lock.hold(str(tmp_path)):
                pass
    finally:
        holder.kill()
        holder.wait()
    with workdir_lock.hold(str(tmp_path)):  # killed: the kernel released its flock
        record = json.loads((tmp_path / workdir_lock.LOCK_FILE).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    assert (tmp_path / workdir_lock.LOCK_FILE).read_text() == ""  # released at the end


@pytest.mark.parametrize("alive", [False, True])
def test_without_flock_the_recorded_pid_decides(tmp_path, monkeypatch, alive):
    """Filesystems without flock (some network mounts): a dead holder of this host is stale, a live one holds it."""
    if alive:
        pid = os.getppid()
    else:
        finished = subprocess.Popen([sys.executable, "-c", "pass"])
        finished.wait()
        pid = finished.pid
    record = {"host": socket.gethostname(), "pid": pid, "started": 0}
    (tmp_path / workdir_lock.LOCK_FILE).write_text(json.dumps(record))

    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    if alive:
        with pytest.raises(workdir_lock.WorkdirLockedError, match=rf"PID {pid} on host"):
            with workdir_lock.hold(str(tmp_path)):
                pass
    else:
        with workdir_lock.hold(str(tmp_path)):
            assert json.loads((tmp_path / workdir_lock.LOCK_FILE).read_text())["pid"] == os.getpid()


@pytest.fixture
def restore_signal_handlers():
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_set_the_stop_request(restore_signal_handlers, sig, capsys):
    request = interrupts.install_handlers()
    assert not request.is_set()
    os.kill(os.getpid(), sig)
    assert request.is_set() and request.signal_name == signal.Signals(sig).name
    if sig == signal.SIGINT:  # the next Ctrl-C ends the process at once
        assert signal.getsignal(signal.SIGINT) is signal.SIG_DFL
        assert "Ctrl-C again to stop at once" in capsys.readouterr().err


class FakeManager:
    def latest_step(self) -> int:
        return 4


class FakeOptimizer:
    def learning_rate(self, step: int) -> float:
        return 6e-5 * (1 - step / 10)


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_non_finite_steps_stop_or_are_skipped_until_too_many_follow(policy, caplog):
    config = load("demo.py")
    config.train.on_nonfinite, config.train.max_nonfinite_in_a_row = policy, 2
    guard = train._NonFiniteGuard(config, "/runs/demo", FakeManager(), FakeOptimizer())
    finite, not_finite = {"finite": True, "loss": 0.5}, {"finite": False, "loss": float("nan")}
    guard.check(5, finite)
    kept = "the newest checkpoint, step 4, is in /runs/demo/checkpoints"
    if policy == "stop":
        with pytest.raises(
            train.NonFiniteError,
            match=r"^step 6: the loss, gradients or learning rate are not finite \(loss nan, learning rate 3e-05\)",
        ):
            guard.check(6, not_finite)
        return
    with caplog.at_level(logging.WARNING):
        guard.check(6, not_finite)  # skipped, 1 in a row
        guard.check(7, finite)  # the count starts again
        guard.check(8, not_finite)
    assert caplog.text.count("update skipped") == 2
    with pytest.raises(train.NonFiniteError) as error:
        guard.check(9, not_finite)  # the second in a row
    assert str(error.value).startswith("step 9: 2 steps in a row with a non-finite loss, gradients or learning rate")
    assert kept in str(error.value)


def test_a_state_that_overflowed_stops_the_run():
    """The step checks its inputs (loss, gradients, learning rate); a state that still came out non-finite is found
    before the trainer evaluates or saves it, and the run stops with one line under either policy."""
    for policy in ("stop", "skip"):
        config = load("demo.py")
        config.train.on_nonfinite = policy
        guard = train._NonFiniteGuard(config, "/runs/demo", FakeManager(), FakeOptimizer())
        state = {"model": {"w": jnp.ones(3), "key": jax.random.key(0)}, "opt_state": (jnp.zeros(2, jnp.int32),)}
        guard.check_state(6, state)  # finite: nothing happens
        state["model"]["w"] = jnp.array([1.0, jnp.inf, 0.0])
        with pytest.raises(train.NonFiniteError) as error:
            guard.check_state(6, state)
        assert str(error.value) == (
            "step 6: the parameters or optimiser moments are not finite although every step's loss, gradients and "
            "learning rate were (an update at or before step 6 overflowed); stopped without saving it (the newest "
            "checkpoint, step 4, is in /runs/demo/checkpoints): lower config.optimizer.lr"
        )
