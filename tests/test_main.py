"""python -m segnext_jax.main: bad command lines and missing inputs end in one line saying what to do."""

import os
import subprocess
import sys

import data_fakes
import pytest

from segnext_jax.data import datasets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CASES = {
    "unknown leaf key": (
        ["--config=configs/demo.py", "--config.optimizer.lrr=1"],
        """error: unknown config key 'lrr' in --config.optimizer.lrr (Did you mean "lr" instead of "lrr"?)""",
    ),
    "unknown section": (
        ["--config=configs/demo.py", "--config.trian.num_steps=3"],
        """error: unknown config key 'trian' in --config.trian.num_steps (Did you mean "train" instead of "trian"?)""",
    ),
    "missing dataset": (
        ["--config=configs/ade20k_t.py", "--config.data.root=/nonexistent/ade"],
        "error: ade20k data not found at /nonexistent/ade: "
        + datasets.DATASETS["ade20k"].prepare.replace("ROOT", "/nonexistent/ade"),
    ),
    "warm-up longer than the run": (
        ["--config=configs/demo.py", "--config.train.num_steps=2"],
        "error: config.train.num_steps=2, config.optimizer.warmup_steps=30, warmup_ratio=1e-06, schedule='mmseg': "
        "warmup_iters=30, max_iters=2: mmseg's schedule needs warmup_iters 0 or >= 2 and max_iters >= warmup_iters + 2 "
        "(lower config.optimizer.warmup_steps or raise config.train.num_steps)",
    ),
    "no images in a batch": (
        ["--config=configs/demo.py", "--config.train.global_batch_size=0"],
        "error: config.train.global_batch_size=0: must be an integer >= 1",
    ),
    "no logging interval": (
        ["--config=configs/demo.py", "--config.train.log_every=0"],
        "error: config.train.log_every=0: must be an integer >= 1",
    ),
    "unknown dataset": (
        ["--config=configs/demo.py", "--config.data.dataset=ade20"],
        f"error: config.data.dataset='ade20': choose one of {', '.join(datasets.NAMES)}",
    ),
    "crop larger than every resized image": (
        ["--config=configs/demo.py", "--config.data.crop_size=(512,512)"],
        "error: config.data.crop_size=(512, 512) is larger than any resized training image (config.data.scale="
        "(256, 128) x ratio_range up to 2.0: at most 512 x 256), so every crop would be mostly padding: lower "
        "crop_size or raise scale",
    ),
    "unknown non-finite policy": (
        ["--config=configs/demo.py", "--config.train.on_nonfinite=ignore"],
        "error: config.train.on_nonfinite='ignore': choose one of stop, skip",
    ),
    "config file that does not exist": (
        ["--config=configs/ade20k_x.py"],
        f"error: --config=configs/ade20k_x.py: no such file (paths are relative to {REPO})",
    ),
    "missing pretrained backbone": (
        ["--config=configs/demo.py", "--config.init.pretrained=/nonexistent/mscan_t"],
        "error: config.init.pretrained='/nonexistent/mscan_t' does not exist: convert the published ImageNet backbone "
        "with `python -m weights_conversion mscan_<variant>.pth /nonexistent/mscan_t` (download links in README.md), "
        "or set --config.init.pretrained='' to train from random weights",
    ),
}


def fake_ade20k_with_a_broken_image(root: str) -> tuple[list[str], str]:
    """Arguments training on a fake ADE20K with one training image, broken, and the error it ends in."""
    data_fakes.make_ade20k(root, num_train=1, num_val=1)
    broken = os.path.join(root, "images", "training", "ADE_train_00000000.jpg")
    with open(broken, "wb") as f:
        f.write(b"not an image")
    args = [
        "--config=configs/ade20k_t.py",
        f"--config.data.root={root}",
        "--config.init.pretrained=",
        "--config.data.bad_example=stop",
        "--config.data.num_workers=0",
    ]
    return args, f"error: bad training example (bad_example='stop'): {broken}: not a decodable image"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every case's (return code, stderr), run in parallel; each gets its own empty workdir (one is a file)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    a_file = tmp_path_factory.mktemp("file") / "workdir"
    a_file.write_text("")
    cases = {
        **CASES,
        "workdir that is a file": (
            ["--config=configs/demo.py", f"--workdir={a_file}"],
            f"error: --workdir={a_file} is a file, not a folder: choose another --workdir",
        ),
        "bad example with bad_example=stop": fake_ade20k_with_a_broken_image(str(tmp_path_factory.mktemp("ade"))),
    }
    started = {}
    for name, (args, _) in cases.items():
        workdir = str(tmp_path_factory.mktemp("workdir"))
        command = [sys.executable, "-m", "segnext_jax.main", f"--workdir={workdir}", *args]
        pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
        process = subprocess.Popen(command, cwd=REPO, env=env, **pipes)
        started[name] = (process, workdir)
    finished = {}
    for name, (process, workdir) in started.items():
        _, stderr = process.communicate(timeout=300)
        finished[name] = (process.returncode, stderr.replace(workdir, "WORKDIR"), cases[name][1])
    return finished


@pytest.mark.parametrize("case", [*CASES, "workdir that is a file", "bad example with bad_example=stop"])
def test_error_is_one_line_saying_what_to_do(runs, case):
    returncode, stderr, expected = runs[case]
    assert returncode == 1
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == expected


CACHED_COMPILE = """
import sys
import jax, jax.numpy as jnp
from segnext_jax import main
main.enable_compilation_cache(sys.argv[1] or None)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.jit(lambda x: jnp.sin(x) * 3)(jnp.ones(5)).block_until_ready()
print(jax.config.jax_compilation_cache_dir)
"""


@pytest.mark.parametrize("flag", ["given", "default"])
def test_compiled_programs_are_kept_for_the_next_run(tmp_path, flag):
    given = str(tmp_path / "given") if flag == "given" else ""
    env = dict(os.environ, JAX_PLATFORMS="cpu", SEGNEXT_JAX_CACHE=str(tmp_path / "home_cache"))
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    command = [sys.executable, "-c", CACHED_COMPILE, given]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    expected = tmp_path / ("given" if flag == "given" else "home_cache/xla")
    assert result.stdout.strip() == str(expected)
    assert any(expected.iterdir())  # the compiled program was written there


SHARDED_NATIVE_COMPILE = """
import sys
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
from segnext_jax import main
from segnext_jax.models import depthwise
main.enable_compilation_cache(sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
x = jax.device_put(jnp.ones((2, 6, 6, 8)), NamedSharding(mesh, PartitionSpec("data")))
step = jax.jit(lambda x, k: depthwise.depthwise_conv(x, k, (1, 1), "native"))
step(x, jnp.ones((3, 3, 1, 8))).block_until_ready()
"""


def test_sharded_programs_with_native_kernels_are_found_in_the_cache(tmp_path):
    """The kernels' sharding rules must not make every multi-device program's cache key unique to its process."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    cache = tmp_path / "xla"
    entries = []
    for _ in range(2):
        result = subprocess.run(
            [sys.executable, "-c", SHARDED_NATIVE_COMPILE, str(cache)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr
        entries.append(sorted(path.name for path in cache.iterdir()))
    assert entries[0] and entries[1] == entries[0]  # the second run compiled nothing new
