"""A real `spsa-nas serve` in a subprocess, and the `spsa-nas` CLI run as one: for the tests, the
benchmarks and any script that talks to a server over HTTP."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

#: The checkout this module was imported from. A child imports the same code: ROOT goes first on its
#: PYTHONPATH, and `-P` keeps its working directory off its path (`-c` would put it first); the
#: server also runs in ROOT, since Ray puts a driver's working directory first on its workers' path.
#: A benchmark run against another checkout through PYTHONPATH from this one's directory then times
#: that checkout's server and workers, not this one's.
ROOT = Path(__file__).resolve().parents[1]
SPSA_NAS = [sys.executable, "-P", "-c", "import sys; from service.cli import main; sys.exit(main())"]


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """os.environ with `env` over it, and ROOT first on PYTHONPATH."""
    merged = {**os.environ, **(env or {})}
    merged["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [merged.get("PYTHONPATH")])])
    return merged


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*SPSA_NAS, *args], capture_output=True, text=True, timeout=timeout, env=child_env(env)
    )


def add_user(data_dir: Path, name: str, *, admin: bool = False) -> str:
    result = cli("users", "add", name, "--data-dir", str(data_dir), *(["--admin"] if admin else []))
    if result.returncode != 0:
        raise RuntimeError(f"spsa-nas users add failed: {result.stderr}")
    return result.stdout.strip()


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux: from /proc)."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            children.append(int(entry.name))
    return children


def pid_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not count)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class Server:
    """`spsa-nas serve` as a real process in its own session (so a kill takes Ray with it): the API
    process (`api_pid`) and, unless SPSA_NAS_CONCURRENT_SEARCHES is 0, its coordinator child
    (`coordinator_pid()`)."""

    def __init__(self, data_dir: Path, *, port: int | None = None, env: dict[str, str] | None = None) -> None:
        self.data_dir = Path(data_dir).resolve()  # the server runs in ROOT
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = child_env({"RAY_AUTH_MODE": "disabled", **(env or {})})
        self.log_path = self.data_dir.parent / f"serve-{self.port}.log"
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 180) -> Server:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("a")
        self.process = subprocess.Popen(
            [*SPSA_NAS, "serve", "--data-dir", str(self.data_dir), "--port", str(self.port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=ROOT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"spsa-nas serve exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.kill()
        raise RuntimeError(f"spsa-nas serve did not answer within {timeout_s} s:\n{self.log()}")

    @property
    def api_pid(self) -> int:
        if self.process is None:
            raise RuntimeError("the server was not started")
        return self.process.pid

    def coordinator_pid(self, timeout_s: float = 30) -> int:
        """The coordinator child of the API process (waits for it to be started)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for pid in child_pids(self.api_pid):
                try:
                    if "coordinator" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                        return pid
                except OSError:
                    continue
            time.sleep(0.1)
        raise RuntimeError(f"no coordinator process under the API {self.api_pid}:\n{self.log()}")

    def kill_api(self) -> None:
        """SIGKILL the API process alone (its coordinator and Ray go on)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)

    def log(self) -> str:
        return self.log_path.read_text()[-6000:] if self.log_path.exists() else ""

    def stop(self, timeout_s: float = 90) -> int | None:
        """SIGTERM to the whole session (API and coordinator: like Ctrl-C), then SIGKILL if it lingers."""
        if self.process is None:
            return None
        children = child_pids(self.process.pid) if self.process.poll() is None else []
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        try:
            code = self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            return None
        while any(pid_alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.1)  # the coordinator's clean stop: searches released
        self.kill()  # whatever of the session is left (Ray's processes)
        return code

    def kill(self) -> None:
        """SIGKILL the server and everything it started (Ray included): a crash."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(30)
