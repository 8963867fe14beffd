"""Per-host latency gate: file locks that give one latency measurement the machine to itself."""

from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


def default_lock_dir() -> Path:
    """Where the lock files live: the host's temporary directory (one set per host)."""
    return Path(tempfile.gettempdir()) / "spsa_nas_locks"


class NodeGate:
    """Serialises latency measurements on a host, and optionally pauses training around them.

    Two lock files per host, locked with `flock` (released by the kernel when a process dies, so a
    killed worker never leaves a lock behind):
    - `latency.lock`: a measurement holds it exclusively; a training trial (when
      `pause_training`) holds it shared between two polls of `checkpoint()`.
    - `latency.turnstile`: a measurement holds it exclusively while it waits for the main lock; a
      trainer passes through it (shared, at once released) before re-taking its shared lock, so
      waiting measurements are not starved by trainers.

    Guarantees, for processes on the same host that use this gate: no two measurements overlap;
    with `pause_training`, no training work between two `checkpoint()` calls of another trial
    overlaps a measurement (a measurement waits until every trainer reaches its next checkpoint).
    """

    def __init__(self, lock_dir: str | Path | None = None, *, pause_training: bool = True) -> None:
        self.lock_dir = Path(lock_dir) if lock_dir is not None else default_lock_dir()
        self.pause_training = pause_training
        self._shared: IO[bytes] | None = None

    def _open(self, name: str) -> IO[bytes]:
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        path = self.lock_dir / name
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        return os.fdopen(fd, "r+b")

    @contextmanager
    def latency_lock(self) -> Iterator[None]:
        """Hold the host for one measurement (EvalHooks.latency_lock)."""
        self._release_shared()
        turnstile = self._open("latency.turnstile")
        main = self._open("latency.lock")
        try:
            fcntl.flock(turnstile, fcntl.LOCK_EX)
            fcntl.flock(main, fcntl.LOCK_EX)
            yield
        finally:
            main.close()  # closing the file releases its flock
            turnstile.close()

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
