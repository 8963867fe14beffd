"""Helpers of the Ray runner's process tests: a free port, killing a process group."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """Kill a process started with start_new_session=True and everything in its process group."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)



def open_and_list(url: str) -> int:
    """In a child process: open the storage at `url` (creating its schema if needed); its retries."""
    from search_spaces.storage import open_storage

    storage = open_storage(url)
    storage.get_all_studies()
    storage.close()
    return storage.policy.retries
