"""Settings of the service: one pydantic-settings class, env prefix SPSA_NAS_, optional YAML file."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

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
    # Memory one trial may use when its search sets no resources.memory_gb: reserved with Ray's
    # `memory` resource and enforced in the trial (killed past it, counted as a crash). 0: no bound.
    trial_memory_gb: float = Field(4.0, ge=0, le=4096)
    # A trial that waits this long for resources no node offers fails its search with that reason.
    trial_pending_timeout_s: float = Field(900.0, gt=0, le=86_400)
    # Quotas, per search and per user.
    max_trials: int = Field(1000, ge=1)
    max_epochs: int = Field(200, ge=1)
    max_parallelism: int = Field(16, ge=1)
    # Per search, beyond trials/epochs/parallelism (each refusal names the setting that raises it).
    max_search_s: float = Field(7 * 24 * 3600.0, gt=0)  # timeout_s at most; applied when absent
    max_trial_retries: int = Field(5, ge=0)  # max_retries at most
    max_image_size: int = Field(1024, ge=8)  # train.image_size / the space's input_size / synthetic
    # (image side)² × batch size of a training or latency batch: the memory a batch takes.
    max_batch_pixels: int = Field(256 * 256 * 256, ge=64)
    max_synthetic_samples: int = Field(100_000, ge=16)  # dataset.synthetic_samples at most
    max_latency_repeats: int = Field(1000, ge=3)  # latency.repeats at most
    max_latency_warmup: int = Field(100, ge=0)  # latency.warmup at most
    # latency.min_time_s at most: a measurement holds the host-wide latency lock this long.
    max_latency_min_time_s: float = Field(10.0, ge=0)
    max_latency_threads: int = Field(16, ge=1)  # latency.threads at most
    # latency.max_time_s and .max_warmup_s at most (per model): how long the interleaved protocol may
    # hold the host-wide latency lock timing, and warming up, one candidate (docs/latency.md).
    max_latency_time_s: float = Field(60.0, gt=0)
    max_latency_warmup_s: float = Field(10.0, ge=0)
    max_loader_workers: int = Field(8, ge=0)  # train.num_workers at most
    # reseed.top_k and .seeds at most: the trials re-trained with more seeds when a search ends, and
    # the seeds of each (top_k x (seeds - 1) extra trainings of train.epochs epochs each).
    max_reseed_top_k: int = Field(5, ge=0)
    max_reseed_seeds: int = Field(5, ge=2)
    # Per user: searches queued + running + cancelling (429 beyond it); queued alone (429 beyond
    # it); running at once (applied when a dispatcher claims a search: the rest wait).
    max_active_searches_per_user: int = Field(8, ge=1)
    max_queued_searches_per_user: int = Field(6, ge=1)
    max_running_searches_per_user: int = Field(2, ge=1)
    # Re-measurements of finalists asked for on demand (POST .../remeasure) and not finished, per
    # user (one per search at most; 429 beyond it). Each holds the host's latency gate for a while.
    max_pending_remeasures_per_user: int = Field(2, ge=1)
    # Bytes of trial weights and ONNX exports of a user's searches; beyond it new searches answer 429.
    max_artifact_bytes_per_user: int = Field(20 * 2**30, ge=0)
    # Below this many free bytes on the artifact or data disk, new searches answer 507.
    min_free_disk_bytes: int = Field(2**30, ge=0)
    # Weights kept once a search finished: every trial's, the Pareto front's (and the best), or the
    # best `keep_top_k` by the search's objective.
    keep_weights: Literal["all", "pareto", "top_k"] = "pareto"
    keep_top_k: int = Field(5, ge=1)
    max_body_bytes: int = Field(1_000_000, ge=1024)  # larger request bodies answer 413
    # Attention-map figures (GET/POST .../best/attention-map) drawn at once, each in a child process
    # (more answer 429), and how long one may take (503 beyond it).
    max_concurrent_attention_maps: int = Field(2, ge=1, le=64)
    attention_map_timeout_s: float = Field(120.0, gt=0, le=3600)
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
    def _lease_outlasts_a_busy_wait(self) -> Settings:
        """A heartbeat may wait SQLite's busy timeout for the write lock: a trial lease shorter than
        a few of those would declare a live trial lost."""
        from search_spaces.storage import SQLITE_BUSY_TIMEOUT_S

        if self.trial_lease_s < 3 * SQLITE_BUSY_TIMEOUT_S:
            raise ValueError(
                f"trial_lease_s ({self.trial_lease_s:g} s) must be at least 3 x the SQLite busy timeout "
                f"({SQLITE_BUSY_TIMEOUT_S:g} s), or live trials whose heartbeat waits for the write "
                "lock are taken for lost"
            )
        return self

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
