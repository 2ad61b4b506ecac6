"""One trainer per workdir: WORKDIR/train.lock records who holds it (host, PID, start time).

The lock is an `flock` on that file, which the kernel releases when its holder dies, however it dies: a lock left by
a killed run is simply taken over (and said so). Where the filesystem has no `flock` (some network mounts), the
recorded PID decides: a lock of this host whose process is gone is stale. The file is left in place with empty
contents when the run ends, so a concurrent starter never locks a deleted file.
"""

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator

from absl import logging

LOCK_FILE = "train.lock"


class WorkdirLockedError(RuntimeError):
    """Another live training run holds the workdir."""


def _describe(holder: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"PID {holder.get('pid')} on host {holder.get('host')}, started {started}"


def _read(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode(errors="replace").strip()
    try:
        return json.loads(text) if text else {}
    except json.JSONDecodeError:
        return {"pid": "?", "host": "?"}


def _may_be_alive(holder: dict) -> bool:
    """Whether the recorded holder may still run (the fallback where flock is unavailable): another host's process
    cannot be checked from here, so it counts as alive."""
    if holder.get("host") != socket.gethostname():
        return True
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a live process of another user
        return True
    return True


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
    """Holds WORKDIR/train.lock for the block; raises WorkdirLockedError (one line) if a live run holds it."""
    path = os.path.join(workdir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            holder = _read(fd)
        except BlockingIOError:
            raise WorkdirLockedError(
                f"{workdir} is in use by another training run ({_describe(_read(fd))}): wait for it to end, stop it, "
                "or choose another --workdir"
            ) from None
        except OSError as error:
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            holder = _read(fd)
            if holder and holder.get("pid") != os.getpid() and _may_be_alive(holder):
                raise WorkdirLockedError(
                    f"{workdir} is in use by another training run ({_describe(holder)}; {path} without flock): wait "
                    f"for it to end, or delete {path} if that run is gone"
                ) from None
        if holder:
            logging.info("took over %s from a run that is no longer running (%s)", path, _describe(holder))
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the flock
