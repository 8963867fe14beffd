"""Server paths out of the messages the API answers: the server's directories become placeholders."""

from __future__ import annotations

import functools
import os
import re
import site
import sys
import tempfile
from pathlib import Path
from typing import Any

from service.core.settings import Settings

SERVER = "<server>"
# The package sources (Ray task errors quote remote tracebacks, with their file names).
_SOURCES = str(Path(__file__).resolve().parents[1])


def _python_dirs() -> list[str]:
    return [sys.prefix, sys.base_prefix, sys.exec_prefix, site.getusersitepackages(), *site.getsitepackages()]


def _cwd() -> str:
    try:
        return os.getcwd()
    except OSError:  # deleted under us
        return ""


def _directories(settings: Settings) -> tuple[tuple[str, str], ...]:
    """(directory, placeholder) pairs, the service's own first: a directory named twice keeps
    its first placeholder."""
    named = (
        (settings.data_root_path, "<data_root>"),
        (settings.artifact_path, "<artifact_dir>"),
        (settings.data_dir, "<data_dir>"),
    )
    server = [Path.home(), tempfile.gettempdir(), _cwd(), _SOURCES, *_python_dirs()]
    return (*((str(d), name) for d, name in named), *((str(d), SERVER) for d in server))


@functools.lru_cache(maxsize=16)
def _pattern(directories: tuple[tuple[str, str], ...]) -> tuple[re.Pattern[str], dict[str, str]]:
    """One regex of every directory, as given and resolved (symlinks followed), longest first."""
    placeholders: dict[str, str] = {}
    for directory, placeholder in directories:
        for form in (directory, os.path.abspath(directory), os.path.realpath(directory)):
            form = form.rstrip("/\\")
            if len(form) > 1:  # never the file system root
                placeholders.setdefault(form, placeholder)
    forms = sorted(placeholders, key=len, reverse=True)
    # Whole path components only: /tmp must not eat /tmpfiles, nor /srv/x/tmp.
    pattern = re.compile(r"(?<![\w.-])(?:" + "|".join(map(re.escape, forms)) + r")(?![\w-])")
    return pattern, placeholders


def redact_paths(text: str, settings: Settings) -> str:
    """`text` with the server's directories (data root, artifact and data dirs, home, Python,
    temporary and source directories) replaced by `<data_root>`, `<artifact_dir>`, `<data_dir>`
    or `<server>`; the path below them stays, so the message still says which file."""
    pattern, placeholders = _pattern(_directories(settings))
    return pattern.sub(lambda match: placeholders[match.group(0)], text)


def redact_json(value: Any, settings: Settings) -> Any:
    """`value` (decoded JSON) with redact_paths applied to every string in it."""
    if isinstance(value, str):
        return redact_paths(value, settings)
    if isinstance(value, dict):
        return {key: redact_json(item, settings) for key, item in value.items()}
    if isinstance(value, list):
        return [redact_json(item, settings) for item in value]
    return value
