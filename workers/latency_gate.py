"""Per-host latency gate: file locks that give one latency measurement the machine to itself."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import pwd
import socket
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

LOCK_DIR_MODE = 0o700  # the lock directory: only the service's user may enter or write it
LOCK_FILE_MODE = 0o600


class LockDirError(RuntimeError):
    """The latency lock directory is unsafe (another user could hold or replace the locks) or unusable."""


def _home() -> Path:
    """The current user's home from the password database, so every process of this uid agrees
    whatever its environment; $HOME where the uid has no entry (a container run with a bare uid)."""
    try:
        return Path(pwd.getpwuid(os.getuid()).pw_dir)
    except KeyError:
        return Path.home()


def default_lock_dir() -> Path:
    """Where the lock files live: ~/.cache/spsa-nas/locks/<hostname>, one set per user and host.

    Only the current user can write it (created 0o700), so another local user can neither hold the
    lock nor plant a file in its place; every process of the same user on this host shares it,
    which is what serialises their measurements. Not $XDG_RUNTIME_DIR or $XDG_CACHE_HOME: a
    service and a login shell of the same user often see different values, which would split the
    lock. The hostname keeps hosts apart when home directories are shared (NFS).
    """
    return _home() / ".cache" / "spsa-nas" / "locks" / socket.gethostname()


def _make_dirs(path: Path) -> None:
    """Create `path` and its missing parents, each LOCK_DIR_MODE (the umask may only narrow it)."""
    missing = []
    for parent in (path, *path.parents):
        if os.path.lexists(parent):
            break
        missing.append(parent)
    for directory in reversed(missing):
        # another process may make it first: it is then checked like any existing directory
        with contextlib.suppress(FileExistsError):
            os.mkdir(directory, LOCK_DIR_MODE)


def _open_lock_dir(path: Path) -> int:
    """A descriptor of the lock directory, created if missing, after checking it is safe: a real
    directory (not a symlink), owned by this uid and writable by no one else."""
    try:
        _make_dirs(path)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if os.path.islink(path):  # O_NOFOLLOW: ELOOP, or ENOTDIR with O_DIRECTORY (Linux)
            reason = "is a symbolic link"
        elif exc.errno in (errno.ENOTDIR, errno.ELOOP):
            reason = "is not a directory"
        else:
            reason = f"cannot be created or opened ({exc.strerror})"
        raise LockDirError(
            f"latency lock directory {path} {reason}; remove it, or choose another directory "
            "(RunnerOptions.lock_dir) that this user owns"
        ) from None
    info = os.fstat(fd)
    problem = None
    if info.st_uid != os.getuid():
        problem = f"is owned by uid {info.st_uid}, not by this user (uid {os.getuid()})"
    elif info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        problem = f"is writable by other users (mode {stat.S_IMODE(info.st_mode):o})"
    if problem is not None:
        os.close(fd)
        raise LockDirError(
            f"latency lock directory {path} {problem}: another user could hold or replace the "
            f"latency locks and stall every search; run `chmod 700 {path}` as its owner, or choose "
            "another directory (RunnerOptions.lock_dir) that only this user can write"
        )
    return fd


class NodeGate:
    """Serialises latency measurements on a host, and optionally pauses training around them.

    Two lock files per host, locked with `flock` (released by the kernel when a process dies, so a
    killed worker never leaves a lock behind):
    - `latency.lock`: a measurement holds it exclusively; a training trial (when
      `pause_training`) holds it shared between two polls of `checkpoint()`.
    - `latency.turnstile`: a measurement holds it exclusively while it waits for the main lock; a
      trainer passes through it (shared, at once released) before re-taking its shared lock, so
      waiting measurements are not starved by trainers.

    Guarantees, for processes of the same user on the same host that use this gate: no two
    measurements overlap; with `pause_training`, no training work between two `checkpoint()` calls
    of another trial overlaps a measurement (a measurement waits until every trainer reaches its
    next checkpoint). The lock directory (default: default_lock_dir()) must belong to this user
    and be writable by no one else; LockDirError says what to do when it is not.
    """

    def __init__(self, lock_dir: str | Path | None = None, *, pause_training: bool = True) -> None:
        self.lock_dir = Path(lock_dir) if lock_dir is not None else default_lock_dir()
        self.pause_training = pause_training
        self._shared: IO[bytes] | None = None

    def _open(self, name: str) -> IO[bytes]:
        dir_fd = _open_lock_dir(self.lock_dir)
        try:
            flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(name, flags, LOCK_FILE_MODE, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
        return os.fdopen(fd, "r+b")

    @contextmanager
    def latency_lock(self) -> Iterator[None]:
        """Hold the host for one measurement (EvalHooks.latency_lock)."""
        self._release_shared()
        # closing a file releases its flock: the main lock first, then the turnstile
        with self._open("latency.turnstile") as turnstile, self._open("latency.lock") as main:
            fcntl.flock(turnstile, fcntl.LOCK_EX)
            fcntl.flock(main, fcntl.LOCK_EX)
            yield

    def checkpoint(self) -> None:
        """Called between training steps: let a waiting measurement run, then go on training."""
        if not self.pause_training:
            return
        self._release_shared()
        turnstile = self._open("latency.turnstile")
        try:
            fcntl.flock(turnstile, fcntl.LOCK_SH)  # blocks while a measurement waits or runs
        finally:
            turnstile.close()
        shared = self._open("latency.lock")
        fcntl.flock(shared, fcntl.LOCK_SH)
        self._shared = shared

    def _release_shared(self) -> None:
        if self._shared is not None:
            self._shared.close()
            self._shared = None

    def close(self) -> None:
        """Stop holding the host (end of the trial)."""
        self._release_shared()
