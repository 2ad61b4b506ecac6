"""Compiles a C++ source of this folder into a shared library on first use, cached per machine.

The library goes to `$SEGNEXT_JAX_CACHE` (default `$XDG_CACHE_HOME/segnext_jax`, i.e. `~/.cache/segnext_jax`) under
a name derived from the source, the compiler and its flags, jaxlib's FFI headers and the CPU, so an edit, another
compiler or another machine sharing the home directory gets its own build. The compiler is `$CXX`, else the first
of `c++`, `g++`, `clang++` on the PATH; the flags are `-O3 -march=native` (retried without `-march=native` where the
compiler rejects it), or `-O3` and `$SEGNEXT_JAX_KERNEL_FLAGS` where that is set (for example `-march=x86-64-v3` to
build for every AVX2 machine, or empty for the compiler's baseline). Concurrent first uses (several test workers,
several processes of a run) wait on a file lock, and the library appears atomically, so a process never loads a
half-written file.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import jax
from absl import logging

SOURCE_DIR = Path(__file__).resolve().parent
# A non-void function of this folder's sources that can end without a return is undefined behaviour: an error here,
# never a hidden warning. jaxlib's FFI headers come in through -isystem, so their own warnings (switches over every
# enum value with no return after them, signed / unsigned comparisons) stay theirs and are not printed.
BASE_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-Werror=return-type")
INCLUDE_FLAG = "-isystem"
ARCH_FLAGS = (("-march=native",), ())


class BuildError(RuntimeError):
    """The C++ kernels could not be compiled or loaded; the message says why and what to do."""


def cache_dir() -> Path:
    """Where compiled kernels are kept: $SEGNEXT_JAX_CACHE, else $XDG_CACHE_HOME/segnext_jax (~/.cache/...)."""
    if os.environ.get("SEGNEXT_JAX_CACHE"):
        return Path(os.environ["SEGNEXT_JAX_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "segnext_jax"


def find_compiler() -> list[str]:
    """The C++ compiler command: $CXX, else c++, g++ or clang++ from the PATH."""
    if os.environ.get("CXX"):
        return shlex.split(os.environ["CXX"])
    for name in ("c++", "g++", "clang++"):
        if shutil.which(name):
            return [name]
    raise BuildError("no C++ compiler found: install g++ or clang++, or set CXX")


def arch_flags() -> tuple[tuple[str, ...], ...]:
    """The target flags to try in turn: $SEGNEXT_JAX_KERNEL_FLAGS alone where set, else -march=native, then none."""
    if "SEGNEXT_JAX_KERNEL_FLAGS" in os.environ:
        return (tuple(shlex.split(os.environ["SEGNEXT_JAX_KERNEL_FLAGS"])),)
    return ARCH_FLAGS


def _cpu_identity() -> str:
    """The CPU model and feature flags (what -march=native compiles for)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    wanted = ("model name", "flags", "Features", "CPU part")
    return "\n".join(sorted({line for line in lines if line.split(":")[0].strip() in wanted}))


def _compiler_version(compiler: list[str]) -> str:
    try:
        return subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as error:
        raise BuildError(
            f"C++ compiler {shlex.join(compiler)} does not run ({error}): install one or set CXX"
        ) from error


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (a no-op where fcntl does not exist)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _compile(compiler: list[str], source: Path, output: Path) -> None:
    include = jax.ffi.include_dir()
    errors = []
    for arch in arch_flags():
        command = [*compiler, *BASE_FLAGS, *arch, INCLUDE_FLAG, include, str(source), "-o", str(output)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode == 0:
            return
        errors.append(f"$ {shlex.join(command)}\n{result.stderr[-2000:]}")
    raise BuildError(f"compiling {source.name} failed:\n" + "\n".join(errors))


def build(name: str) -> Path:
    """The shared library of `<name>.cc`, compiled now unless a build for this source and machine is cached."""
    source = SOURCE_DIR / f"{name}.cc"
    compiler = find_compiler()
    include = Path(jax.ffi.include_dir())
    key = hashlib.sha256()
    for part in (
        source.read_bytes(),
        *(header.read_bytes() for header in sorted(SOURCE_DIR.glob("*.h"))),
        repr((compiler, BASE_FLAGS, INCLUDE_FLAG, arch_flags())).encode(),
        _compiler_version(compiler).encode(),
        *(header.read_bytes() for header in sorted(include.glob("xla/ffi/api/*.h"))),
        platform.machine().encode(),
        _cpu_identity().encode(),
    ):
        key.update(part)
    directory = cache_dir()
    library = directory / f"{name}-{key.hexdigest()[:16]}.so"
    if library.exists():
        return library
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BuildError(f"cannot create the kernel cache {directory} ({error}): set SEGNEXT_JAX_CACHE") from error
    try:
        with _locked(directory / f"{name}.lock"):
            if library.exists():  # built by another process while this one waited
                return library
            logging.info("compiling the native CPU kernels %s into %s (once per machine)", source.name, directory)
            with tempfile.TemporaryDirectory(dir=directory) as scratch:
                partial = Path(scratch) / library.name
                _compile(compiler, source, partial)
                os.replace(partial, library)
    except OSError as error:  # a read-only or full cache folder
        raise BuildError(f"cannot write the kernel cache {directory} ({error}): set SEGNEXT_JAX_CACHE") from error
    return library


def load(name: str) -> ctypes.CDLL:
    """`build(name)`, loaded."""
    library = build(name)
    try:
        return ctypes.CDLL(str(library))
    except OSError as error:
        raise BuildError(f"cannot load {library} ({error}): delete it to rebuild") from error


@dataclasses.dataclass(frozen=True)
class NativeKernels:
    """The FFI handlers of one C++ source `<library>.cc`: `symbols` maps XLA target names to C symbols; `what` they
    are and the `fallback` used without them go into the warning logged when they cannot be built."""

    library: str
    symbols: tuple[tuple[str, str], ...]
    what: str
    fallback: str

    def unavailable_reason(self) -> str | None:
        """None once the kernels are compiled and registered with XLA:CPU, else why they cannot be (one line):
        SEGNEXT_JAX_NATIVE_KERNELS=0, or the build failed (also logged once as a warning)."""
        return _register(self)

    def available(self) -> bool:
        """Whether the kernels can be used (builds them on the first call)."""
        return self.unavailable_reason() is None

    def require(self) -> None:
        """Raises RuntimeError saying why if the kernels cannot be used."""
        reason = self.unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"the native CPU {self.what} are unavailable: {reason}")


@functools.cache
def _register(kernels: NativeKernels) -> str | None:
    if os.environ.get("SEGNEXT_JAX_NATIVE_KERNELS", "1") == "0":
        return "turned off by SEGNEXT_JAX_NATIVE_KERNELS=0"
    try:
        library = load(kernels.library)
    except BuildError as error:
        logging.warning("native CPU %s unavailable, using %s: %s", kernels.what, kernels.fallback, error)
        return str(error)
    for target, symbol in kernels.symbols:
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    return None
