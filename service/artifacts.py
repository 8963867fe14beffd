"""Artifact files: ids of the one shape the artifact store writes (a uuid), resolved under its root."""

from __future__ import annotations

import os
import re
from pathlib import Path

# Optuna's upload_artifact and optuna-dashboard's uploads name files str(uuid.uuid4()).
ARTIFACT_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def is_artifact_id(value: object) -> bool:
    """Whether `value` (read from the database, so untrusted) has the shape of an id we write."""
    return isinstance(value, str) and ARTIFACT_ID.fullmatch(value) is not None


def artifact_file(root: Path, artifact_id: object) -> Path | None:
    """The file of `artifact_id` directly under `root` (symlinks resolved), or None when the id is
    not one we write, or the file is missing or resolves anywhere else."""
    if not is_artifact_id(artifact_id):
        return None
    real_root = os.path.realpath(root)
    path = os.path.realpath(os.path.join(real_root, str(artifact_id)))
    if os.path.dirname(path) != real_root or not os.path.isfile(path):
        return None
    return Path(path)
