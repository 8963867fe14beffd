"""Shared pytest fixtures: a deterministic CPU torch, a temporary work directory."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # Ray 2.60 wants token auth by default; tests that start clusters set it up themselves.
    monkeypatch.setenv("PYTHONHASHSEED", os.environ.get("PYTHONHASHSEED", "0"))


def pytest_configure(config: pytest.Config) -> None:
    try:
        import torch
    except ImportError:
        return
    # 2 cores here: one intra-op thread per test process keeps tests from oversubscribing.
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
