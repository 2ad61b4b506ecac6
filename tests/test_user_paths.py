"""The user's path: the README's commands as written, run from a fresh directory, and the faults a real run meets.

The README's ```bash blocks are run literally (only the training command gets a few overrides for speed: 4 steps of
4 images of 64 x 64), from a temporary directory laid out like a fresh clone (its `configs/`), with relative paths,
in subprocesses, as a user types them. Then the same run is interrupted (Ctrl-C, kill -9), diverges, meets a full
disk and a second trainer; each time nothing written is lost, the console shows one line, and resuming ends with
the parameters of the uninterrupted run. All runs share one compilation cache, so only the first compiles.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import tmpfs
from flax import nnx
from PIL import Image

from segnext_jax import checkpoints
from segnext_jax.data import demo
from segnext_jax.training import workdir_lock

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = [
    "--config.train.num_steps=4",
    "--config.train.global_batch_size=4",
    "--config.train.checkpoint_every=2",
    "--config.train.eval_every=4",
    "--config.train.log_every=1",
    "--config.data.crop_size=(64,64)",
    "--config.optimizer.warmup_steps=0",
]
NOISE = ("Traceback", "Unable to initialize backend", "tracked_metric", "Given directory is read only")


def readme_commands() -> list[str]:
    """Every `python -m ...` command of the README's ```bash blocks (the part after `pip install ... &&`)."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    commands = []
    for line in "\n".join(blocks).splitlines():
        line = line.split("&&")[-1].split("#")[0].strip()
        if line.startswith("python -m") and "pytest" not in line:
            commands.append(line)
    return commands


def command_line(command: str) -> list[str]:
    return [sys.executable, *command.split()[1:]]


@pytest.fixture(scope="module")
def env(shared_xla_cache):
    """The environment of every run: one compilation cache for all (outside the workdirs), CPU only."""
    return dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=shared_xla_cache, XLA_FLAGS="")


def run(command: list[str], cwd: Path, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def assert_quiet(result: subprocess.CompletedProcess) -> None:
    output = result.stdout + result.stderr
    for noise in NOISE:
        assert noise not in output, output[-3000:]


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """A directory laid out like a fresh clone (configs/), with two photos to segment."""
    root = tmp_path_factory.mktemp("clone")
    shutil.copytree(REPO / "configs", root / "configs")
    (root / "photos").mkdir()
    for i in range(2):
        Image.fromarray(demo.generate("val", i)["image"]).save(root / "photos" / f"photo{i}.png")
    return root


def train_command() -> list[str]:
    """The README's first command, with OVERRIDES."""
    (first, *_) = readme_commands()
    assert first == "python -m segnext_jax.main --config=configs/demo.py --workdir=workdir/demo"
    return command_line(first) + OVERRIDES


def training(workdir: str | Path, *extra: str) -> list[str]:
    """The README's first command in another workdir, with OVERRIDES and `extra` overrides."""
    return [*command_line(readme_commands()[0])[:-1], f"--workdir={workdir}", *OVERRIDES, *extra]


@pytest.fixture(scope="module")
def trained(clone, env) -> Path:
    """The README's first command, run in the clone: the uninterrupted run the fault tests compare with."""
    result = run(train_command(), clone, env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_quiet(result)
    last = result.stderr.strip().splitlines()[-1]
    workdir = clone / "workdir" / "demo"
    assert "done: step 4/4; val mIoU " in last and f"checkpoints: {workdir}/checkpoints (steps 2, 4" in last, last
    assert (workdir / "eval" / "step_4.json").is_file()
    return workdir


def params(workdir: Path) -> dict[str, np.ndarray]:
    state = nnx.state(checkpoints.restore_model(str(workdir)))
    leaves = jax.tree_util.tree_leaves_with_path(state)
    return {
        jax.tree_util.keystr(path): np.asarray(
            jax.random.key_data(leaf) if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key) else leaf
        )
        for path, leaf in leaves
    }


def assert_same_params(got: Path, want: Path) -> None:
    got, want = params(got), params(want)
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_readme_commands_run_as_written(trained, clone, env):
    """Every other README command (evaluation, predict, conversion, export) on the demo workdir, relative paths."""
    commands = readme_commands()[1:]
    assert any("segnext_jax.predict" in c for c in commands) and any("weights_conversion" in c for c in commands)
    for command in commands:
        result = run(command_line(command), clone, env)
        assert result.returncode == 0, f"{command}\n{result.stderr[-3000:]}"
        assert_quiet(result)
    assert len(list((clone / "predictions" / "overlays").iterdir())) == 2


def test_readme_python_runs_as_written(trained, clone, env):
    """The README's ```python blocks, in the clone after the demo run (they load workdir/demo)."""
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    assert any("loading.load(" in block for block in blocks)
    for block in blocks:
        result = run([sys.executable, "-c", block], clone, env)
        assert result.returncode == 0, f"{block}\n{result.stderr[-3000:]}"


def start_training(clone: Path, env: dict, workdir: str, *extra: str) -> subprocess.Popen:
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    return subprocess.Popen(training(workdir, *extra), cwd=clone, env=env, **pipes)


def wait_for(process: subprocess.Popen, text: str) -> list[str]:
    """stderr lines up to the first containing `text`."""
    lines = []
    for line in process.stderr:
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"never printed {text!r}:\n{''.join(lines)[-3000:]}")


def test_ctrl_c_saves_the_step_and_resumes_exactly(trained, clone, env):
    process = start_training(clone, env, "workdir/ctrl_c")
    wait_for(process, "the first step compiles")
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    workdir = clone / "workdir" / "ctrl_c"
    saved = f"saved to {workdir}/checkpoints (steps 1); run the same command again to resume"
    assert stderr.strip().splitlines()[-1].endswith(f"stopped by SIGINT after step 1/4: {saved}")
    result = run(training("workdir/ctrl_c"), clone, env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stderr
    assert_same_params(workdir, trained)


def test_kill_9_resumes_exactly_and_takes_over_the_stale_lock(trained, clone, env):
    process = start_training(clone, env, "workdir/killed")
    wait_for(process, "step 2/4")
    process.kill()
    process.communicate(timeout=60)
    workdir = clone / "workdir" / "killed"
    assert (workdir / workdir_lock.LOCK_FILE).read_text()  # the killed run's record is left behind
    result = run(training("workdir/killed"), clone, env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"took over {workdir}/{workdir_lock.LOCK_FILE} from a run that is no longer running" in result.stderr
    assert_same_params(workdir, trained)


def test_a_second_trainer_is_refused_while_the_first_runs(trained, clone, env):
    workdir = clone / "workdir" / "locked"
    workdir.mkdir(parents=True)
    with workdir_lock.hold(str(workdir)):
        result = run(training("workdir/locked"), clone, env)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert re.fullmatch(
        rf"error: {workdir} is in use by another training run \(PID {os.getpid()} on host .+, started .+\): wait for "
        r"it to end, stop it, or choose another --workdir",
        result.stderr.strip().splitlines()[-1],
    )


def test_diverging_run_stops_without_saving_and_keeps_the_good_checkpoints(trained, clone, env):
    """config.train.on_nonfinite='stop' (the default); 'skip' is tested in-process (tests/test_run_guards.py)."""
    workdir = clone / "workdir" / "diverged"
    shutil.copytree(trained, workdir)
    before = params(workdir)
    result = run(training(workdir, "--config.train.num_steps=10", "--config.optimizer.lr=inf"), clone, env)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    kept = f"the newest checkpoint, step 4, is in {workdir}/checkpoints"
    assert last.startswith("error: step 5: the loss, gradients or learning rate are not finite (loss ")
    assert kept in last
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4", "metadata"]
    after = params(workdir)
    for name, value in before.items():
        np.testing.assert_array_equal(after[name], value, err_msg=name)


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs mounted at tmp_path/disk, (re)sized by calling the fixture's value with a size in bytes."""
    disk = tmp_path / "disk"
    disk.mkdir()

    def mount(size: int, remount: bool = False) -> Path:
        tmpfs.mount(disk, size, remount)
        return disk

    yield mount
    tmpfs.unmount(disk)


def test_full_disk_stops_at_once_keeps_checkpoints_and_resumes(trained, clone, env, small_disk):
    step_bytes = directory_bytes(trained / "checkpoints" / "2")
    disk = small_disk(int(1.6 * step_bytes))  # room for the first save (step 1), not for the second
    workdir = disk / "run"
    result = run(training(workdir), clone, env)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        rf"error: saving checkpoint step 2 to {workdir}/checkpoints failed: \[Errno 28\] No space left on device.*"
        r"steps \[1\] are intact.*",
        last,
    ), last
    saved = os.listdir(workdir / "checkpoints")
    assert "1" in saved and "2" not in saved  # step 2 only as orbax's temporary folder, removed on restart
    small_disk(6 * step_bytes, remount=True)  # space freed: the same command resumes from step 1
    result = run(training(workdir), clone, env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stderr
    assert_same_params(workdir, trained)
