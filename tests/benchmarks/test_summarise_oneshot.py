"""summarise_oneshot.py: the mean tau over draws from stored pairs, and its refusals (other settings,
a file that is no bench_oneshot output)."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from bench_loader import load_benchmark
from scipy.stats import kendalltau


@pytest.fixture(scope="module")
def summ() -> ModuleType:
    return load_benchmark("summarise_oneshot")


def _run(losses: list[float], accs: list[float], per_supernet: list[float], *, seeds: int = 4,
         budget: dict[str, Any] | None = None) -> dict[str, Any]:
    """A bench_oneshot.py output with just the fields the summary reads."""
    pairs = [{"oneshot_loss": lo, "standalone": [a, a]} for lo, a in zip(losses, accs, strict=True)]
    neg = [-lo for lo in losses]
    return {"benchmark": "oneshot", "task": {"dataset": "synthetic"},
            "standalone_budget": {"standalone_steps": 70, "seeds": seeds},
            "budget": budget or {"supernet_steps": 140, "split_stage": None}, "supernets": len(per_supernet),
            "archs": len(pairs), "pairs": pairs, "kendall_tau_loss": float(kendalltau(neg, accs).statistic),
            "kendall_tau_loss_ci95": [0.0, 1.0], "kendall_tau_loss_per_supernet": per_supernet,
            "oneshot_loss_winner_in_standalone_top3": True, "spread_over_noise": 2.0, "seed_to_seed_tau": 0.6}


def _write(tmp_path: Path, name: str, run: dict[str, Any]) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(run))
    return str(path)


def test_the_mean_over_draws(summ: ModuleType, tmp_path: Path) -> None:
    # draw a ranks perfectly (tau 1), draw b backwards (tau -1): mean 0; 2 of the 4 supernets at 0.7
    accs = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    a = _write(tmp_path, "a.json", _run([6.0, 5.0, 4.0, 3.0, 2.0, 1.0], accs, [0.9, 0.7]))
    b = _write(tmp_path, "b.json", _run([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], accs, [-0.9, 0.5],
                                        budget={"supernet_steps": 140}))  # an older run: no split key
    out = summ.main([a, b, "--bootstrap", "300", "--out", str(tmp_path / "s.json")])
    assert [d["kendall_tau_loss"] for d in out["draws"]] == pytest.approx([1.0, -1.0])
    assert out["mean_kendall_tau_loss"] == pytest.approx(0.0)
    assert out["range_kendall_tau_loss"] == pytest.approx([-1.0, 1.0])
    assert out["draws_at_target"] == 1
    assert (out["single_supernets_at_target"], out["single_supernets"]) == (2, 4)
    low, high = out["mean_kendall_tau_loss_ci95"]
    assert -1.0 <= low < 0.0 < high <= 1.0  # resampling the draws reaches both signs
    assert json.loads((tmp_path / "s.json").read_text()) == out


def test_the_split_half_sets_the_ranking_beside_a_repeat(summ: ModuleType, tmp_path: Path) -> None:
    # 4 seeds: the even seeds (0, 2) rank the architectures 0 < 1 < 2 < 3; the odd seeds (1, 3)
    # swap the last two. The one-shot loss ranks as the even seeds do.
    run = _run([4.0, 3.0, 2.0, 1.0], [0.0, 0.0, 0.0, 0.0], [0.9])
    even = [0.1, 0.2, 0.3, 0.4]
    odd = [0.1, 0.2, 0.4, 0.3]
    for pair, e, o in zip(run["pairs"], even, odd, strict=True):
        pair["standalone"] = [e, o, e, o]
    a = _write(tmp_path, "a.json", run)
    b = _write(tmp_path, "b.json", _run([3.0, 2.0, 1.0, 0.0], even, [0.9]))  # 2 seeds: none
    out = summ.main([a, b, "--bootstrap", "10"])
    between = float(kendalltau(even, odd).statistic)  # 4/6
    against = (1.0 + between) / 2
    assert out["draws"][0]["split_half"] == pytest.approx(
        {"tau_between_halves": between, "loss_tau_vs_halves": against})
    assert out["draws"][1]["split_half"] is None
    assert out["draws_matching_a_repeat"] == 1  # 5/6 >= 4/6 on the one draw that has 4 seeds


def test_the_first_seeds_only(summ: ModuleType, tmp_path: Path) -> None:
    # seeds 0-1 rank the architectures as the loss does; seeds 2-3 reverse them, so that all 4
    # together tie every architecture (no tau) and the first 2 give tau 1
    run = _run([3.0, 2.0, 1.0], [0.0, 0.0, 0.0], [0.9])
    for pair, a in zip(run["pairs"], [0.1, 0.2, 0.3], strict=True):
        pair["standalone"] = [a, a, 0.4 - a, 0.4 - a]
    a = _write(tmp_path, "a.json", run)
    out = summ.main([a, "--bootstrap", "50", "--first-seeds", "2"])
    draw = out["draws"][0]
    assert draw["kendall_tau_loss"] == pytest.approx(1.0)
    assert out["mean_kendall_tau_loss"] == pytest.approx(1.0)
    assert draw["kendall_tau_loss_per_supernet"] == [] and out["single_supernets"] == 0
    assert draw["oneshot_loss_winner_in_standalone_top3"] and out["standalone_seeds_used"] == 2
    assert draw["split_half"] is None  # 2 seeds: no halves to set it beside
    with pytest.raises(SystemExit, match=r"a\.json: --first-seeds 5, but an architecture there has only 4"):
        summ.main([a, "--first-seeds", "5"])


def test_draws_of_other_settings_are_refused(summ: ModuleType, tmp_path: Path) -> None:
    accs = [0.1, 0.2, 0.3]
    a = _write(tmp_path, "a.json", _run([3.0, 2.0, 1.0], accs, [0.5]))
    b = _write(tmp_path, "b.json", _run([3.0, 2.0, 1.0], accs, [0.5], seeds=2))
    with pytest.raises(SystemExit, match=r"b\.json: its standalone_budget differs from .*a\.json's"):
        summ.main([a, b])


def test_a_file_that_is_no_output_is_refused(summ: ModuleType, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SystemExit, match=r"bad\.json: not a readable JSON file"):
        summ.main([str(bad)])
    other = _write(tmp_path, "other.json", {"benchmark": "search_quality"})
    with pytest.raises(SystemExit, match=r"other\.json: not an output of bench_oneshot\.py"):
        summ.main([other])
