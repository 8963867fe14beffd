"""A real browser (headless Debian chromium) on the dashboard: a user sees their study, no one else's."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import httpx
import optuna
import pytest

from search_spaces.study import storage_for
from tests.service.helpers import Server, add_user

pytestmark = [pytest.mark.browser, pytest.mark.slow]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def dump_dom(url: str, profile: Path) -> str:
    """The page's DOM after its scripts ran (the dashboard is a single-page app)."""
    if CHROMIUM is None:
        pytest.fail("chromium is required for the browser test (apt-get install -y chromium)")
    result = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-dev-shm-usage",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=10000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_dashboard_shows_a_users_study_only_to_them(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    alice, bob = add_user(data_dir, "alice"), add_user(data_dir, "bob")
    server = Server(data_dir, env={"SPSA_NAS_CONCURRENT_SEARCHES": "0"}).start()
    try:
        search = httpx.post(
            f"{server.url}/api/v1/searches", json={"trials": 2}, headers={"Authorization": f"Bearer {alice}"}
        ).json()
        name, page = search["study_name"], search["links"]["dashboard"]
        study = optuna.load_study(
            study_name=name, storage=storage_for(f"sqlite:///{data_dir / 'spsa-nas.db'}")
        )
        trial = study.ask()
        trial.set_user_attr("val_acc", 0.875)
        study.tell(trial, [0.875, 3.5])

        seen = dump_dom(f"{server.url}/login?token={alice}&next={page}", tmp_path / "alice")
        assert name in seen
        listing = dump_dom(f"{server.url}/dashboard", tmp_path / "alice")  # the cookie is kept
        assert name in listing

        for url in (f"{server.url}/login?token={bob}&next={page}", f"{server.url}/dashboard"):
            other = dump_dom(url, tmp_path / "bob")
            assert name not in other
            assert "Optuna Dashboard" in other  # bob is logged in: the dashboard itself loads

        anonymous = dump_dom(f"{server.url}{page}", tmp_path / "anonymous")
        assert name not in anonymous and 'name="token"' in anonymous  # sent to the login form
        assert "Traceback" not in server.log() and " 500 " not in server.log()
    finally:
        server.stop()
