"""What one service process holds: settings, database engine, Optuna storage, artifact store."""

from __future__ import annotations

from dataclasses import dataclass

from optuna.artifacts import FileSystemArtifactStore
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from search_spaces.storage import RetryingStorage, open_storage
from service.core.db import make_engine, make_session_factory, migrate
from service.core.settings import Settings
from service.searches.cache import StudyCache


@dataclass
class Runtime:
    """Created by `build_runtime` at start (never at import); shared by routes and the dispatcher."""

    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    storage: RetryingStorage  # search_spaces.storage.open_storage: the workers' storage settings
    artifact_store: FileSystemArtifactStore
    studies: StudyCache

    def close(self) -> None:
        self.engine.dispose()
        self.storage.close()


def build_runtime(settings: Settings) -> Runtime:
    """Create directories, migrate the service's tables, open the Optuna storage (creating its tables)."""
    settings.artifact_path.mkdir(parents=True, exist_ok=True)
    settings.data_root_path.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.db_url)
    migrate(engine)
    storage = open_storage(settings.db_url)
    return Runtime(
        settings=settings,
        engine=engine,
        sessions=make_session_factory(engine),
        storage=storage,
        artifact_store=FileSystemArtifactStore(str(settings.artifact_path)),
        studies=StudyCache(storage, settings.results_cache_s),
    )
