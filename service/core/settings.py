"""Settings of the service: one pydantic-settings class, env prefix SPSA_NAS_, optional YAML file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from spsa_nas.errors import field_problems

ENV_PREFIX = "SPSA_NAS_"
SETTINGS_FILE_ENV = "SPSA_NAS_SETTINGS_FILE"  # path of an optional YAML settings file


class SettingsError(ValueError):
    """The service's settings are invalid; the message names each bad setting and its variable."""


class Settings(BaseSettings):
    """Everything the service process reads at start. Precedence: arguments > env > file > default."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", validate_default=True)

    # Where the defaults below live (SQLite database, artifacts, datasets).
    data_dir: Path = Path("spsa-nas-data")
    # SQLAlchemy URL of the one database (service tables and Optuna's). Default: SQLite in data_dir.
    # PostgreSQL: postgresql+psycopg://user:password@host:5432/dbname
    database_url: str | None = None
    # An existing Ray cluster ("ray://host:10001" or "host:6379"); None: Ray starts in-process.
    ray_address: str | None = None
    # Datasets (imagefolder/cifar paths of a search are relative to it). Default: data_dir/datasets.
    data_root: Path | None = None
    # Optuna FileSystemArtifactStore directory (trial weights). Default: data_dir/artifacts.
    artifact_dir: Path | None = None
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    # Searches run at once by this process's dispatcher; 0 turns the dispatcher off.
    concurrent_searches: int = Field(1, ge=0, le=64)
    dispatcher_poll_s: float = Field(1.0, gt=0, le=60)  # how often idle dispatchers look for work
    # A running search's claim expires this long after its last renewal (a dead server's searches
    # are taken over once it expires). Renewed every lease_s / 3.
    lease_s: float = Field(30.0, ge=2, le=3600)
    # A trial whose worker stopped sending heartbeats this long is failed and retried (Ray runner).
    trial_lease_s: float = Field(60.0, gt=10, le=3600)
    # CPU niceness of the trial processes of this server's searches, so that training on the
    # machine that also serves the API does not starve it (0: the API's own priority).
    trial_nice: int = Field(10, ge=0, le=19)
    # Quotas, per search and per user.
    max_trials: int = Field(1000, ge=1)
    max_epochs: int = Field(200, ge=1)
    max_parallelism: int = Field(16, ge=1)
    max_active_searches_per_user: int = Field(8, ge=1)  # queued + running + cancelling
    max_body_bytes: int = Field(1_000_000, ge=1024)  # larger request bodies answer 413
    # How long the API may answer from a running search's cached trials (0: always read them).
    results_cache_s: float = Field(1.0, ge=0, le=60)
    dashboard: bool = True  # serve optuna-dashboard at / (behind the same login)
    cookie_secure: bool = False  # set the login cookie's Secure flag (behind HTTPS)
    # How long a dashboard login lasts: the session cookie's Max-Age and its expiry on the server.
    session_ttl_s: int = Field(8 * 3600, ge=60, le=30 * 24 * 3600)
    max_sessions_per_user: int = Field(20, ge=1, le=1000)  # the oldest beyond this are logged out
    # Access log of uvicorn (off by default: it costs throughput and the dispatcher logs enough).
    access_log: bool = False

    @field_validator("database_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if "://" not in value:
            raise ValueError(
                "must be an SQLAlchemy URL such as sqlite:///path/to/file.db or "
                "postgresql+psycopg://user@host:5432/db"
            )
        scheme = value.split("://", 1)[0]
        if not (scheme.startswith("sqlite") or scheme.startswith("postgresql")):
            raise ValueError(f"unsupported database {scheme!r}: use sqlite:/// or postgresql+psycopg://")
        return value

    @model_validator(mode="after")
    def _fill_paths(self) -> Settings:
        data_dir = self.data_dir.expanduser().resolve()
        object.__setattr__(self, "data_dir", data_dir)
        if self.database_url is None:
            object.__setattr__(self, "database_url", f"sqlite:///{data_dir / 'spsa-nas.db'}")
        for name, default in (("data_root", data_dir / "datasets"), ("artifact_dir", data_dir / "artifacts")):
            value = getattr(self, name)
            object.__setattr__(self, name, (value.expanduser() if value else default).resolve())
        return self

    @property
    def db_url(self) -> str:
        """The database URL, never None after validation."""
        return str(self.database_url)  # filled by _fill_paths

    @property
    def artifact_path(self) -> Path:
        """Where trial weights (and cached ONNX exports) live."""
        return self.artifact_dir or self.data_dir / "artifacts"

    @property
    def data_root_path(self) -> Path:
        """The only directory datasets of searches may come from."""
        return self.data_root or self.data_dir / "datasets"

    @property
    def is_sqlite(self) -> bool:
        return self.db_url.startswith("sqlite")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if settings_cls.model_config.get("yaml_file"):
            sources.append(YamlConfigSettingsSource(settings_cls))
        return tuple(sources)


def load_settings(settings_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Settings from arguments, SPSA_NAS_* variables and an optional YAML file, or SettingsError.

    `overrides` that are None are ignored (unset command-line flags).
    """
    import os

    given = {key: value for key, value in overrides.items() if value is not None}
    path = settings_file or os.environ.get(SETTINGS_FILE_ENV)
    cls: type[Settings] = Settings
    if path:
        path = Path(path)
        if not path.is_file():
            raise SettingsError(f"settings file {path} does not exist ({SETTINGS_FILE_ENV} or --settings)")
        cls = type("Settings", (Settings,), {"model_config": {**Settings.model_config, "yaml_file": path}})
    try:
        return cls(**given)
    except ValidationError as exc:
        raise SettingsError(format_settings_error(exc, path)) from None


def format_settings_error(exc: ValidationError, path: str | Path | None = None) -> str:
    """One line per bad setting, naming its environment variable (and the file, if any)."""
    lines = ["invalid settings:"]
    for problem in field_problems(exc):
        field = problem.dotted or "(settings)"
        where = f"{ENV_PREFIX}{field.upper()}" + (f" / {field} in {path}" if path else "")
        message = problem.msg
        if problem.type == "extra_forbidden":
            message = f"unknown setting; valid: {', '.join(sorted(Settings.model_fields))}"
        lines.append(f"  {where}: {message} (got {problem.input!r})")
    return "\n".join(lines)
