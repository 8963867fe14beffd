"""Files the service opens for a client: dataset folders under the data root, artifact files under
the artifact root; both resolved (symlinks followed) and confined before use."""

from __future__ import annotations

import os
import re
from pathlib import Path

# Optuna's upload_artifact and optuna-dashboard's uploads name files str(uuid.uuid4()).
ARTIFACT_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


class PathError(ValueError):
    """A dataset path the server refuses; the message says why (without the server's own paths)."""


def _resolve_under(root: Path | str, path: str) -> tuple[str, str] | None:
    """(real root, real path) when `path` (relative to `root`, or absolute) resolves inside the root."""
    real_root = os.path.realpath(root)
    real = os.path.realpath(path if os.path.isabs(path) else os.path.join(real_root, path))
    if os.path.commonpath([real_root, real]) != real_root:
        return None
    return real_root, real


def confine(path: str, data_root: Path, *, must_exist: bool) -> str:
    """`path` resolved (symlinks followed) inside `data_root`, returned relative to it.

    Absolute paths are accepted only when they resolve inside the root. Raises PathError.
    """
    if not path or "\x00" in path:
        raise PathError("must be a non-empty path relative to the server's data root")
    resolved = _resolve_under(data_root, path)
    if resolved is None:
        raise PathError(
            f"{path!r} is outside the server's data root: give a path relative to it "
            "(no '..', no absolute path elsewhere, no symlink that leads out)"
        )
    root, real = resolved
    if must_exist and not os.path.isdir(real):
        # Never list what else is there: the data root is shared, its folders may be other users'.
        raise PathError(
            f"{path!r} is not a directory under the server's data root: give the path, relative to "
            "that root, of a dataset folder the server's operator has put there (SPSA_NAS_DATA_ROOT, "
            "or the `datasets` volume of the compose setup)"
        )
    return os.path.relpath(real, root)


def is_artifact_id(value: object) -> bool:
    """Whether `value` (read from the database, so untrusted) has the shape of an id we write."""
    return isinstance(value, str) and ARTIFACT_ID.fullmatch(value) is not None


def artifact_file(root: Path, artifact_id: object) -> Path | None:
    """The file of `artifact_id` directly under `root` (symlinks resolved), or None when the id is
    not one we write, or the file is missing or resolves anywhere else."""
    if not is_artifact_id(artifact_id):
        return None
    resolved = _resolve_under(root, str(artifact_id))
    if resolved is None or os.path.dirname(resolved[1]) != resolved[0] or not os.path.isfile(resolved[1]):
        return None
    return Path(resolved[1])
