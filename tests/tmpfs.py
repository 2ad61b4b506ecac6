"""A size-limited tmpfs for full-disk tests (mounting needs root: the development machines and CI run as root)."""

import ctypes
import os
from pathlib import Path

MS_REMOUNT, MNT_DETACH = 32, 2


def mount(directory: Path, size: int | str, remount: bool = False) -> None:
    """Mounts (or resizes) a tmpfs of `size` bytes (or '600k', '2m') at `directory`; raises OSError on failure."""
    libc = ctypes.CDLL(None, use_errno=True)
    flags = MS_REMOUNT if remount else 0
    if libc.mount(b"tmpfs", os.fsencode(directory), b"tmpfs", flags, f"size={size}".encode()) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(directory))


def unmount(directory: Path) -> None:
    ctypes.CDLL(None, use_errno=True).umount2(os.fsencode(directory), MNT_DETACH)
