"""docker-compose.yml and the Dockerfile agree with what the code reads (Docker does not run here)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy.engine import make_url

from service.settings import ENV_PREFIX, Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _env(service: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in (service.get("environment") or {}).items()}


def _expand(value: str) -> str:
    """${VAR:-default} as compose expands it with VAR unset."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """container path -> named volume."""
    return {m.split(":")[1]: m.split(":")[0] for m in service.get("volumes", [])}


def test_services(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"postgres", "api", "ray-head", "ray-worker"}
    images = {compose["services"][s].get("image") for s in ("api", "ray-head", "ray-worker")}
    assert images == {"spsa-nas:latest"}  # one image, built once from the Dockerfile
    assert compose["services"]["ray-head"]["build"] == "."
    assert (ROOT / "Dockerfile").is_file()


def test_every_spsa_nas_variable_is_a_setting(compose: dict[str, Any]) -> None:
    fields = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}
    for name, service in compose["services"].items():
        for key in _env(service):
            if key.startswith(ENV_PREFIX):
                assert key in fields, f"{name}: {key} is not a setting ({sorted(fields)})"


def test_the_api_settings_validate(compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in _env(compose["services"]["api"]).items():
        monkeypatch.setenv(key, _expand(value))
    settings = load_settings()
    assert settings.port == 8000 and settings.host == "0.0.0.0"
    assert settings.ray_address == "ray-head:6379"


def test_ports_and_addresses_match(compose: dict[str, Any]) -> None:
    services = compose["services"]
    api_env = _env(services["api"])
    published = [p.split(":") for p in services["api"]["ports"]]
    assert [container for _, container in published] == [api_env["SPSA_NAS_PORT"]]
    host, port = api_env["SPSA_NAS_RAY_ADDRESS"].split(":")
    assert host == "ray-head" and f"--port={port}" in services["ray-head"]["command"]
    assert f"--address=ray-head:{port}" in services["ray-worker"]["command"]
    db = make_url(_expand(api_env["SPSA_NAS_DATABASE_URL"]))
    pg_env = _env(services["postgres"])
    assert db.host == "postgres" and db.port == 5432 and db.drivername == "postgresql+psycopg"
    assert db.database == pg_env["POSTGRES_DB"] and db.username == pg_env["POSTGRES_USER"]
    assert db.password == _expand(pg_env["POSTGRES_PASSWORD"])


def test_api_and_workers_share_database_and_volumes(compose: dict[str, Any]) -> None:
    services = compose["services"]
    api_env = _env(services["api"])
    for name in ("ray-head", "ray-worker"):
        env = _env(services[name])
        for key in ("SPSA_NAS_DATABASE_URL", "SPSA_NAS_ARTIFACT_DIR", "SPSA_NAS_DATA_ROOT", "RAY_AUTH_MODE"):
            assert env[key] == api_env[key], (name, key)
        for key in ("SPSA_NAS_ARTIFACT_DIR", "SPSA_NAS_DATA_ROOT"):
            path = api_env[key]
            assert _mounts(services[name])[path] == _mounts(services["api"])[path], (name, key)
    named = set(compose["volumes"])
    for service in services.values():
        assert set(_mounts(service).values()) <= named


def test_workers_reserve_gpus(compose: dict[str, Any]) -> None:
    devices = compose["services"]["ray-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d["capabilities"] and d["driver"] == "nvidia" for d in devices)


def test_dockerfile_runs_the_service() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r'^CMD \["spsa-nas", "serve"', text, re.M)
    for package in ("spsa_nas", "search_spaces", "workers", "service"):
        assert f"COPY {package} " in text
    assert "EXPOSE 8000" in text
