"""Huge pages for malloc: the environment the entry points restart with, and that a restarted process gets them."""

import os
import re
import subprocess
import sys

import pytest

from segnext_jax import malloc


def test_environment_adds_the_tunable_and_keeps_the_rest():
    assert malloc.environment_with_huge_pages({"A": "1"}, "linux") == {
        "A": "1",
        "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1",
        malloc.RESTARTED: "1",
    }
    with_other = malloc.environment_with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "linux")
    assert with_other == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1", malloc.RESTARTED: "1"}
    assert malloc.huge_pages_enabled(with_other)


@pytest.mark.parametrize(
    "environ,platform",
    [
        ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "linux"),  # the user's own choice, even "off"
        ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=2"}, "linux"),
        ({"SEGNEXT_JAX_HUGE_PAGES": "0"}, "linux"),
        ({"SEGNEXT_JAX_HUGE_PAGES_RESTARTED": "1"}, "linux"),  # restarted, even if glibc dropped GLIBC_TUNABLES
        ({}, "darwin"),
    ],
)
def test_environment_is_left_alone(environ, platform):
    assert malloc.environment_with_huge_pages(environ, platform) is None


def test_huge_pages_enabled_reads_the_value():
    assert not malloc.huge_pages_enabled({})
    assert not malloc.huge_pages_enabled({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    assert malloc.huge_pages_enabled({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})


RESTARTED = """
import os, sys
from segnext_jax import malloc
print("started", flush=True)
malloc.restart_with_huge_pages()
block = bytearray(256 << 20)  # a malloc'd mapping, touched
block[::4096] = b"x" * len(block[::4096])
smaps = "/proc/self/smaps"
text = open(smaps).read() if os.path.exists(smaps) else ""
huge = sum(int(n) for n in __import__("re").findall(r"AnonHugePages:\\s+(\\d+)", text))
print(os.environ.get("GLIBC_TUNABLES"), sys.argv[1:], huge)
"""


def _transparent_huge_pages_mode() -> str:
    """The kernel's THP mode: 'always', 'madvise' (what glibc's tunable asks for) or 'never'."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as setting:
            return re.search(r"\[(\w+)\]", setting.read()).group(1)
    except (OSError, AttributeError):
        return "never"


def test_a_restarted_process_keeps_its_arguments_and_gets_huge_pages():
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", malloc.OPT_OUT, malloc.RESTARTED)}

    def run(*arguments, **extra_env):
        result = subprocess.run(
            [sys.executable, "-c", RESTARTED, *arguments], env={**env, **extra_env}, capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        return result.stdout.splitlines()

    lines = run("--flag=1", "x")
    if sys.platform != "linux":  # no glibc tunables: the process runs on, unrestarted, its environment untouched
        assert lines[0] == "started" and lines[1].startswith("None ['--flag=1', 'x']")
        return
    assert lines[:2] == ["started", "started"]  # once before, once after the restart, and only once
    tunables, arguments, huge_kib = re.fullmatch(r"(\S+) (\[.*\]) (\d+)", lines[2]).groups()
    assert tunables == "glibc.malloc.hugetlb=1" and arguments == "['--flag=1', 'x']"
    mode = _transparent_huge_pages_mode()
    if mode != "never":
        assert int(huge_kib) >= 2048  # the touched block is backed by 2 MB pages

    lines = run(SEGNEXT_JAX_HUGE_PAGES="0")  # opted out: no restart, 4 kB pages where the kernel only madvises
    assert len(lines) == 2 and lines[0] == "started"
    tunables, arguments, huge_kib = re.fullmatch(r"(\S+) (\[.*\]) (\d+)", lines[1]).groups()
    assert tunables == "None" and arguments == "[]"
    if mode == "madvise":
        assert int(huge_kib) == 0


@pytest.mark.parametrize(
    "command,heavy,usage",
    [
        (["-m", "segnext_jax.main", "--help"], "jax", "Command line: train or evaluate SegNeXt"),  # absl exits 1
        (
            [os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts", "benchmark.py"), "--help"],
            "torch",
            "usage:",
        ),
    ],
)
def test_entry_points_restart_before_their_heavy_imports(command, heavy, usage):
    # -X importtime logs every import of both processes (the restarted one keeps the option): `heavy` once only,
    # after the restart, which thus costs the interpreter's start and not the 5-8 s of imports again
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", malloc.OPT_OUT, malloc.RESTARTED)}
    result = subprocess.run(
        [sys.executable, "-X", "importtime", *command], env=env, capture_output=True, text=True, timeout=300
    )
    assert usage in result.stdout + result.stderr, result.stderr[-2000:]
    lines = result.stderr.splitlines()
    imports = [line.rsplit("|", 1)[-1].strip() for line in lines if line.startswith("import time:")]
    assert imports.count(heavy) == 1
    restarts = imports.count("segnext_jax.malloc")
    assert restarts == (2 if sys.platform == "linux" else 1)  # imported before and after the restart
