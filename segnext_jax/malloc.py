"""Huge pages for glibc's malloc, turned on by the command-line entry points.

XLA:CPU maps a program's temporaries afresh on every call: with 4 kB pages a SegNeXt-B training step (batch 2,
512 x 512) takes a page fault per 4 kB of temporaries, a large share of its time on a small VM (benchmarks/README.md).
glibc >= 2.35 backs malloc's memory with transparent huge pages when GLIBC_TUNABLES holds glibc.malloc.hugetlb=1, but
reads that only when a process starts, so `python -m segnext_jax.main` and scripts/benchmark.py restart themselves
once with it set. SEGNEXT_JAX_HUGE_PAGES=0 (exactly 0), or any glibc.malloc.hugetlb value of your own, leaves the
environment as is; elsewhere than Linux nothing changes, and an older glibc ignores the setting.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "SEGNEXT_JAX_HUGE_PAGES"
RESTARTED = "SEGNEXT_JAX_HUGE_PAGES_RESTARTED"  # set in the restarted process: never restart twice


def _tunable_names(tunables: str) -> list[str]:
    return [item.split("=", 1)[0] for item in tunables.split(":") if item]


def environment_with_huge_pages(environ: Mapping[str, str], platform: str = sys.platform) -> dict[str, str] | None:
    """`environ` with glibc.malloc.hugetlb=1 added to GLIBC_TUNABLES, or None where it is to stay as it is (not
    Linux, SEGNEXT_JAX_HUGE_PAGES=0, glibc.malloc.hugetlb set already, to any value, or restarted once already: a
    setuid process's glibc drops GLIBC_TUNABLES, and the marker keeps that from restarting forever)."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    if platform != "linux" or environ.get(OPT_OUT) == "0" or RESTARTED in environ:
        return None
    if TUNABLE in _tunable_names(tunables):
        return None
    tunables = f"{tunables}:{TUNABLE}=1" if tunables else f"{TUNABLE}=1"
    return {**environ, "GLIBC_TUNABLES": tunables, RESTARTED: "1"}


def huge_pages_enabled(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process's malloc was asked for huge pages (glibc.malloc.hugetlb set to a value other than 0)."""
    values = dict(item.split("=", 1) for item in environ.get("GLIBC_TUNABLES", "").split(":") if "=" in item)
    return values.get(TUNABLE, "0") != "0"


def restart_with_huge_pages() -> None:
    """Re-executes this process (same interpreter, options and arguments) with huge pages for malloc, unless the
    environment is to stay as it is; call first thing in a `__main__` block, before any work worth keeping."""
    environ = environment_with_huge_pages(os.environ)
    if environ is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, sys.orig_argv, environ)
