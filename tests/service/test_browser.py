"""A real browser (Debian's headless chromium, driven by Playwright) on the dashboard: logging in
with the form, a user sees their study and no one else's, logging out ends the session."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import optuna
import pytest

from search_spaces.storage import open_storage
from tests.service.helpers import Server, add_user

pytestmark = [pytest.mark.browser, pytest.mark.slow]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-dev-shm-usage"]


@pytest.fixture(scope="module")
def chromium() -> Iterator[object]:
    if CHROMIUM is None:
        pytest.fail("the browser tests need chromium (apt-get install -y chromium; make test does it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield browser
        browser.close()


def _log_in(context: object, url: str, token: str, next_page: str) -> object:
    """Open the login form as a person would, paste the token, press the button."""
    page = context.new_page()  # type: ignore[attr-defined]
    page.goto(f"{url}{next_page}")  # not logged in: sent to the form, which remembers where to go
    assert "/login" in page.url
    page.fill('input[name="token"]', token)
    page.click('button[type="submit"]')
    page.wait_for_url(f"{url}{next_page}")
    return page


def test_dashboard_shows_a_users_study_only_to_them(tmp_path: Path, chromium: object) -> None:
    data_dir = tmp_path / "data"
    alice, bob = add_user(data_dir, "alice"), add_user(data_dir, "bob")
    server = Server(data_dir, env={"SPSA_NAS_CONCURRENT_SEARCHES": "0"}).start()
    try:
        search = httpx.post(
            f"{server.url}/api/v1/searches", json={"trials": 2}, headers={"Authorization": f"Bearer {alice}"}
        ).json()
        name, study_page = search["study_name"], search["links"]["dashboard"]
        storage = open_storage(f"sqlite:///{data_dir / 'spsa-nas.db'}")
        study = optuna.load_study(study_name=name, storage=storage)
        trial = study.ask()
        trial.set_user_attr("val_acc", 0.875)
        study.tell(trial, [0.875, 3.5])

        alice_context = chromium.new_context()  # type: ignore[attr-defined]
        page = _log_in(alice_context, server.url, alice, study_page)
        page.get_by_text(name).first.wait_for(timeout=30_000)  # her study, rendered by the app
        cookies = {c["name"]: c for c in alice_context.cookies()}
        assert cookies["spsa_nas_session"]["httpOnly"] and alice not in cookies["spsa_nas_session"]["value"]
        page.goto(f"{server.url}/dashboard")  # the session is kept across pages
        page.get_by_text(name).first.wait_for(timeout=30_000)

        bob_context = chromium.new_context()  # type: ignore[attr-defined]
        other = _log_in(bob_context, server.url, bob, "/dashboard")
        other.wait_for_load_state("networkidle")
        assert other.title() == "Optuna Dashboard"  # bob is in: the app itself loads
        assert "/login" not in other.url
        listing = other.evaluate("() => fetch('/api/studies').then(r => r.json())")
        assert listing["study_summaries"] == []
        other.goto(f"{server.url}{study_page}")
        other.wait_for_load_state("networkidle")
        assert name not in other.content()

        # logging out with the button ends alice's session on the server
        page.goto(f"{server.url}/logout")
        page.click('button[type="submit"]')
        page.wait_for_url(f"{server.url}/login")
        stale = httpx.get(
            f"{server.url}/api/studies",
            headers={"Cookie": f"spsa_nas_session={cookies['spsa_nas_session']['value']}"},
        )
        assert stale.status_code == 401
        page.goto(f"{server.url}{study_page}")
        assert "/login" in page.url and name not in page.content()
        assert "Traceback" not in server.log() and " 500 " not in server.log()
        alice_context.close()
        bob_context.close()
    finally:
        server.stop()
