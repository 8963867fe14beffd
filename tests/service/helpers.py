"""Helpers of the service tests: the server process (service.testing) and waiting for a state."""

from __future__ import annotations

import time
from typing import Any

import httpx

from service.testing import SPSA_NAS, Server, add_user, cli, free_port

__all__ = ["SPSA_NAS", "Server", "add_user", "cli", "free_port", "wait_for"]


def wait_for(
    client: httpx.Client, path: str, predicate: Any, timeout_s: float, what: str, server: Server | None = None
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        body = client.get(path).json()
        if predicate(body):
            return body
        time.sleep(1.0)
    raise AssertionError(
        f"timed out waiting for {what}; last answer {body}\n{server.log() if server else ''}"
    )
