"""Fixtures of the security tests: the service fixtures of tests/service, re-exported."""

from __future__ import annotations

from tests.service.conftest import postgres_url, service  # noqa: F401
