"""The Ray runner on a local Ray: a real search, crashes, killed and frozen workers, cancellation,
the latency protocol."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState

from search_spaces.config import Resources, SearchConfig
from search_spaces.keys import run_cancel_attr
from search_spaces.run import RunReport
from search_spaces.storage import open_storage
from search_spaces.study import create_study
from spsa_nas.config import DataConfig, LatencyConfig, TrainConfig
from workers.ray_runner import RunnerOptions, run_search
from workers.synthetic import synthetic_trial

pytestmark = [pytest.mark.ray]

FAST = RunnerOptions(heartbeat_s=0.5, lease_s=4.0, poll_s=0.2, cancel_grace_s=5.0)

TINY_SPACE = """\
name: tiny
description: the smallest real space, for the runner's tests
backbone: resnet18
stem: cifar
input_size: 16
width: [0.25]
all_stages:
  spsa: [false, true]
  heads: [1]
  alpha: [1]
  channel_attn: [none, se]
"""


def _cfg(name: str, **overrides: Any) -> SearchConfig:
    base: dict[str, Any] = {"study_name": name, "sampler": "random", "trials": 4, "parallelism": 2,
                            "resources": Resources(num_cpus=1)}
    base.update(overrides)
    return SearchConfig(**base)


def _study(url: str, name: str, **overrides: Any) -> str:
    """Create the study of `_cfg(name, **overrides)` (what the CLI and the service do before a run)."""
    storage = open_storage(url)
    create_study(_cfg(name, **overrides), storage)
    storage.close()
    return name


def _trials(url: str, name: str) -> list[FrozenTrial]:
    return optuna.load_study(study_name=name, storage=open_storage(url)).get_trials()


def _in_thread(fn: Callable[[], RunReport]) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["summary"] = fn()
        except BaseException as error:  # surfaced by the test
            out["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, out


def _finish(thread: threading.Thread, out: dict[str, Any], timeout: float = 300) -> RunReport:
    thread.join(timeout)
    assert not thread.is_alive(), f"run_search did not return within {timeout} s"
    if "error" in out:
        raise out["error"]
    return out["summary"]


def _wait_running(url: str, name: str, out: dict[str, Any], count: int = 1, timeout: float = 120
                  ) -> list[FrozenTrial]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if out:
            raise AssertionError(f"run_search ended before {count} trials ran: {out}")
        try:
            running = [t for t in _trials(url, name)
                       if t.state == TrialState.RUNNING and "worker_pid" in t.user_attrs and t.params]
        except KeyError:  # the study is not created yet
            running = []
        if len(running) >= count:
            return running
        time.sleep(0.1)
    raise AssertionError(f"no {count} running trials within {timeout} s")


@pytest.mark.slow
def test_embedded_real_search(ray_local: None, sqlite_url: str, tmp_path: Path) -> None:
    space = tmp_path / "tiny.yaml"
    space.write_text(TINY_SPACE)
    cfg = _cfg("real", space=str(space), trials=3,
               dataset=DataConfig(name="digits", train_subset=96),
               train=TrainConfig(epochs=1, batch_size=16),
               latency=LatencyConfig(warmup=1, repeats=3))
    artifacts = tmp_path / "artifacts"
    create_study(cfg, sqlite_url)
    summary = run_search("real", sqlite_url, artifact_dir=artifacts, options=FAST)
    assert summary.outcome == "done", summary
    assert summary.finished == 3 and summary.counts["fail"] == 0, summary
    assert summary.ray == "caller"  # the session's Ray was used, and left running
    trials = _trials(sqlite_url, "real")
    assert len(trials) == 3
    for trial in trials:
        assert trial.state == TrialState.COMPLETE
        attrs = trial.user_attrs
        assert attrs["device"] == "cpu" and attrs["node_id"] and attrs["worker_pid"] != os.getpid()
        assert attrs["spec"]["backbone"] == "resnet18" and 0.0 <= attrs["val_acc"] <= 1.0
        assert len(trial.values) == 2 and trial.values[1] == attrs["latency_ms"] > 0
        assert (artifacts / attrs["weights_artifact"]).is_file()


def test_trial_exception_is_fail_with_traceback_and_search_goes_on(ray_local: None, sqlite_url: str,
                                                                    tmp_path: Path) -> None:
    trial_fn = functools.partial(synthetic_trial, fail_numbers=(0, 2))
    summary = run_search(_study(sqlite_url, "crash"), sqlite_url, artifact_dir=tmp_path, trial_fn=trial_fn,
                         options=FAST)
    assert summary.outcome == "done" and summary.finished == 4, summary
    failed = [t for t in _trials(sqlite_url, "crash") if t.state == TrialState.FAIL]
    assert sorted(t.number for t in failed) == [0, 2]
    for trial in failed:
        assert trial.user_attrs["error"] == f"RuntimeError: synthetic failure of trial {trial.number}"
        assert "Traceback" in trial.user_attrs["traceback"]
        assert "retry_of" not in trial.user_attrs  # a crash is not retried, only a lost worker


def test_trials_run_at_the_niceness_asked_for(ray_local: None, sqlite_url: str, tmp_path: Path) -> None:
    # The service runs trials nicer than its API; worker processes are reused, so ask for the
    # most the shared session Ray's workers may already have.
    trial_fn = functools.partial(synthetic_trial, record_priority=True)
    options = RunnerOptions(heartbeat_s=0.5, lease_s=4.0, poll_s=0.2, nice=19)
    summary = run_search(_study(sqlite_url, "nice", trials=2), sqlite_url, artifact_dir=tmp_path,
                         trial_fn=trial_fn, options=options)
    assert summary.finished == 2, summary
    assert [t.user_attrs["nice"] for t in _trials(sqlite_url, "nice")] == [19, 19]
    assert os.getpriority(os.PRIO_PROCESS, 0) < 19  # the coordinator itself is left alone
    with pytest.raises(ValueError, match="nice must be between 0 and 19"):
        RunnerOptions(nice=20)


def test_search_stops_when_every_trial_crashes(ray_local: None, sqlite_url: str, tmp_path: Path) -> None:
    trial_fn = functools.partial(synthetic_trial, fail_numbers=tuple(range(1000)))
    options = RunnerOptions(heartbeat_s=0.5, lease_s=4.0, poll_s=0.2, max_consecutive_failures=3)
    summary = run_search(_study(sqlite_url, "doomed", parallelism=1), sqlite_url, artifact_dir=tmp_path,
                         trial_fn=trial_fn, options=options)
    assert summary.outcome == "failing" and summary.crashed == 3 and summary.finished == 0
    assert "synthetic failure" in summary.last_error


def _check_lost_and_retried(url: str, name: str, victim: FrozenTrial, summary: RunReport,
                            trials_asked: int) -> FrozenTrial:
    trials = _trials(url, name)
    lost = trials[victim.number]
    assert lost.state == TrialState.FAIL and lost.user_attrs["worker_lost"] is True
    assert lost.user_attrs["reason"].startswith("worker lost")
    retries = [t for t in trials if t.user_attrs.get("retry_of") == victim.number]
    assert len(retries) == 1
    assert retries[0].state == TrialState.COMPLETE and retries[0].params == lost.params
    assert retries[0].user_attrs["attempt"] == 1
    assert summary.outcome == "done" and summary.duplicate_claims == 0, summary
    assert summary.finished == trials_asked
    assert sum(t.state == TrialState.COMPLETE for t in trials) == trials_asked
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    return lost


@pytest.mark.slow
def test_worker_killed_mid_trial_is_failed_retried_and_search_finishes(
        ray_local: None, sqlite_url: str, tmp_path: Path) -> None:
    trial_fn = functools.partial(synthetic_trial, train_s=3.0, steps=30)
    thread, out = _in_thread(lambda: run_search(_study(sqlite_url, "kill"), sqlite_url, artifact_dir=tmp_path,
                                                trial_fn=trial_fn, options=FAST))
    victim = _wait_running(sqlite_url, "kill", out)[0]
    os.kill(victim.user_attrs["worker_pid"], signal.SIGKILL)
    killed_at = time.time()
    summary = _finish(thread, out)
    lost = _check_lost_and_retried(sqlite_url, "kill", victim, summary, 4)
    assert summary.worker_lost == 1 and summary.retries_enqueued == 1
    assert summary.crashed == 1  # a killed worker (the OOM killer's SIGKILL) counts as a crash
    # failed within the lease (here Ray reports the dead worker even sooner)
    assert lost.datetime_complete.timestamp() - killed_at <= FAST.lease_s + 5 * FAST.poll_s + 2


@pytest.mark.slow
def test_frozen_worker_loses_its_lease(ray_local: None, sqlite_url: str, tmp_path: Path) -> None:
    """SIGSTOP: the process lives (Ray sees nothing) but its heartbeat stops; the lease expires."""
    trial_fn = functools.partial(synthetic_trial, train_s=3.0, steps=30)
    thread, out = _in_thread(lambda: run_search(_study(sqlite_url, "frozen"), sqlite_url,
                                                artifact_dir=tmp_path, trial_fn=trial_fn, options=FAST))
    victim = _wait_running(sqlite_url, "frozen", out)[0]
    pid = victim.user_attrs["worker_pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        summary = _finish(thread, out)
    finally:
        with contextlib.suppress(ProcessLookupError):  # the task was force-cancelled; never leave
            os.kill(pid, signal.SIGCONT)  # a stopped process behind
    lost = _check_lost_and_retried(sqlite_url, "frozen", victim, summary, 4)
    assert "no heartbeat" in lost.user_attrs["reason"]


def _check_cancelled(url: str, name: str, summary: RunReport) -> None:
    assert summary.outcome == "cancelled", summary
    trials = _trials(url, name)
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    stopped = [t for t in trials if t.state == TrialState.FAIL]
    assert len(stopped) >= 2 and summary.cancelled_trials == len(stopped)
    for trial in stopped:
        assert trial.user_attrs["cancelled"] is True and trial.user_attrs["reason"] == "cancelled"


@pytest.mark.slow
def test_cancel_reaches_running_trials_through_the_runs_study_attr(ray_local: None, sqlite_url: str,
                                                                    tmp_path: Path) -> None:
    """should_cancel is the one input; the coordinator tells its tasks (which see only the
    database) through the study attr of its run, and they stop by themselves: the grace before
    killing them is longer than the test waits."""
    trial_fn = functools.partial(synthetic_trial, train_s=120.0, steps=1200)
    options = RunnerOptions(heartbeat_s=0.5, lease_s=4.0, poll_s=0.2, cancel_grace_s=600.0)
    cancel = threading.Event()
    thread, out = _in_thread(lambda: run_search(_study(sqlite_url, "cancel", trials=20), sqlite_url,
                                                artifact_dir=tmp_path, trial_fn=trial_fn, options=options,
                                                should_cancel=cancel.is_set))
    _wait_running(sqlite_url, "cancel", out, count=2)
    cancel.set()
    summary = _finish(thread, out, timeout=60)  # far below the trials' 120 s and the 600 s grace
    _check_cancelled(sqlite_url, "cancel", summary)
    study = optuna.load_study(study_name="cancel", storage=open_storage(sqlite_url))
    assert summary.run_id and study.user_attrs[run_cancel_attr(summary.run_id)] is True


@pytest.mark.slow
def test_cancel_kills_trials_that_ignore_it(ray_local: None, sqlite_url: str, tmp_path: Path) -> None:
    trial_fn = functools.partial(synthetic_trial, train_s=120.0, steps=1, ignore_stop=True)
    options = RunnerOptions(heartbeat_s=0.5, lease_s=4.0, poll_s=0.2, cancel_grace_s=1.0)
    cancel = threading.Event()
    thread, out = _in_thread(lambda: run_search(_study(sqlite_url, "force", trials=20), sqlite_url,
                                                artifact_dir=tmp_path, trial_fn=trial_fn, options=options,
                                                should_cancel=cancel.is_set))
    _wait_running(sqlite_url, "force", out, count=2)
    cancel.set()
    summary = _finish(thread, out, timeout=60)
    _check_cancelled(sqlite_url, "force", summary)
    study = optuna.load_study(study_name="force", storage=open_storage(sqlite_url))
    cancel_attrs = [key for key in study.user_attrs if key.startswith("spsa_nas:cancel")]
    assert cancel_attrs == [run_cancel_attr(summary.run_id)]  # this run is cancelled, not the study


def _overlap(a: list[float], b: list[float]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


@pytest.mark.slow
def test_latency_measurements_have_the_host_to_themselves(ray_local: None, sqlite_url: str,
                                                          tmp_path: Path) -> None:
    trial_fn = functools.partial(synthetic_trial, measure_s=0.3, train_s=1.5, steps=15, record_windows=True)
    options = RunnerOptions(heartbeat_s=0.5, lease_s=4.0, poll_s=0.2, lock_dir=str(tmp_path / "locks"))
    summary = run_search(_study(sqlite_url, "latency", trials=6, parallelism=3), sqlite_url,
                         artifact_dir=tmp_path, trial_fn=trial_fn, options=options)
    assert summary.finished == 6, summary
    trials = _trials(sqlite_url, "latency")
    assert len({t.user_attrs["worker_pid"] for t in trials}) >= 2  # trials really ran side by side
    for trial in trials:
        window = trial.user_attrs["measure_window"]
        for other in trials:
            if other.number == trial.number:
                continue
            assert not _overlap(window, other.user_attrs["measure_window"]), "two measurements overlapped"
            for step in other.user_attrs["step_windows"]:
                assert not _overlap(window, step), (
                    f"trial {other.number} trained during trial {trial.number}'s measurement")


def test_a_freed_slot_takes_the_next_trial_while_a_long_one_runs(ray_local: None, sqlite_url: str,
                                                                 tmp_path: Path) -> None:
    """Parallelism 2 with trial 0 held: the other slot runs trials 1-4 one after another. The
    coordinator polls rarely here (poll_s 600): a finished task must wake it, not the poll."""
    release = tmp_path / "release"
    trial_fn = functools.partial(synthetic_trial, hold_numbers=(0,), hold_file=str(release))
    options = RunnerOptions(heartbeat_s=0.5, lease_s=60.0, poll_s=600.0, cancel_grace_s=5.0)
    name = _study(sqlite_url, "slot", trials=5)
    thread, out = _in_thread(lambda: run_search(name, sqlite_url, artifact_dir=tmp_path / "artifacts",
                                                trial_fn=trial_fn, options=options))
    try:
        deadline = time.monotonic() + 120
        complete: list[FrozenTrial] = []
        while len(complete) < 4 and time.monotonic() < deadline and not out:
            time.sleep(0.2)
            complete = [t for t in _trials(sqlite_url, name) if t.state == TrialState.COMPLETE]
        held = [t for t in _trials(sqlite_url, name) if t.user_attrs.get("held")]
    finally:
        release.touch()
    summary = _finish(thread, out)
    assert [t.number for t in held] == [0] and held[0].state == TrialState.RUNNING
    assert sorted(t.number for t in complete) == [1, 2, 3, 4], \
        f"while trial 0 ran, only {sorted(t.number for t in complete)} finished"
    assert summary.outcome == "done" and summary.finished == 5


def test_time_budget_stops_new_trials_and_lets_running_ones_finish(ray_local: None, sqlite_url: str,
                                                                    tmp_path: Path) -> None:
    trial_fn = functools.partial(synthetic_trial, train_s=0.5, steps=5)
    summary = run_search(_study(sqlite_url, "budget", trials=1000, timeout_s=3.0), sqlite_url,
                         artifact_dir=tmp_path, trial_fn=trial_fn, options=FAST)
    assert summary.outcome == "timeout", summary
    trials = _trials(sqlite_url, "budget")
    assert 0 < summary.finished < 1000 and summary.finished == len(trials)
    assert all(t.state == TrialState.COMPLETE for t in trials)  # none cut off, none left RUNNING


def test_a_trial_past_its_memory_limit_is_killed_and_counted_as_a_crash(
        ray_local: None, sqlite_url: str, tmp_path: Path) -> None:
    """Every trial allocates until its memory guard kills its worker (as the OOM killer would):
    each loss is retried and counted, so the search stops at the crash streak instead of for ever."""

    def hog(study: optuna.Study, trial: optuna.Trial, ctx: Any) -> None:  # pickled by value: local
        trial.suggest_float("x", -1.0, 1.0)
        chunks = []
        for _ in range(24):  # 24 x 64 MiB, well past the limit; the guard looks every 0.1 s
            chunks.append(b"\x01" * (64 << 20))  # filled, so resident
            time.sleep(0.2)
        study.tell(trial, [1.0])

    options = RunnerOptions(heartbeat_s=0.5, lease_s=4.0, poll_s=0.2, max_consecutive_failures=2,
                            memory_bytes=768 << 20, memory_check_s=0.1)
    name = _study(sqlite_url, "hog", parallelism=1, trials=2, max_retries=3)
    summary = run_search(name, sqlite_url, artifact_dir=tmp_path, trial_fn=hog, options=options)
    assert summary.outcome == "failing" and summary.finished == 0, summary
    assert summary.crashed == 2 and summary.worker_lost == 2, summary
    assert "memory limit" in (summary.last_error or ""), summary
    trials = _trials(sqlite_url, "hog")
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(failed) == 2
    assert all(t.user_attrs["worker_lost"] and "limit 805306368 bytes" in t.user_attrs["memory_exceeded"]
               for t in failed)
    assert failed[1].user_attrs["retry_of"] == 0  # the lost trial was retried, and lost again
    # the second loss's retry stays enqueued (WAITING) for a later run; nothing else was started
    assert [t.state for t in trials[2:]] == [TrialState.WAITING]


def test_a_trial_pending_on_resources_fails_the_search_with_the_reason(
        ray_local: None, sqlite_url: str, tmp_path: Path) -> None:
    """num_gpus=1 on the CPU-only local Ray: the task is never scheduled; past the runner's
    pending timeout the search fails saying what it asked for, instead of waiting for ever."""
    name = _study(sqlite_url, "no-gpu", resources=Resources(num_cpus=1, num_gpus=1))
    options = RunnerOptions(heartbeat_s=0.5, lease_s=4.0, poll_s=0.2, pending_timeout_s=3.0)
    started = time.monotonic()
    summary = run_search(name, sqlite_url, artifact_dir=tmp_path, trial_fn=synthetic_trial, options=options)
    assert summary.outcome == "failing", summary
    assert "waited 3 s for resources" in (summary.last_error or "")
    assert "num_gpus=1" in (summary.last_error or "") and "pending_timeout_s" in (summary.last_error or "")
    assert _trials(sqlite_url, "no-gpu") == [] and summary.crashed == 0
    assert time.monotonic() - started < 60


def test_trials_queued_behind_others_on_a_busy_node_are_not_pending(
        ray_local: None, sqlite_url: str, tmp_path: Path) -> None:
    """Each trial takes both CPUs, so trials run one after another; each waits in Ray's queue far
    longer than the pending timeout, yet a node could run it: the search finishes, it is not failed."""
    name = _study(sqlite_url, "busy", trials=3, parallelism=3, resources=Resources(num_cpus=2))
    options = RunnerOptions(heartbeat_s=0.5, lease_s=10.0, poll_s=0.1, pending_timeout_s=0.5)
    trial_fn = functools.partial(synthetic_trial, train_s=1.5, steps=3)
    summary = run_search(name, sqlite_url, artifact_dir=tmp_path, trial_fn=trial_fn, options=options)
    assert summary.outcome == "done" and summary.finished == 3 and summary.crashed == 0, summary
    assert [t.state for t in _trials(sqlite_url, "busy")] == [TrialState.COMPLETE] * 3


def test_a_run_that_ends_in_an_error_stops_its_tasks(
        ray_local: None, sqlite_url: str, tmp_path: Path) -> None:
    """The coordinator's own failure (here: its cancel check raises, as a database call past its
    retries would) stops the tasks it started instead of leaving them training unwatched."""
    from sqlalchemy.exc import OperationalError

    name = _study(sqlite_url, "broken", trials=1)
    gate = tmp_path / "never"  # the trial holds until this file exists: only a cancel ends it
    trial_fn = functools.partial(synthetic_trial, hold_numbers=(0,), hold_file=str(gate))
    options = RunnerOptions(heartbeat_s=0.5, lease_s=10.0, poll_s=0.1)

    def should_cancel() -> bool:
        held = [t for t in _trials(sqlite_url, "broken") if t.user_attrs.get("held")]
        if held:  # the trial is running in its worker: now the coordinator's database "goes away"
            raise OperationalError("SELECT 1", {}, Exception("server closed the connection"))
        return False

    with pytest.raises(OperationalError):
        run_search(name, sqlite_url, artifact_dir=tmp_path, trial_fn=trial_fn, options=options,
                   should_cancel=should_cancel)
    pid = _trials(sqlite_url, "broken")[0].user_attrs["worker_pid"]
    deadline = time.monotonic() + 60
    while _alive(pid):  # the task was cancelled by force: its worker process is gone
        assert time.monotonic() < deadline, "the trial's worker kept running after the run failed"
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
