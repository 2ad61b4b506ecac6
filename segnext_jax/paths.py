"""Paths given by users: resolved once, where they enter (command lines, config values, public functions)."""

import os


def resolve(path: str | os.PathLike) -> str:
    """`path` as an absolute path with `~` expanded, relative to the current working directory.

    orbax-checkpoint refuses relative paths, and a path that is resolved once cannot change meaning later (for
    example when a library changes the working directory). URLs such as `gs://bucket/run` are left as they are.
    """
    path = os.fspath(path)
    if is_url(path):
        return path
    return os.path.abspath(os.path.expanduser(path))


def is_url(path: str) -> bool:
    """Whether `path` is a URL (gs://bucket/...), which orbax and etils read and write, not the local file system."""
    return "://" in path


def why_not_creatable(path: str) -> str | None:
    """Why the local file or folder `path` (absolute) cannot be created, or None if it can: the nearest existing
    folder above it must be a folder this process may write into (the folders in between can be created)."""
    ancestor = os.path.dirname(path)
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        return f"cannot be created, {ancestor} is a file, not a folder"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"cannot be created, no permission to write into {ancestor}"
    return None
