"""Fixtures of the service tests: the app over SQLite and over PostgreSQL, users, filled studies."""

from __future__ import annotations

import functools
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import psycopg
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, delete
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from service import crud
from service.app import create_app
from service.core.db import make_engine, make_session_factory, migrate
from service.core.models import Search, Token, User, WebSession
from service.core.settings import Settings
from service.runtime import Runtime, build_runtime

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def tiny_spec(**stage: Any) -> dict[str, Any]:
    """A valid ArchSpec of the `quick` space (ResNet-18, CIFAR stem, width 0.25, 16x16, 1 channel)."""
    stages = [{"spsa": True, "spsa_heads": 2, "spsa_alpha": 1.0, "channel_attn": "se", **stage}] + [{}] * 3
    return {
        "backbone": "resnet18",
        "num_classes": 10,
        "in_channels": 1,
        "stem": "cifar",
        "input_size": 16,
        "width": 0.25,
        "stages": stages,
    }


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, dropped at the end."""
    name = f"spsa_service_{uuid.uuid4().hex[:10]}"
    admin = None
    deadline = time.monotonic() + 120
    while admin is None:
        try:
            admin = psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5)
        except psycopg.OperationalError as exc:
            # the server is shared: wait out another test run's burst of connections
            if "too many clients" not in str(exc) or time.monotonic() > deadline:
                pytest.fail(f"PostgreSQL at 127.0.0.1:5432 is required for the service tests: {exc}")
            time.sleep(2)
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def own_database(request: pytest.FixtureRequest, directory: Path, prefix: str) -> Iterator[str]:
    """The URL of an empty database of the caller alone (`request.param`: "sqlite" or "postgres"):
    a SQLite file in `directory`, or a new PostgreSQL database dropped afterwards. For tests of
    tables whose functions take any row there (claims), or that migrate down and up."""
    if request.param == "sqlite":
        yield f"sqlite:///{directory / 'service.db'}"
        return
    server = make_url(request.getfixturevalue("postgres_url"))  # fails with its message when PG is down
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin_dsn = server.set(drivername="postgresql", database="postgres").render_as_string(hide_password=False)
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def empty_tables(engine: Engine) -> sessionmaker[Session]:
    """A session factory over `engine` with the service's tables emptied."""
    factory = make_session_factory(engine)
    with factory() as session:
        for table in (WebSession, Token, Search, User):
            session.execute(delete(table))
        session.commit()
    return factory


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """The service's tables, migrated, in a database of the requesting test module only (the
    dispatcher's claims take any search in the table, so no other test's searches may be there)."""
    for url in own_database(request, tmp_path_factory.mktemp("own"), "spsa_own"):
        engine = make_engine(url)
        migrate(engine)
        yield engine
        engine.dispose()


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    """A session factory over `engine` with the service's tables emptied."""
    return empty_tables(engine)


@dataclass
class Service:
    """One app over one database, with helpers to make users and studies."""

    backend: str
    settings: Settings
    runtime: Runtime
    client: TestClient

    def user(self, name: str | None = None, *, admin: bool = False) -> dict[str, str]:
        """A new user's Authorization header."""
        with self.runtime.sessions() as session:
            _, token = crud.create_user(session, name=name or f"u{uuid.uuid4().hex[:8]}", is_admin=admin)
            session.commit()
        return {"Authorization": f"Bearer {token}"}

    def submit(self, headers: dict[str, str], **body: Any) -> dict[str, Any]:
        body = {"space": "quick", "dataset": {"name": "digits"}, "trials": 3, **body}
        response = self.client.post("/api/v1/searches", json=body, headers=headers)
        assert response.status_code == 201, response.text
        return response.json()

    def study(self, search: dict[str, Any]) -> optuna.Study:
        return optuna.load_study(study_name=search["study_name"], storage=self.runtime.storage)

    def fill(self, search: dict[str, Any], results: list[tuple[float, float] | str]) -> optuna.Study:
        """Ask/tell trials with plain Optuna: (val_acc, latency_ms) -> COMPLETE with a spec, real
        safetensors weights and their ONNX export (as a worker stores them);
        "pruned"/"fail"/"running" -> that state."""
        study = self.study(search)
        spec = tiny_spec()
        weights, onnx_model = tiny_model_files()
        for result in results:
            trial = study.ask()
            trial.suggest_categorical("width", [0.25, 0.5])
            if result == "running":
                continue
            if result == "pruned":
                trial.set_user_attr("feasible", False)
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                continue
            if result == "fail":
                trial.set_user_attr("error", "boom")
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                continue
            acc, latency = result
            artifact = optuna.artifacts.upload_artifact(
                artifact_store=self.runtime.artifact_store, file_path=_tmp_file(weights), study_or_trial=trial
            )
            onnx_artifact = optuna.artifacts.upload_artifact(
                artifact_store=self.runtime.artifact_store,
                file_path=_tmp_file(onnx_model, ".onnx"),
                study_or_trial=trial,
            )
            for key, value in {
                "spec": spec,
                "val_acc": acc,
                "latency_ms": latency,
                "top1": acc,
                "params": 1234,
                "feasible": True,
                "weights_artifact": artifact,
                "onnx_artifact": onnx_artifact,
            }.items():
                trial.set_user_attr(key, value)
            study.tell(trial, [acc, latency])
        return study


@functools.cache
def tiny_model_files() -> tuple[bytes, bytes]:
    """The safetensors weights and the ONNX export (spsa_nas.export) of one `tiny_spec` model,
    made once per test session (an export takes seconds)."""
    import tempfile

    from safetensors.torch import save

    from spsa_nas import ArchSpec, build_model
    from spsa_nas.export import export_onnx

    model = build_model(ArchSpec.model_validate(tiny_spec())).eval()
    with tempfile.TemporaryDirectory() as tmp:
        onnx_model = export_onnx(model, Path(tmp) / "model.onnx").read_bytes()
    return save(model.state_dict()), onnx_model


def _tmp_file(data: bytes, suffix: str = ".safetensors") -> str:
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=suffix, delete=False) as f:
        f.write(data)
    return f.name


def make_settings(backend: str, tmp: Path, postgres_url: Callable[[], str], **overrides: Any) -> Settings:
    url = postgres_url() if backend == "postgres" else None
    return Settings(data_dir=tmp, database_url=url, concurrent_searches=0, **overrides)


@pytest.fixture(scope="session", params=["sqlite", "postgres"])
def service(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """The app (dispatcher off) over a fresh SQLite file or a fresh PostgreSQL database."""
    backend = request.param
    tmp = tmp_path_factory.mktemp(f"service-{backend}")
    settings = make_settings(
        backend,
        tmp,
        lambda: request.getfixturevalue("postgres_url"),
        max_trials=50,
        max_epochs=5,
        max_parallelism=4,
        max_active_searches_per_user=6,
        max_body_bytes=64_000,
    )
    runtime = build_runtime(settings)
    (settings.data_root_path / "images" / "train").mkdir(parents=True)
    with TestClient(create_app(settings, runtime=runtime), raise_server_exceptions=False) as client:
        yield Service(backend, settings, runtime, client)
    runtime.close()
