"""`spsa-nas remote best ID` against a real `spsa-nas serve`: the tie decision in words, as the local
`spsa-nas best` prints it (the tied set, the rules, the one-seed accuracy noise, re-measured figures)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import optuna
import pytest

from search_spaces.keys import LATENCY_CI_ATTR
from search_spaces.storage import open_storage
from tests.service.conftest import tiny_spec
from tests.service.helpers import Server, cli
from workers.finalists import remeasure_finalists

pytestmark = pytest.mark.slow

BODY = ("space: quick\ndataset: {name: digits}\ntrials: 3\ntrain: {epochs: 1}\ndevice: cpu\n"
        "latency: {warmup: 1, repeats: 4, blocks: 4, block_ms: 2.0, max_time_s: 0.3, max_warmup_s: 0.2}\n")


def test_remote_best_shows_the_tie_as_local_best_does(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    token = cli("users", "add", "tia", "--data-dir", str(data_dir)).stdout.strip()
    server = Server(data_dir, env={"SPSA_NAS_CONCURRENT_SEARCHES": "0"}).start()  # no dispatcher
    remote = ["--url", server.url, "--token", token]
    try:
        body = tmp_path / "search.yaml"
        body.write_text(BODY)
        search = json.loads(cli("remote", "submit", str(body), *remote).stdout)
        study = optuna.load_study(study_name=search["study_name"],
                                  storage=open_storage(f"sqlite:///{data_dir / 'spsa-nas.db'}"))
        # trial 1 is 0.005 behind trial 0 and its latency interval overlaps: a tie; trial 2 is far behind
        for acc, ms, attn in [(0.90, 2.0, "se"), (0.895, 2.1, "none"), (0.70, 1.0, "eca")]:
            attrs = {"val_acc": acc, "latency_ms": ms, LATENCY_CI_ATTR: [ms - 0.2, ms + 0.2],
                     "spec": tiny_spec(channel_attn=attn)}
            study.add_trial(optuna.trial.create_trial(values=[acc, ms], user_attrs=attrs))

        shown = cli("remote", "best", search["id"], *remote)
        assert shown.returncode == 0, shown.stderr
        best = json.loads(shown.stdout)  # stdout stays the API's JSON answer
        assert best["trial"] == 0 and best["tie"]["decided"] is False
        assert [row["trial"] for row in best["tie"]["tied"]] == [0, 1]
        err = shown.stderr
        assert "best: trial 0: val acc 0.9000, 2.000 ms (first pass)" in err
        assert f"TIE: trials 1 are within the noise of trial 0 ({best['tie']['tie_rule']}); " \
               f"picked by: {best['tie']['rule']}" in err
        assert "  trial 1: val acc 0.8950, 2.100 [1.900, 2.300] ms (first pass)" in err
        assert "accuracy noise: one training seed per candidate" in err
        assert "latency noise: first-pass confidence intervals" in err

        strict = cli("remote", "best", search["id"], "--accuracy-tolerance", "0.001", *remote)
        assert strict.returncode == 0, strict.stderr
        assert json.loads(strict.stdout)["tie"]["decided"] is True
        assert "no other candidate is within the noise of trial 0" in strict.stderr
        assert "TIE" not in strict.stderr

        bad = cli("remote", "best", search["id"], "--accuracy-tolerance", "2", *remote)
        assert bad.returncode == 2 and "HTTP 422" in bad.stderr and "accuracy_tolerance" in bad.stderr
        assert "Traceback" not in bad.stderr

        # the finalists re-measured together (for real, in this process): the pick's figure is that one
        record = remeasure_finalists(study, device="cpu")
        assert record is not None and "0" in record["trials"]
        figure = record["trials"]["0"]["figure_ms"]
        deadline, err = time.monotonic() + 60, ""
        while time.monotonic() < deadline:  # the server caches a running search's trials a few seconds
            again = cli("remote", "best", search["id"], *remote)
            assert again.returncode == 0, again.stderr
            err = again.stderr
            if "ms re-measured together" in err:
                break
            time.sleep(1.0)
        assert f"best: trial 0: val acc 0.9000, {figure:.3f} ms re-measured together " \
               "(first pass 2.000 ms)" in err
        assert "latency noise: 0.95 confidence intervals; finalists re-measured together" in err
    finally:
        server.stop()
