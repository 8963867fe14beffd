"""A benchmark run as a script imports the project from the checkout it is in, not from the checkout
the virtual environment's editable install points at (a before/after from a worktree)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from bench_loader import BENCHMARKS


def test_a_benchmark_imports_the_checkout_it_is_in(tmp_path: Path) -> None:
    other = tmp_path / "older-checkout"  # a worktree of another commit
    (other / "benchmarks").mkdir(parents=True)
    shutil.copy(BENCHMARKS / "cli_args.py", other / "benchmarks" / "cli_args.py")
    for package in ("service", "spsa_nas", "workers", "search_spaces"):
        (other / package).mkdir()
        (other / package / "__init__.py").write_text(f"WHERE = 'the older checkout: {package}'\n")
    (other / "benchmarks" / "probe.py").write_text(
        "from cli_args import count\n"
        "import search_spaces, service, spsa_nas, workers\n"
        "print(service.WHERE, spsa_nas.WHERE, workers.WHERE, search_spaces.WHERE, sep='|')\n")
    result = subprocess.run([sys.executable, "benchmarks/probe.py"], cwd=other, capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().split("|") == [
        f"the older checkout: {p}" for p in ("service", "spsa_nas", "workers", "search_spaces")]
