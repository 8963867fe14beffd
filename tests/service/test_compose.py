"""docker-compose.yml and the Dockerfile agree with what the code reads (Docker does not run here)."""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy.engine import make_url

from service.cli.serve import GRACEFUL_SHUTDOWN_S
from service.core.settings import ENV_PREFIX, Settings, load_settings
from service.searches.dispatcher import Dispatcher

ROOT = Path(__file__).resolve().parents[2]
SECRETS = ("POSTGRES_PASSWORD", "RAY_AUTH_TOKEN")  # compose must refuse to start without them
SECRET_ENV = {"POSTGRES_PASSWORD": "pg-s3cret", "RAY_AUTH_TOKEN": "ray-t0ken"}  # an operator's .env
RAY_SHUTDOWN_MARGIN_S = 10.0  # ray.shutdown() after the dispatcher's joins: unbounded, seconds in practice
RAY_DASHBOARD_PORT = 8265
SPSA_SERVICES = ("api", "coordinator", "ray-head", "ray-worker")  # the services of our image
_INTERPOLATION = re.compile(  # $$ | ${NAME} ${NAME-x} ${NAME:-x} ${NAME?x} ${NAME:?x} | $NAME
    r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)"
)


class MissingVariableError(Exception):
    """compose refuses to start: a ${VAR:?message} (or ${VAR?message}) variable is not set."""


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _env(service: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in (service.get("environment") or {}).items()}


def _expand(value: str, env: Mapping[str, str] | None = None) -> str:
    """`value` as compose interpolates it with `env` as the environment (default: empty).

    $$, $VAR, ${VAR}, ${VAR-default}, ${VAR:-default}, ${VAR?message}, ${VAR:?message}; the colon
    forms treat an empty value as unset. A required variable that is missing raises
    MissingVariableError with compose's message.
    """
    env = env or {}

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(4)
        op, arg = match.group(2), match.group(3) or ""
        value = env.get(name)
        missing = value is None or (op is not None and op.startswith(":") and value == "")
        if not missing:
            return str(value)
        if op is None:
            return ""
        if op.endswith("?"):
            raise MissingVariableError(f"required variable {name} is missing a value: {arg}")
        return arg

    return _INTERPOLATION.sub(substitute, value)


def _duration_s(value: str | int) -> float:
    """A compose duration ("90s", "2m", "1m30s", "1h", "500ms"; a bare number: seconds) in seconds."""
    text = str(value).strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a compose duration: {value!r}")
    return sum(float(n) * units[u] for n, u in parts)


def _published(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(host side, container port) of each published port, short or long syntax."""
    out = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            host = f"{port.get('host_ip', '')}:{port.get('published', '')}"
            out.append((host, str(port["target"])))
        else:
            *host, container = str(port).split(":")
            out.append((":".join(host), container.split("/")[0]))
    return out


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """container path -> named volume."""
    return {m.split(":")[1]: m.split(":")[0] for m in service.get("volumes", [])}


def test_services(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"postgres", "api", "coordinator", "ray-head", "ray-worker"}
    images = {compose["services"][s].get("image") for s in SPSA_SERVICES}
    assert images == {"spsa-nas:latest"}  # one image, built once from the Dockerfile
    assert compose["services"]["ray-head"]["build"] == "."
    assert (ROOT / "Dockerfile").is_file()


def test_every_spsa_nas_variable_is_a_setting(compose: dict[str, Any]) -> None:
    fields = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}
    checked = []
    for name, service in compose["services"].items():
        for key in _env(service):
            if key.startswith(ENV_PREFIX):
                assert key in fields, f"{name}: {key} is not a setting ({sorted(fields)})"
                checked.append((name, key))
    # the services that run spsa-nas are configured by such variables: the check saw them
    assert {name for name, _ in checked} == set(SPSA_SERVICES)


def test_the_api_settings_validate(compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in _env(compose["services"]["api"]).items():
        monkeypatch.setenv(key, _expand(value, SECRET_ENV))
    settings = load_settings()
    assert settings.port == 8000 and settings.host == "0.0.0.0"
    assert settings.concurrent_searches == 0  # the API runs no search: the coordinator does


def test_the_coordinator_runs_the_searches(compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    coordinator = compose["services"]["coordinator"]
    assert coordinator["command"] == ["spsa-nas", "coordinator"]
    assert not coordinator.get("ports")  # nothing to publish: it talks to the database and Ray only
    for key, value in _env(coordinator).items():
        monkeypatch.setenv(key, _expand(value, SECRET_ENV))
    settings = load_settings()
    assert settings.concurrent_searches >= 1 and settings.ray_address == "ray-head:6379"


def test_ports_and_addresses_match(compose: dict[str, Any]) -> None:
    services = compose["services"]
    api_env = _env(services["api"])
    assert [container for _, container in _published(services["api"])] == [api_env["SPSA_NAS_PORT"]]
    host, port = _env(services["coordinator"])["SPSA_NAS_RAY_ADDRESS"].split(":")
    assert host == "ray-head" and f"--port={port}" in services["ray-head"]["command"]
    assert f"--address=ray-head:{port}" in services["ray-worker"]["command"]
    db = make_url(_expand(api_env["SPSA_NAS_DATABASE_URL"], SECRET_ENV))
    pg_env = _env(services["postgres"])
    assert db.host == "postgres" and db.port == 5432 and db.drivername == "postgresql+psycopg"
    assert db.database == pg_env["POSTGRES_DB"] and db.username == pg_env["POSTGRES_USER"]
    assert db.password == _expand(pg_env["POSTGRES_PASSWORD"], SECRET_ENV) == SECRET_ENV["POSTGRES_PASSWORD"]


def test_api_and_workers_share_database_and_volumes(compose: dict[str, Any]) -> None:
    services = compose["services"]
    api_env = _env(services["api"])
    for name in ("coordinator", "ray-head", "ray-worker"):
        env = _env(services[name])
        for key in ("SPSA_NAS_DATABASE_URL", "SPSA_NAS_ARTIFACT_DIR", "SPSA_NAS_DATA_ROOT"):
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


def test_expand_follows_compose() -> None:
    assert _expand("a${X:-d}b${Y-e}c$$", {}) == "adbec$"
    assert _expand("${X:-d}/${X-e}/$X", {"X": ""}) == "d//"
    assert _expand("${X:?need X}", {"X": "v"}) == "v"
    with pytest.raises(MissingVariableError, match="X is missing a value: need X"):
        _expand("u:${X:?need X}@h", {})
    with pytest.raises(MissingVariableError):
        _expand("${X:?need X}", {"X": ""})
    assert _expand("${X?need X}", {"X": ""}) == ""


def test_secrets_have_no_default_and_are_required(compose: dict[str, Any]) -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    uses = re.findall(r"\$\{?(" + "|".join(SECRETS) + r")\b([^}]*)\}?", text)
    for name in SECRETS:
        forms = [rest for used, rest in uses if used == name]
        assert forms, f"{name} is not used"
        for rest in forms:  # ${VAR:?message}: no default, a message that says what to set
            assert rest.startswith(":?") and name in rest, f"${{{name}{rest}}} must be ${{{name}:?...}}"
    services = compose["services"]
    assert "${POSTGRES_PASSWORD:?" in _env(services["postgres"])["POSTGRES_PASSWORD"]
    for name in SPSA_SERVICES:
        assert "${POSTGRES_PASSWORD:?" in _env(services[name])["SPSA_NAS_DATABASE_URL"], name
    for name, service in services.items():  # compose refuses to start each service without them
        for key, value in _env(service).items():
            for secret in (s for s in SECRETS if s in value):
                with pytest.raises(MissingVariableError, match=secret):
                    _expand(value, {k: v for k, v in SECRET_ENV.items() if k != secret})
                assert SECRET_ENV[secret] in _expand(value, SECRET_ENV), (name, key)


def test_ray_uses_one_shared_token(compose: dict[str, Any]) -> None:
    services = compose["services"]
    envs = {name: _env(services[name]) for name in ("coordinator", "ray-head", "ray-worker")}
    for name, env in envs.items():
        assert env.get("RAY_AUTH_MODE") == "token", name
        assert env.get("RAY_AUTH_TOKEN", "").startswith("${RAY_AUTH_TOKEN:?"), name
    assert len({env["RAY_AUTH_TOKEN"] for env in envs.values()}) == 1
    assert {_expand(env["RAY_AUTH_TOKEN"], SECRET_ENV) for env in envs.values()} == {"ray-t0ken"}


def test_ray_dashboard_is_not_published(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("ray-head", "ray-worker"):
        command = services[name]["command"]
        hosts = [arg.split("=", 1)[1] for arg in command if arg.startswith("--dashboard-host=")]
        # without the flag Ray's dashboard listens on 127.0.0.1
        assert all(host not in ("0.0.0.0", "::", "[::]", "") for host in hosts), (name, hosts)
        assert not services[name].get("ports"), f"{name} publishes {services[name]['ports']}"
    dashboard_ports = {str(RAY_DASHBOARD_PORT)} | {
        arg.split("=", 1)[1] for arg in services["ray-head"]["command"] if arg.startswith("--dashboard-port=")
    }
    for name, service in services.items():
        for host, container in _published(service):
            assert container not in dashboard_ports, f"{name} publishes Ray's dashboard ({host}:{container})"


def _dockerfile_user() -> tuple[str, str]:
    """The image's final USER (user part), and the Dockerfile's text."""
    text = (ROOT / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users, "the Dockerfile sets no USER: its containers run as root"
    return users[-1].split(":")[0], text


def _uid_of(user: str, dockerfile: str) -> int:
    if user.isdigit():
        return int(user)
    created = re.search(rf"useradd\b[^\n]*--uid[ =](\d+)[^\n]*\b{re.escape(user)}\s*$", dockerfile, re.M)
    assert created, f"USER {user}: not created with a fixed --uid in the Dockerfile"
    return int(created.group(1))


def test_containers_run_as_non_root(compose: dict[str, Any]) -> None:
    user, dockerfile = _dockerfile_user()
    image_uid = _uid_of(user, dockerfile)
    for name, service in compose["services"].items():
        if name == "postgres":  # the postgres image drops to its own user in its entrypoint
            continue
        if "user" in service:
            uid = str(service["user"]).split(":")[0]
            assert uid.isdigit() and int(uid) != 0, f"{name}: user {service['user']!r}"
        else:
            assert service.get("image") == "spsa-nas:latest", f"{name}: no user and not our image"
            assert image_uid != 0, f"{name} runs as the image's USER {user} (uid 0)"


def test_volume_directories_belong_to_the_user(compose: dict[str, Any]) -> None:
    user, dockerfile = _dockerfile_user()
    uid = _uid_of(user, dockerfile)
    chowned = re.findall(r"chown\s+(?:-R\s+)?(\S+)\s+([^\n&;\\]+)", dockerfile)
    for name, service in compose["services"].items():
        if name == "postgres":
            continue
        for path in _mounts(service):
            owners = [
                owner
                for owner, targets in chowned
                if any(path == t or path.startswith(t.rstrip("/") + "/") for t in targets.split())
            ]
            assert owners, f"{name}: {path} is not chowned in the Dockerfile"
            owner = owners[-1].split(":")[0]
            assert owner in (str(uid), user), f"{name}: {path} belongs to {owner}, not {user}"


def test_api_stop_grace_period_covers_a_clean_shutdown(compose: dict[str, Any]) -> None:
    """SIGTERM: uvicorn lets open requests finish (GRACEFUL_SHUTDOWN_S); the API runs no search,
    so that is all. Docker must wait longer, and need not wait for searches."""
    grace = compose["services"]["api"].get("stop_grace_period")
    assert grace is not None, "the api has Docker's default 10 s to stop"
    assert GRACEFUL_SHUTDOWN_S < _duration_s(grace) < GRACEFUL_SHUTDOWN_S + 60, grace


def test_coordinator_stop_grace_period_covers_a_clean_shutdown(compose: dict[str, Any]) -> None:
    """SIGTERM: Dispatcher.stop (joins bounded by its timeout_s: searches stopped, leases given
    back), then ray.shutdown(). Docker must wait longer."""
    dispatcher_s = inspect.signature(Dispatcher.stop).parameters["timeout_s"].default
    bound = dispatcher_s + RAY_SHUTDOWN_MARGIN_S
    grace = compose["services"]["coordinator"].get("stop_grace_period")
    assert grace is not None, "the coordinator has Docker's default 10 s to stop"
    assert _duration_s(grace) > bound, f"stop_grace_period {grace} <= the clean shutdown's {bound} s"


def test_durations_parse() -> None:
    assert [_duration_s(v) for v in ("90s", "2m", "1m30s", "1h", "500ms", 45)] == [90, 120, 90, 3600, 0.5, 45]
    with pytest.raises(ValueError):
        _duration_s("2 minutes")
