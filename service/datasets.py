"""Dataset paths of a search, confined to the server's data root (no `..`, absolute paths or symlinks out)."""

from __future__ import annotations

import os
from pathlib import Path


class PathError(ValueError):
    """A dataset path the server refuses; the message says why (without the server's own paths)."""


def confine(path: str, data_root: Path, *, must_exist: bool) -> str:
    """`path` resolved (symlinks followed) inside `data_root`, returned relative to it.

    Absolute paths are accepted only when they resolve inside the root. Raises PathError.
    """
    if not path or "\x00" in path:
        raise PathError("must be a non-empty path relative to the server's data root")
    root = os.path.realpath(data_root)
    candidate = path if os.path.isabs(path) else os.path.join(root, path)
    real = os.path.realpath(candidate)
    if os.path.commonpath([root, real]) != root:
        raise PathError(
            f"{path!r} is outside the server's data root: give a path relative to it "
            "(no '..', no absolute path elsewhere, no symlink that leads out)"
        )
    if must_exist and not os.path.isdir(real):
        # Never list what else is there: the data root is shared, its folders may be other users'.
        raise PathError(
            f"{path!r} is not a directory under the server's data root: give the path, relative to "
            "that root, of a dataset folder the server's operator has put there (SPSA_NAS_DATA_ROOT, "
            "or the `datasets` volume of the compose setup)"
        )
    return os.path.relpath(real, root)
