"""A detection search through the engine's CLI (`spsa-nas search`, `best`, `export` as subprocesses) on the
built-in detection_quick space and the generated shapes data."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest

pytestmark = pytest.mark.slow


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    command = Path(sys.executable).parent / "spsa-nas"
    return subprocess.run([str(command), *args], cwd=cwd, capture_output=True, text=True, timeout=900,
                          check=False, env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"})


def test_detection_quick_search_best_and_export_through_the_cli(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path}/db.sqlite"
    artifacts = str(tmp_path / "artifacts")
    search = [
        "search", "--space", "detection_quick", "--dataset", "shapes", "--data-root", str(tmp_path / "data"),
        "--dataset.shapes-images", "16", "--dataset.shapes-size", "96", "--trials", "1", "--epochs", "1",
        "--batch-size", "4", "--lr", "0.01", "--train.max-steps-per-epoch", "2", "--latency-repeats", "3",
        "--latency-warmup", "1", "--latency.blocks", "4", "--latency.max-time-s", "1",
        "--latency.max-warmup-s", "0.5", "--device", "cpu", "--storage", storage, "--artifacts", artifacts,
    ]
    done = _cli(*search, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "1/1 finished (1 complete" in done.stderr
    # a detector's accuracy is its box AP; its test AP is the test part's (a figure, not "-")
    assert re.search(r"trial 0: val AP \d\.\d+ test AP \d\.\d+", done.stdout + done.stderr), done.stderr

    table = _cli("best", "--storage", storage, cwd=tmp_path)
    assert table.returncode == 0, table.stderr
    assert "val box AP" in table.stdout and "test box AP" in table.stdout and "val acc" not in table.stdout

    best = _cli("best", "--storage", storage, "--json", cwd=tmp_path)
    assert best.returncode == 0, best.stderr
    chosen = json.loads(best.stdout)["best"]
    assert chosen["spec"]["task"] == "detection" and chosen["spec"]["detector"]["name"] == "fasterrcnn"

    out = tmp_path / "export"
    exported = _cli("export", "--storage", storage, "--best", "--artifacts", artifacts, "--out", str(out),
                    cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    image = np.random.default_rng(0).random((1, 3, 96, 96), dtype=np.float32)
    boxes, labels, scores = session.run(None, {"images": image})
    assert boxes.shape[1:] == (4,) and len(labels) == len(scores) == len(boxes)
    assert json.loads((out / "spec.json").read_text()) == chosen["spec"]
