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
    # One intra-op thread: on a small shared CI machine, more threads oversubscribe the cores
    # (measured: a tiny ResNet's forward took 770 ms with 2 threads under load, 2-7 ms with 1).
    torch.set_num_threads(1)
