"""Where datasets live: the data root and paths confined to it."""

from __future__ import annotations

from pathlib import Path

from spsa_nas.config import DataConfig
from spsa_nas.data.errors import DataError

#: Where datasets are looked for when `DataConfig.data_root` is not set (relative to the cwd).
DEFAULT_DATA_ROOT = "data"


def resolve_under(root: Path, path: str | None, name: str) -> Path:
    """`root/path` with symlinks resolved; DataError when it leaves `root` (.., absolute, links)."""
    base = root.resolve()
    target = (base / path).resolve() if path else base
    if not target.is_relative_to(base):
        raise DataError(f"{name}: path {path!r} resolves to {target}, outside the data root {base}; "
                        "datasets must live under the data root")
    return target


def data_root(cfg: DataConfig) -> Path:
    """The configured data root (default: ./data)."""
    return Path(cfg.data_root if cfg.data_root is not None else DEFAULT_DATA_ROOT).expanduser()
