"""Settings: defaults under the data directory, env over file, clear errors naming the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.core.settings import SettingsError, load_settings


def test_defaults_live_in_the_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings()
    data = tmp_path / "spsa-nas-data"
    assert settings.db_url == f"sqlite:///{data / 'spsa-nas.db'}"
    assert settings.artifact_path == data / "artifacts" and settings.data_root_path == data / "datasets"
    assert settings.concurrent_searches == 1 and settings.ray_address is None


def test_arguments_over_env_over_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file = tmp_path / "settings.yaml"
    file.write_text(f"data_dir: {tmp_path}\nmax_trials: 7\nport: 9000\nconcurrent_searches: 3\n")
    monkeypatch.setenv("SPSA_NAS_PORT", "9100")
    settings = load_settings(file, concurrent_searches=2, host=None)
    assert settings.max_trials == 7  # file
    assert settings.port == 9100  # env beats file
    assert settings.concurrent_searches == 2  # argument beats both
    assert settings.host == "127.0.0.1"  # None arguments are "not given"
    monkeypatch.setenv("SPSA_NAS_SETTINGS_FILE", str(file))
    assert load_settings().max_trials == 7


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"SPSA_NAS_PORT": "eighty"}, ["SPSA_NAS_PORT", "integer"]),
        ({"SPSA_NAS_MAX_BODY_BYTES": "10"}, ["SPSA_NAS_MAX_BODY_BYTES", "1024"]),
        ({"SPSA_NAS_DATABASE_URL": "oracle://x"}, ["SPSA_NAS_DATABASE_URL", "unsupported database"]),
        ({"SPSA_NAS_DATABASE_URL": "not a url"}, ["SPSA_NAS_DATABASE_URL", "SQLAlchemy URL"]),
    ],
)
def test_invalid_settings_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], words: list[str]
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    for word in words:
        assert word in str(info.value)


def test_unknown_key_in_the_file_is_refused(tmp_path: Path) -> None:
    file = tmp_path / "s.yaml"
    file.write_text("max_trails: 3\n")
    with pytest.raises(SettingsError, match=r"max_trails.*unknown setting"):
        load_settings(file)
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(tmp_path / "missing.yaml")


def test_a_trial_lease_shorter_than_a_few_busy_waits_is_refused(tmp_path: Path) -> None:
    from search_spaces.storage import SQLITE_BUSY_TIMEOUT_S

    with pytest.raises(SettingsError) as info:
        load_settings(data_dir=str(tmp_path), trial_lease_s=2 * SQLITE_BUSY_TIMEOUT_S)
    assert "SPSA_NAS_TRIAL_LEASE_S" in str(info.value) or "trial_lease_s" in str(info.value)
    assert load_settings(data_dir=str(tmp_path), trial_lease_s=3 * SQLITE_BUSY_TIMEOUT_S).trial_lease_s == 45
