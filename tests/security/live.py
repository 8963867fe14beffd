"""A real `spsa-nas serve` for the security tests: two users and an admin, each with a search and a study."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import optuna
import pytest

from search_spaces.storage import open_storage
from tests.service.conftest import tiny_spec
from tests.service.helpers import Server, add_user

SESSION_COOKIE = "spsa_nas_session"
NAMES = ("alice", "bob", "root")


@dataclass
class Account:
    """A user of the live server: their token, and their first search and its study."""

    name: str
    token: str
    search: dict[str, Any] = field(default_factory=dict)
    study_id: int = -1

    @property
    def bearer(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@dataclass
class Live:
    """`spsa-nas serve` over SQLite in a temporary data dir (dispatcher off), over real HTTP."""

    server: Server
    data_dir: Path
    alice: Account
    bob: Account
    root: Account  # an admin

    @property
    def url(self) -> str:
        return self.server.url

    def storage(self) -> optuna.storages.BaseStorage:
        return open_storage(f"sqlite:///{self.data_dir / 'spsa-nas.db'}")

    def study(self, account: Account) -> optuna.Study:
        return optuna.load_study(study_name=account.search["study_name"], storage=self.storage())

    def system_attrs(self, account: Account) -> dict[str, Any]:
        """The study's system attrs (notes and dashboard files live there)."""
        return self.storage().get_study_system_attrs(account.study_id)

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, follow_redirects=False, **kwargs)

    def login(self, account: Account) -> str:
        """Log in with the form, as a browser does; returns the `Cookie` header the browser then sends."""
        with self.client() as client:
            response = client.post(
                "/login", data={"token": account.token, "next": "/dashboard"}, headers={"Origin": self.url}
            )
        assert response.status_code == 303, response.text
        return "; ".join(f"{name}={value}" for name, value in response.cookies.items())

    def browser(self, account: Account) -> httpx.Client:
        """A client holding `account`'s session cookie that sends same-origin headers, like a browser."""
        return self.client(
            headers={"Origin": self.url, "Sec-Fetch-Site": "same-origin", "Cookie": self.login(account)}
        )

    def add_account(self, name: str) -> Account:
        return Account(name, add_user(self.data_dir, name))


def complete_trial(
    live: Live, account: Account, *, weights: bytes | None = None, attrs: dict[str, Any] | None = None
) -> optuna.trial.FrozenTrial:
    """A COMPLETE trial in `account`'s study with a spec, and `weights` stored as an artifact."""
    from optuna.artifacts import FileSystemArtifactStore, upload_artifact

    study = live.study(account)
    trial = study.ask()
    values: dict[str, Any] = {"spec": tiny_spec(), "val_acc": 0.9, "latency_ms": 1.0, **(attrs or {})}
    if weights is not None:
        with tempfile.NamedTemporaryFile(suffix=".safetensors", delete=False) as f:
            f.write(weights)
        values["weights_artifact"] = upload_artifact(
            artifact_store=FileSystemArtifactStore(str(live.data_dir / "artifacts")),
            file_path=f.name,
            study_or_trial=trial,
        )
    for key, value in values.items():
        trial.set_user_attr(key, value)
    study.tell(trial, [0.9, 1.0])
    return live.study(account).trials[trial.number]


@pytest.fixture(scope="module", name="live")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """A running server with alice and bob (users) and root (admin), each with one search whose study
    has a running trial (trial 0)."""
    tmp = tmp_path_factory.mktemp("live")
    data_dir = tmp / "data"
    accounts = {name: Account(name, add_user(data_dir, name, admin=name == "root")) for name in NAMES}
    server = Server(data_dir, env={"SPSA_NAS_CONCURRENT_SEARCHES": "0"}).start()
    try:
        for account in accounts.values():
            response = httpx.post(
                f"{server.url}/api/v1/searches",
                json={"space": "quick", "dataset": {"name": "digits"}, "trials": 2},
                headers=account.bearer,
                timeout=30,
            )
            assert response.status_code == 201, response.text
            account.search = response.json()
            account.study_id = int(account.search["links"]["dashboard"].rsplit("/", 1)[1])
        result = Live(server, data_dir, accounts["alice"], accounts["bob"], accounts["root"])
        for account in accounts.values():
            result.study(account).ask()  # a running trial: the dashboard lets its owner attach files to it
        yield result
    finally:
        server.stop()
