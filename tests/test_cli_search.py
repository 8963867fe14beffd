"""`spsa-nas search/best/export/spaces` as real subprocesses, on a tiny space and the digits data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

TINY_YAML = """\
name: cli-tiny
description: a tiny space for the CLI test
backbone: resnet18
stem: cifar
input_size: 8
width: 0.25
all_stages:
  spsa: [false, true]
  heads: [1, 2]
  channel_attn: [none, eca]
"""


def _cli(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    command = Path(sys.executable).parent / "spsa-nas"  # the installed console script
    return subprocess.run([str(command), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"})


@pytest.mark.slow
def test_search_best_export_and_onnx(tmp_path: Path) -> None:
    import onnxruntime

    space = tmp_path / "tiny.yaml"
    space.write_text(TINY_YAML)
    storage = f"sqlite:///{tmp_path}/runs/db.sqlite"
    artifacts = str(tmp_path / "artifacts")
    search = ["search", "--space", str(space), "--dataset", "digits", "--trials", "3", "--epochs", "1",
              "--train-subset", "160", "--batch-size", "16", "--latency-repeats", "3",
              "--latency-warmup", "1", "--device", "cpu", "--storage", storage, "--artifacts", artifacts]
    done = _cli(*search, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Pareto front of cli-tiny-digits" in done.stdout
    assert "3/3 finished" in done.stderr
    assert "layer4) is 1x1" in done.stderr  # the space's note is shown

    again = _cli(*search, cwd=tmp_path)  # the same command: the study is complete, nothing re-runs
    assert again.returncode == 0, again.stderr
    assert "3/3 trials finished" in again.stderr and "trial 3" not in again.stderr

    best = _cli("best", "--storage", storage, "--json", cwd=tmp_path)
    assert best.returncode == 0, best.stderr
    report = json.loads(best.stdout)
    chosen = report["best"]
    counts = report["counts"]
    assert report["study"] == "cli-tiny-digits" and counts["complete"] + counts["pruned"] == 3
    assert counts["complete"] >= 1 and counts["fail"] == 0  # a best exists; nothing crashed
    front_accs = [row["val_acc"] for row in report["pareto_front"]]
    assert chosen["val_acc"] == max(front_accs)

    out = tmp_path / "export"
    exported = _cli("export", "--storage", storage, "--best", "--artifacts", artifacts, "--out", str(out),
                    cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    for name in ("spec.json", "weights.safetensors", "model.onnx", "metrics.json"):
        assert (out / name).is_file(), name
    spec = json.loads((out / "spec.json").read_text())
    assert spec == chosen["spec"]
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    logits = session.run(None, {name: np.random.default_rng(0).normal(size=(1, 1, 8, 8)).astype(np.float32)})
    assert logits[0].shape == (1, 10) and np.isfinite(logits[0]).all()


@pytest.mark.slow
def test_search_whose_trials_keep_failing_exits_1_with_the_error(tmp_path: Path) -> None:
    """A dataset that passes the up-front check (its class folders exist) but holds no image: every
    trial fails when it loads the data, and the run ends `failing` after three in a row."""
    space = tmp_path / "tiny.yaml"
    space.write_text(TINY_YAML)
    for cls in ("a", "b"):
        (tmp_path / "data" / "empty" / cls).mkdir(parents=True)
    done = _cli("search", "--space", str(space), "--dataset", "imagefolder", "--data-root",
                str(tmp_path / "data"), "--data-path", "empty", "--trials", "2", "--latency-repeats", "3",
                "--latency-warmup", "1", "--device", "cpu", "--storage", f"sqlite:///{tmp_path}/db.sqlite",
                "--artifacts", str(tmp_path / "artifacts"), cwd=tmp_path)
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "0/2 finished (0 complete, 0 pruned, 3 failed); outcome: failing" in done.stderr
    assert "trials keep failing: DataError: imagefolder: Found no valid file" in done.stderr


@pytest.mark.slow
@pytest.mark.ray
def test_search_on_ray_reports_its_outcome(tmp_path: Path) -> None:
    """--parallelism 2 runs the trials on a Ray of its own; the report is the same as the local one."""
    space = tmp_path / "tiny.yaml"
    space.write_text(TINY_YAML)
    done = _cli("search", "--space", str(space), "--dataset", "digits", "--trials", "2", "--parallelism", "2",
                "--train.epochs", "1", "--train-subset", "160", "--batch-size", "16",
                "--latency-repeats", "3", "--latency-warmup", "1", "--device", "cpu",
                "--resources.num-cpus", "0.5",
                "--storage", f"sqlite:///{tmp_path}/db.sqlite", "--artifacts", str(tmp_path / "artifacts"),
                cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "2/2 finished (2 complete, 0 pruned, 0 failed); outcome: done" in done.stderr
    assert "Pareto front of cli-tiny-digits" in done.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["search", "--space", "no_such_space", "--dataset", "digits"], "unknown search space"),
        (["search", "--space", "quick", "--dataset", "digits", "--trials", "0"], "--trials"),
        (["search", "--space", "quick", "--dataset", "mnist"], "invalid choice: 'mnist'"),
        (["search", "--space", "quick", "--dataset", "digits", "--pruner", "median"], "needs objective"),
        (["search", "--space", "quick", "--dataset", "digits", "--objective", "score"],
         "latency_target_ms is required"),
        (["search", "--space", "quick", "--dataset", "imagefolder", "--data-root", "/nonexistent"],
         "imagefolder"),
        (["best", "--storage", "sqlite:///missing/nothing.db"], "no database at"),
        (["export", "--storage", "sqlite:///missing/nothing.db", "--out", "x"], "pass --trial N or --best"),
        (["spaces", "nope.yaml"], "no such search-space file"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(args: list[str], expected: str, tmp_path: Path) -> None:
    done = _cli(*args, cwd=tmp_path, timeout=300)
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert expected in lines[0]


def test_bad_space_yaml_is_a_usage_error_with_line(tmp_path: Path) -> None:
    space = tmp_path / "bad.yaml"
    space.write_text(TINY_YAML.replace("heads: [1, 2]", "heads: [1, 3]"))
    done = _cli("search", "--space", str(space), "--dataset", "digits", cwd=tmp_path, timeout=300)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    assert f"{space}:9: all_stages.heads.1" in done.stderr and "valid heads: 1, 2, 4, 8" in done.stderr


def test_spaces_lists_the_builtins(tmp_path: Path) -> None:
    done = _cli("spaces", cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    for name in ("quick", "resnet50_imagenet", "resnet18_cifar", "mobilenet_v2", "shufflenet_v2",
                 "detection_quick", "spatial_ablation"):
        assert name in done.stdout


def test_spaces_shows_the_spatial_choices_and_spsa_switches(tmp_path: Path) -> None:
    done = _cli("spaces", "spatial_ablation", cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    header = next(line for line in done.stdout.splitlines() if line.startswith("┃"))
    assert all(col in header for col in ("spatial", "reverse", "similarity"))
    assert "none, spsa, nonlocal, gc" in done.stdout and "correlation, cosine" in done.stdout
    quick = _cli("spaces", "quick", cwd=tmp_path, timeout=300)  # no switches offered: no columns
    assert quick.returncode == 0 and "reverse" not in quick.stdout and "spsa" in quick.stdout


def test_best_on_a_storage_with_no_such_study(tmp_path: Path) -> None:
    import optuna

    url = f"sqlite:///{tmp_path}/db.sqlite"
    optuna.create_study(storage=url, study_name="other")
    done = _cli("best", "--storage", url, "--study", "mine", cwd=tmp_path, timeout=300)
    assert done.returncode == 2 and "no study 'mine'" in done.stderr and "other" in done.stderr
