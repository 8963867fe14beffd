"""`spsa-nas search --strategy oneshot` and `spsa-nas best` as real subprocesses on a tiny space."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

TINY_YAML = """\
name: oneshot-tiny
backbone: resnet18
stem: cifar
input_size: 8
width: 0.125
all_stages:
  spsa: [false, true]
  heads: [1, 2]
  channel_attn: [none, se, eca]
"""


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    command = Path(sys.executable).parent / "spsa-nas"
    return subprocess.run([str(command), *args], cwd=cwd, capture_output=True, text=True, timeout=900,
                          check=False, env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"})


def test_cli_oneshot_search_and_best(tmp_path: Path) -> None:
    space = tmp_path / "tiny.yaml"
    space.write_text(TINY_YAML)
    storage = f"sqlite:///{tmp_path}/db.sqlite"
    common = ["--space", str(space), "--dataset", "digits", "--train-subset", "160", "--batch-size", "16",
              "--epochs", "1", "--latency-repeats", "3", "--latency-warmup", "1", "--device", "cpu",
              "--storage", storage, "--artifacts", str(tmp_path / "artifacts")]
    wrong = _cli("search", *common, "--trials", "3", "--strategy", "supernet", cwd=tmp_path)
    assert wrong.returncode == 2 and "--strategy" in wrong.stderr and "oneshot" in wrong.stderr

    done = _cli("search", *common, "--trials", "3", "--strategy", "oneshot", "--oneshot.epochs", "1",
                "--oneshot.bn-batches", "2", "--retrain-top-k", "1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "strategy oneshot" in done.stderr
    assert done.stderr.count("(one-shot estimate)") == 3
    assert "(retrained trial " in done.stderr
    assert "4/3 finished" in done.stderr  # 3 candidates + 1 retrained

    best = _cli("best", "--storage", storage, "--json", cwd=tmp_path)
    assert best.returncode == 0, best.stderr
    chosen = json.loads(best.stdout)["best"]
    assert chosen["trial"] == 3 and chosen["estimated"] == [] and chosen["retrain_of"] in (0, 1, 2)
    assert isinstance(chosen["oneshot_val_acc"], float)
    text = _cli("best", "--storage", storage, cwd=tmp_path)
    assert f"retrained from scratch from one-shot candidate {chosen['retrain_of']}" in text.stdout
