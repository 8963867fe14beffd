"""The Ray runner against an external two-node `ray start` cluster, and a coordinator killed and restarted."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState
from workers_test_utils import free_port, kill_group

from search_spaces.storage import open_storage

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SCRIPT = Path(__file__).with_name("coordinator_script.py")
RAY = str(Path(sys.executable).with_name("ray"))
FAST = {"heartbeat_s": 0.5, "lease_s": 4.0, "poll_s": 0.2, "cancel_grace_s": 5.0}


def _wait_log(path: Path, text: str, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise AssertionError(f"`ray start` exited with {proc.returncode}:\n{path.read_text()}")
        time.sleep(0.2)
    raise AssertionError(f"`ray start` did not print {text!r} within {timeout} s:\n{path.read_text()}")


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[dict[str, Any]]:
    """A head (1 CPU, resource `head`) and a second node (1 CPU, one logical GPU, resource `node2`),
    token auth on
    with a token of this test only, in a temp dir of their own; killed by process group after."""
    token = secrets.token_hex(16)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    env.pop("RAY_ADDRESS", None)
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port = free_port()
    address = f"127.0.0.1:{port}"
    logs = Path(temp_dir)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for name, args in (
            ("head", ["--head", "--port", str(port), "--resources", '{"head": 1}', "--temp-dir", temp_dir,
                      "--include-dashboard", "false"]),
            ("node2", ["--address", address, "--resources", '{"node2": 1}', "--num-gpus", "1"]),
        ):
            log = logs / f"{name}.log"
            with open(log, "wb") as out:
                proc = subprocess.Popen([RAY, "start", *args, "--num-cpus", "1", "--disable-usage-stats",
                                         "--block"], stdout=out, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
            procs.append(proc)
            _wait_log(log, "Ray runtime started", proc)
        yield {"address": address, "env": env}
    finally:
        for proc in reversed(procs):  # never `ray stop`: it would stop every Ray on the machine
            kill_group(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _coordinator(args: dict[str, Any], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, str(SCRIPT), json.dumps(args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, start_new_session=True)


def _summary(proc: subprocess.Popen[bytes], timeout: float = 300) -> dict[str, Any]:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        kill_group(proc)
    lines = [line for line in out.decode().splitlines() if line.startswith("SUMMARY ")]
    assert proc.returncode == 0 and lines, f"coordinator failed ({proc.returncode}):\n{err.decode()[-4000:]}"
    return json.loads(lines[-1].removeprefix("SUMMARY "))


def _args(name: str, url: str, tmp_path: Path, **extra: Any) -> dict[str, Any]:
    cfg = {"study_name": name, "sampler": "random", "trials": 4, "parallelism": 2,
           "resources": {"num_cpus": 1}}
    cfg.update(extra.pop("cfg", {}))
    return {"cfg": cfg, "storage_url": url, "artifact_dir": str(tmp_path / "artifacts"),
            "synthetic": {"train_s": 2.0, "steps": 10}, "options": FAST, **extra}


def _trials(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=open_storage(url)).get_trials()


def test_search_runs_on_both_nodes_of_an_external_cluster(ray_cluster: dict[str, Any], sqlite_url: str,
                                                          tmp_path: Path) -> None:
    env = ray_cluster["env"]
    summary = _summary(_coordinator(_args("cluster", sqlite_url, tmp_path,
                                          ray_address=ray_cluster["address"]), env))
    assert summary["outcome"] == "done" and summary["finished"] == 4, summary
    assert summary["ray"] == "cluster"
    trials = _trials(sqlite_url, "cluster")
    nodes = {t.user_attrs["node_id"] for t in trials}
    assert len(nodes) == 2, "1 CPU per node and 2 trials in flight: both nodes must have run trials"
    assert all(t.user_attrs["hostname"] for t in trials)

    # Half a GPU and a custom resource per trial: both trials on node2 at once, on "cuda" (the
    # GPU is a logical one: the synthetic trial only records the device it was given).
    pinned = _args("pinned", sqlite_url, tmp_path, ray_address=ray_cluster["address"],
                   cfg={"trials": 2, "resources": {"num_cpus": 0.5, "num_gpus": 0.5}})
    pinned["options"] = {**FAST, "resources": {"node2": 0.5}}
    summary = _summary(_coordinator(pinned, env))
    assert summary["finished"] == 2, summary
    pinned_trials = _trials(sqlite_url, "pinned")
    pinned_nodes = {t.user_attrs["node_id"] for t in pinned_trials}
    assert len(pinned_nodes) == 1 and pinned_nodes < nodes
    assert [t.user_attrs["device"] for t in pinned_trials] == ["cuda", "cuda"]
    assert all(t.user_attrs["device"] == "cpu" for t in trials)


def test_joining_without_the_token_is_a_clear_error(ray_cluster: dict[str, Any], sqlite_url: str,
                                                   tmp_path: Path) -> None:
    env = {k: v for k, v in ray_cluster["env"].items() if not k.startswith("RAY_AUTH")}
    proc = _coordinator(_args("noauth", sqlite_url, tmp_path, ray_address=ray_cluster["address"]), env)
    try:
        _, err = proc.communicate(timeout=300)
    finally:
        kill_group(proc)
    assert proc.returncode != 0
    text = err.decode()
    assert f"could not connect to Ray at '{ray_cluster['address']}'" in text and "RAY_AUTH_MODE" in text


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-4000:]


def _kill_workers_of_running_trials(url: str, name: str) -> None:
    """SIGKILL the Ray worker of every RUNNING trial of the study (if it exists yet)."""
    try:
        trials = _trials(url, name)
    except KeyError:
        return
    for trial in trials:
        if trial.state == TrialState.RUNNING and "worker_pid" in trial.user_attrs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(trial.user_attrs["worker_pid"], signal.SIGKILL)


def test_coordinator_killed_and_restarted_finishes_exactly_once(sqlite_url: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # Trials 2 and 3 hold (RUNNING, x suggested, heartbeats going) until `gate` exists: the test
    # kills the coordinator while they hold, so they cannot have finished, whatever the timing.
    gate = tmp_path / "release-held-trials"
    held_numbers = {2, 3}
    args = _args("restart", sqlite_url, tmp_path, cfg={"trials": 6})
    args["synthetic"] = {"train_s": 0.5, "steps": 5, "hold_numbers": sorted(held_numbers),
                         "hold_file": str(gate)}
    log_path = tmp_path / "first-coordinator.log"
    with open(log_path, "wb") as log:  # a file, not a pipe nobody reads: a full pipe would stall it
        first = subprocess.Popen([sys.executable, str(SCRIPT), json.dumps(args)], stdout=log,
                                 stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        # Two trials in flight at most: trials 2 and 3 are asked only after the tasks of 0 and 1
        # ended, so once both hold, 0 and 1 are told and 2 and 3 are RUNNING until the gate opens.
        deadline = time.monotonic() + 180
        while True:
            if first.poll() is not None:
                raise AssertionError(f"the first coordinator ended early:\n{_tail(log_path)}")
            if time.monotonic() > deadline:
                raise AssertionError(f"trials {held_numbers} never both held:\n{_tail(log_path)}")
            try:
                trials = _trials(sqlite_url, "restart")
            except KeyError:  # the study is not created yet
                trials = []
            holding = {t.number for t in trials if t.state == TrialState.RUNNING and t.user_attrs.get("held")}
            if holding == held_numbers:
                break
            time.sleep(0.2)
    finally:
        kill_group(first)  # kill -9 the coordinator and the Ray it started, mid-search
        # Ray's worker processes are not in the coordinator's process group and may outlive it for
        # a moment; kill them too, as when the coordinator's machine dies.
        _kill_workers_of_running_trials(sqlite_url, "restart")
    before = {t.number: t for t in _trials(sqlite_url, "restart")}
    assert {n for n, t in before.items() if t.state == TrialState.COMPLETE} == {0, 1}, before
    interrupted = {n for n, t in before.items() if t.state == TrialState.RUNNING}
    assert interrupted == held_numbers
    assert len(before) == 4  # nothing else was asked: two tasks in flight, both holding
    gate.touch()  # their workers are dead; nothing after the restart holds

    summary = _summary(_coordinator(args, env))
    assert summary["outcome"] == "done", summary
    trials = _trials(sqlite_url, "restart")
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 6 and summary["finished"] == 6
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    for number in (0, 1):  # finished before the kill: kept as they were, never run again
        assert trials[number].state == TrialState.COMPLETE and trials[number].values == before[number].values
        assert not [t for t in trials if t.user_attrs.get("retry_of") == number]
    for number in interrupted:
        lost = trials[number]
        assert lost.state == TrialState.FAIL and lost.user_attrs["worker_lost"] is True
        retries = [t for t in trials if t.user_attrs.get("retry_of") == number]
        assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
        assert "x" in lost.params and retries[0].params == lost.params
