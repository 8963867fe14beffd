"""`spsa-nas users ...` and `spsa-nas remote ...` against a real `spsa-nas serve` process."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import optuna
import pytest
from safetensors.torch import load_file, save

from search_spaces.storage import open_storage
from service.core.db import make_engine, migrate
from spsa_nas import ArchSpec, build_model
from tests.service.conftest import tiny_spec
from tests.service.helpers import Server, cli

pytestmark = pytest.mark.slow


def test_users_add_list_revoke_token(tmp_path: Path) -> None:
    data = ["--data-dir", str(tmp_path / "data")]
    added = cli("users", "add", "alice", "--admin", *data)
    assert added.returncode == 0, added.stderr
    token = added.stdout.strip()
    assert token.startswith("spsa_") and len(token) > 40 and "shown only once" in added.stderr
    db = (tmp_path / "data" / "spsa-nas.db").read_bytes()
    assert token.encode() not in db  # stored hashed only
    again = cli("users", "add", "alice", *data)
    assert again.returncode == 2 and "exists" in again.stderr and "Traceback" not in again.stderr
    bad = cli("users", "add", "../x", *data)
    assert bad.returncode == 2 and "invalid user name" in bad.stderr
    listed = cli("users", "list", *data)
    assert "alice\tadmin\tactive\t1 live tokens" in listed.stdout
    revoked = cli("users", "revoke", "alice", *data)
    assert revoked.returncode == 0 and "1 token" in revoked.stderr
    assert "alice\tadmin\trevoked\t0 live tokens" in cli("users", "list", *data).stdout
    assert cli("users", "revoke", "nobody", *data).returncode == 2
    fresh = cli("users", "token", "alice", *data).stdout.strip()
    assert fresh.startswith("spsa_") and fresh != token


def test_bad_settings_are_reported_clearly(tmp_path: Path) -> None:
    result = cli("users", "list", "--data-dir", str(tmp_path), env={"SPSA_NAS_MAX_TRIALS": "lots"})
    assert result.returncode == 2
    assert "SPSA_NAS_MAX_TRIALS" in result.stderr and "Traceback" not in result.stderr
    result = cli("users", "list", "--database-url", "mysql://x@y/z")
    assert result.returncode == 2 and "unsupported database" in result.stderr


def test_remote_commands_talk_to_a_running_server(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    token = cli("users", "add", "bob", "--data-dir", str(data_dir)).stdout.strip()
    server = Server(data_dir, env={"SPSA_NAS_CONCURRENT_SEARCHES": "0"}).start()
    remote = ["--url", server.url, "--token", token]
    try:
        body = tmp_path / "search.yaml"
        body.write_text("space: quick\ndataset: {name: digits}\ntrials: 2\ntrain: {epochs: 1}\n")
        submitted = cli("remote", "submit", str(body), *remote)
        assert submitted.returncode == 0, submitted.stderr
        search = json.loads(submitted.stdout)
        assert search["status"] == "queued"

        # a finished trial, told with plain Optuna (the dispatcher is off in this server)
        study = optuna.load_study(
            study_name=search["study_name"], storage=open_storage(f"sqlite:///{data_dir / 'spsa-nas.db'}")
        )
        trial = study.ask()
        weights_file = tmp_path / "w.safetensors"
        weights_file.write_bytes(save(build_model(ArchSpec.model_validate(tiny_spec())).state_dict()))
        store = optuna.artifacts.FileSystemArtifactStore(str(data_dir / "artifacts"))
        artifact = optuna.artifacts.upload_artifact(
            artifact_store=store, file_path=str(weights_file), study_or_trial=trial
        )
        for key, value in {
            "spec": tiny_spec(),
            "val_acc": 0.5,
            "latency_ms": 2.0,
            "weights_artifact": artifact,
        }.items():
            trial.set_user_attr(key, value)
        study.tell(trial, [0.5, 2.0])

        status = json.loads(cli("remote", "status", search["id"], *remote).stdout)
        assert status["progress"]["complete"] == 1
        best = json.loads(cli("remote", "best", search["id"], *remote).stdout)
        assert best["trial"] == 0 and best["spec"]["backbone"] == "resnet18"
        out = tmp_path / "best.safetensors"
        downloaded = cli("remote", "download", search["id"], "weights", "-o", str(out), *remote)
        assert downloaded.returncode == 0, downloaded.stderr
        model = build_model(ArchSpec.model_validate(best["spec"]), weights=load_file(str(out)))
        assert not model.load_report.mismatched
        spec_out = tmp_path / "spec.json"
        cli("remote", "download", search["id"], "spec", "-o", str(spec_out), *remote)
        assert json.loads(spec_out.read_text()) == best["spec"]

        missing = cli("remote", "status", "no-such-id", *remote)
        assert missing.returncode == 2 and "HTTP 404" in missing.stderr
        invalid = tmp_path / "bad.json"
        invalid.write_text('{"trials": 0}')
        refused = cli("remote", "submit", str(invalid), *remote)
        assert refused.returncode == 2 and "body.trials" in refused.stderr
        cancelled = json.loads(cli("remote", "cancel", search["id"], *remote).stdout)
        assert cancelled["status"] == "cancelled"
        wrong = cli("remote", "status", *remote[:2], "--token", "spsa_wrong")
        assert wrong.returncode == 2 and "HTTP 401" in wrong.stderr
        assert httpx.get(f"{server.url}/docs").status_code == 200
    finally:
        server.stop()


def test_migrations_are_idempotent_and_keep_data(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    migrate(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO users (name, is_admin, is_active, created_at) VALUES ('keep', 0, 1, '2026-01-01')"
        )
    migrate(engine)  # at head already: nothing to do, nothing lost
    with engine.begin() as conn:
        names = [r[0] for r in conn.exec_driver_sql("SELECT name FROM users")]
        version = conn.exec_driver_sql("SELECT version_num FROM spsa_nas_alembic_version").scalar()
        tables = {r[0] for r in conn.exec_driver_sql("SELECT name FROM sqlite_master WHERE type='table'")}
    assert names == ["keep"] and version == "0006"
    assert {"users", "tokens", "web_sessions", "searches", "spsa_nas_alembic_version"} <= tables
    assert "alembic_version" not in tables  # Optuna's own version table stays Optuna's
    engine.dispose()
