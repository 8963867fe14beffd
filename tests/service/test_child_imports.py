"""service.testing's children (the CLI, `spsa-nas serve`) import the checkout service.testing came
from, never a package that shadows it in their working directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.testing import cli


def test_the_cli_child_imports_this_checkout_not_its_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shadow = tmp_path / "service"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("")
    (shadow / "cli.py").write_text("def main():\n    print('the shadow checkout')\n    return 3\n")
    monkeypatch.chdir(tmp_path)  # a benchmark run from another checkout's directory
    result = cli("--help")
    assert result.returncode == 0, result.stderr
    assert "the shadow checkout" not in result.stdout and "serve" in result.stdout
    probe = cli("--help", env={"PYTHONPATH": str(tmp_path)})  # even first on the caller's PYTHONPATH
    assert probe.returncode == 0 and "the shadow checkout" not in probe.stdout
