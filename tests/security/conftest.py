"""Fixtures of the security tests: the service fixtures of tests/service, and `live` (a real server)."""

from __future__ import annotations

from tests.security.live import live_server  # noqa: F401  (the `live` fixture)
from tests.service.conftest import postgres_url, service  # noqa: F401
