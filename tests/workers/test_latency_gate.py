"""The latency gate's lock directory: private to the service's user, refused when others can write it."""

from __future__ import annotations

import fcntl
import os
import pwd
import re
import select
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from workers import latency_gate
from workers.latency_gate import LOCK_DIR_MODE, LOCK_FILE_MODE, LockDirError, NodeGate, default_lock_dir

ROOT = Path(__file__).resolve().parents[2]
LOCK_FILES = ("latency.lock", "latency.turnstile")


@pytest.fixture
def open_umask() -> Iterator[None]:
    """umask 0: whatever mode the gate asks for is what the files get (no help from the umask)."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _measure(gate: NodeGate) -> None:
    with gate.latency_lock():
        pytest.fail(f"measured with the unsafe lock directory {gate.lock_dir}")


def _use(gate: NodeGate) -> None:
    """One measurement and one trainer checkpoint: every way the gate opens its files."""
    with gate.latency_lock():
        pass
    gate.checkpoint()
    gate.close()


def test_default_lock_dir_is_per_user_not_in_tmp() -> None:
    try:
        home = Path(pwd.getpwuid(os.getuid()).pw_dir)
    except KeyError:
        pytest.skip("this uid has no entry in the password database")
    tmp = Path(tempfile.gettempdir()).resolve()
    if home.resolve().is_relative_to(tmp):
        pytest.skip(f"this user's home {home} lies under {tmp}")
    assert default_lock_dir().is_relative_to(home)
    assert not default_lock_dir().resolve().is_relative_to(tmp)


def test_every_process_of_the_user_agrees_on_the_default(tmp_path: Path) -> None:
    """A service and a login shell of the same user see different environments; one lock dir."""
    try:
        pwd.getpwuid(os.getuid())
    except KeyError:
        pytest.skip("this uid has no entry in the password database: the default follows $HOME")
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HOME": str(tmp_path / "elsewhere"),
        "XDG_RUNTIME_DIR": str(tmp_path / "run"),
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
        "TMPDIR": str(tmp_path),
    }
    code = "from workers.latency_gate import default_lock_dir; print(default_lock_dir())"
    command = [sys.executable, "-c", code]
    out = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == str(default_lock_dir())


def test_default_lock_dir_is_created_private(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, open_umask: None
) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    monkeypatch.setattr(latency_gate, "_home", lambda: home)
    gate = NodeGate()
    assert gate.lock_dir == default_lock_dir() and gate.lock_dir.is_relative_to(home)
    _use(gate)
    created = [gate.lock_dir, *gate.lock_dir.parents]
    created = created[: created.index(home)]  # ~/.cache, ~/.cache/spsa-nas, ... made by the gate
    assert len(created) >= 2
    for directory in created:
        assert _mode(directory) == LOCK_DIR_MODE == 0o700, directory
        assert os.lstat(directory).st_uid == os.getuid(), directory
    for name in LOCK_FILES:
        assert _mode(gate.lock_dir / name) == LOCK_FILE_MODE == 0o600, name


def test_lock_files_are_private(tmp_path: Path, open_umask: None) -> None:
    lock_dir = tmp_path / "locks"
    _use(NodeGate(lock_dir))
    assert _mode(lock_dir) == 0o700
    for name in LOCK_FILES:
        assert _mode(lock_dir / name) == 0o600, name
        assert os.lstat(lock_dir / name).st_uid == os.getuid()


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o770, 0o720], ids=lambda mode: f"{mode:o}")
def test_a_lock_dir_others_can_write_is_refused(tmp_path: Path, mode: int) -> None:
    lock_dir = tmp_path / "shared-locks"
    lock_dir.mkdir()
    lock_dir.chmod(mode)
    gate = NodeGate(lock_dir)
    with pytest.raises(LockDirError, match="writable by other users") as info:
        _measure(gate)
    assert str(lock_dir) in str(info.value) and f"chmod 700 {lock_dir}" in str(info.value)
    with pytest.raises(LockDirError, match=re.escape(str(lock_dir))):
        gate.checkpoint()
    assert not any(lock_dir.iterdir()), "the gate created lock files in a directory it refused"
    lock_dir.chmod(0o700)  # what the message says to do
    _use(gate)


@pytest.mark.skipif(os.getuid() != 0, reason="only root can give a directory to another uid")
def test_a_lock_dir_of_another_user_is_refused(tmp_path: Path) -> None:
    lock_dir = tmp_path / "theirs"
    lock_dir.mkdir(mode=0o700)
    os.chown(lock_dir, 54321, 54321)
    with pytest.raises(LockDirError, match=re.escape(f"{lock_dir} is owned by uid 54321")):
        _measure(NodeGate(lock_dir))


def test_a_symlinked_lock_dir_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.mkdir(mode=0o700)
    link = tmp_path / "locks"
    link.symlink_to(target)
    with pytest.raises(LockDirError, match=re.escape(f"{link} is a symbolic link")):
        _measure(NodeGate(link))
    assert not any(target.iterdir())


def test_a_file_in_place_of_the_lock_dir_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "locks"
    path.write_text("")
    with pytest.raises(LockDirError, match=re.escape(f"{path} is not a directory")):
        NodeGate(path).checkpoint()


CHILD = """
import sys
from pathlib import Path
from workers.latency_gate import NodeGate

with NodeGate(sys.argv[1]).latency_lock():
    print("measuring", flush=True)
    sys.stdin.readline()
    Path(sys.argv[2]).write_text("released")  # before the lock is let go
"""


def _read_line(proc: subprocess.Popen[str], timeout_s: float = 60.0) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    assert ready, f"the child said nothing in {timeout_s} s"
    return proc.stdout.readline().strip()


def test_two_processes_cannot_measure_at_once(tmp_path: Path) -> None:
    lock_dir, marker = tmp_path / "locks", tmp_path / "child-released"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(lock_dir), str(marker)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=ROOT,
        env=env,
        text=True,
    )
    try:
        assert _read_line(child) == "measuring"
        # the child holds the host: no one else can take the lock now
        with open(lock_dir / "latency.lock", "rb") as probe:
            with pytest.raises(BlockingIOError):
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            with pytest.raises(BlockingIOError):
                fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
        seen: list[bool] = []
        entered = threading.Event()

        def measure() -> None:
            with NodeGate(lock_dir).latency_lock():
                seen.append(marker.exists())  # the child wrote it before letting go of the lock
                entered.set()

        thread = threading.Thread(target=measure)
        thread.start()
        assert child.stdin is not None
        child.stdin.write("go\n")
        child.stdin.flush()
        assert entered.wait(60), "the measurement never got the lock after the child let it go"
        thread.join(60)
        assert seen == [True], "a measurement ran while another process held the lock"
        assert child.wait(60) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(30)
