"""Synthetic trials (no model): for measuring the Ray runner's overhead and for testing its failure paths."""

from __future__ import annotations

import os
import time

import optuna

from workers.ray_runner import TrialContext, TrialStoppedError


def synthetic_trial(
    study: optuna.Study,
    trial: optuna.Trial,
    ctx: TrialContext,
    *,
    train_s: float = 0.0,
    train_s_cycle: tuple[float, ...] = (),
    steps: int = 1,
    measure_s: float = 0.0,
    fail_numbers: tuple[int, ...] = (),
    ignore_stop: bool = False,
    record_windows: bool = False,
    record_priority: bool = False,
    hold_numbers: tuple[int, ...] = (),
    hold_file: str | None = None,
) -> None:
    """Suggest x in [-1, 1], 'measure' for `measure_s` under the latency lock, 'train' for `train_s`
    in `steps` steps (polling `ctx.should_stop` before each), then tell.

    train_s_cycle: trial n 'trains' train_s_cycle[n % len] seconds instead of train_s (trials of
    unequal length, as real ones are).
    fail_numbers: trial numbers that raise RuntimeError (a trial that crashes).
    ignore_stop: never poll should_stop (a trial that must be stopped by force).
    record_windows: store the measurement window and the training-step windows (unix seconds) as
    user attrs `measure_window` and `step_windows`, to check the latency protocol.
    record_priority: store the CPU niceness the trial ran at as user attr `nice`.
    hold_numbers, hold_file: trial numbers that, once x is suggested, set user attr `held` and wait
    (never polling should_stop) until the file `hold_file` exists: a trial a test knows is RUNNING
    and will stay so until the test releases it or kills its worker.
    """
    if hold_numbers and hold_file is None:
        raise ValueError("synthetic_trial: hold_numbers needs hold_file, the file that releases them")
    x = trial.suggest_float("x", -1.0, 1.0)
    if trial.number in hold_numbers and hold_file is not None:
        trial.set_user_attr("held", True)
        while not os.path.exists(hold_file):
            time.sleep(0.05)
    if record_priority:
        trial.set_user_attr("nice", os.getpriority(os.PRIO_PROCESS, 0))
    if measure_s > 0:
        with ctx.latency_lock():
            start = time.time()
            time.sleep(measure_s)
            end = time.time()
        if record_windows:
            trial.set_user_attr("measure_window", [start, end])
    if train_s_cycle:
        train_s = train_s_cycle[trial.number % len(train_s_cycle)]
    windows: list[list[float]] = []
    for _ in range(max(1, steps)):
        if not ignore_stop and ctx.should_stop():
            raise TrialStoppedError(f"trial {trial.number} stopped")
        start = time.time()
        time.sleep(train_s / max(1, steps))
        windows.append([start, time.time()])
    if not ignore_stop:
        ctx.should_stop()  # the last step ends at a checkpoint too
    if record_windows:
        trial.set_user_attr("step_windows", windows)
    if trial.number in fail_numbers:
        raise RuntimeError(f"synthetic failure of trial {trial.number}")
    values = [1.0 - x * x, x * x][: len(study.directions)]
    study.tell(trial, values)
