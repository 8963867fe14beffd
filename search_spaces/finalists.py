"""Finalists and ties: which trials are re-measured together, which latency figure of a trial counts,
and the candidates `best` cannot tell apart from its choice (docs/latency.md)."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

from optuna.trial import FrozenTrial, TrialState

from search_spaces.keys import (
    ANCHOR_PREFIX,
    CONFIG_ATTR,
    FINALISTS_ATTR,
    LATENCY_CI_ATTR,
    ONESHOT_SCORE_ATTR,
    SEEDS_ATTR,
)
from search_spaces.study import (
    choosable,
    mnas_score,
    pareto_front,
    ranked_accuracy,
    select_best,
    study_config,
)

ACCURACY_TOLERANCE = 0.01  # validation-accuracy differences within this are noise (one seed each)
MAX_FINALISTS = 16  # re-measured together at most (the Pareto front first)
NOTE_MARK = "<!-- spsa-nas:finalists -->"  # first line of the study note this module writes


class StudyLike(Protocol):
    """What this module reads of a study (optuna.Study, or the service's StudyView)."""

    study_name: str
    user_attrs: dict[str, Any]

    def get_trials(self, deepcopy: bool = ..., states: Any = ...) -> list[FrozenTrial]: ...


def _complete(study: StudyLike) -> list[FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.user_attrs.get("val_acc") is not None and t.user_attrs.get("latency_ms") is not None]


def finalist_trials(study: StudyLike, *, accuracy_tolerance: float = ACCURACY_TOLERANCE,
                    max_count: int = MAX_FINALISTS) -> list[FrozenTrial]:
    """The trials to re-measure together: the Pareto front (by latency), then the complete trials
    whose accuracy is within `accuracy_tolerance` of the best (the ones `best` could tie with), by
    accuracy; only trials with a spec; at most `max_count`. Accuracy: ranked_accuracy's (a
    one-shot candidate's oneshot_score where it has one, as the front and `best` rank it). A oneshot
    study with retrained trials: among those only, as `best` and its ties (decide_best) choose."""
    if max_count < 1:
        raise ValueError(f"max_count must be at least 1, got {max_count}")
    complete = [t for t in _complete(study) if isinstance(t.user_attrs.get("spec"), dict)]
    if not complete:
        return []
    complete = choosable(complete)  # a oneshot study's supernet estimates are never picked
    front = pareto_front(study, complete)  # type: ignore[arg-type]
    accuracy = {t.number: ranked_accuracy(t) for t in complete}
    best_acc = max(accuracy.values())
    near = sorted((t for t in complete if accuracy[t.number] >= best_acc - accuracy_tolerance),
                  key=lambda t: (-accuracy[t.number], t.user_attrs["latency_ms"], t.number))
    chosen: dict[int, FrozenTrial] = {}
    for trial in [*front, *near]:
        chosen.setdefault(trial.number, trial)
    return list(chosen.values())[:max_count]


def anchor_attr(latency: dict[str, Any]) -> str | None:
    """The study attr of the anchor of a latency record's conditions (reference, hardware, threads,
    timed input), or None for a record without a reference ratio."""
    if latency.get("ratio") is None or latency.get("reference") is None:
        return None
    names = ("reference", "device_name", "threads", "input_shape", "torch_version")
    conditions = [latency.get(name) for name in names]
    digest = hashlib.sha256(json.dumps(conditions, sort_keys=True).encode()).hexdigest()[:16]
    return ANCHOR_PREFIX + digest


def anchor_ms(study: Any, latency: dict[str, Any]) -> float | None:
    """The study's anchor for `latency`'s conditions: the reference's time in the first measurement of
    the study under them (stored as a study attr by the first caller). A search's `latency_ms` is
    the candidate's ratio to the reference times this anchor: the candidate's time at the speed the
    machine had then, the same figure whatever the load of the moment (docs/latency.md). None
    without a ratio. Measurements of a host are serialised by its latency gate, so the first writer
    is the first measurement; the value stored is re-read, so concurrent writers agree."""
    key = anchor_attr(latency)
    if key is None or latency.get("reference_ms") is None:
        return None
    stored = study.user_attrs.get(key)
    if not isinstance(stored, dict) or stored.get("ms") is None:
        first = {name: latency.get(name) for name in ("reference", "device_name", "threads", "measured_at")}
        study.set_user_attr(key, {"ms": float(latency["reference_ms"]), **first})
        stored = study.user_attrs.get(key) or {"ms": float(latency["reference_ms"])}
    return float(stored["ms"])


def normalized(latency: dict[str, Any], anchor: float | None) -> tuple[float, list[float] | None]:
    """(figure ms, [low, high] or None): ratio x anchor with the ratio's interval when there is an
    anchor, else the record's own time and interval."""
    if anchor is not None and latency.get("ratio") is not None:
        low, high = latency.get("ratio_ci_low"), latency.get("ratio_ci_high")
        interval = [low * anchor, high * anchor] if low is not None and high is not None else None
        return float(latency["ratio"]) * anchor, interval
    low, high = latency.get("ci_low_ms"), latency.get("ci_high_ms")
    return float(latency["median_ms"]), ([low, high] if low is not None and high is not None else None)


def remeasured_fields(record: dict[str, Any] | None, number: int) -> dict[str, Any]:
    """Trial `number`'s figures of the finalists' re-measurement `record` (FINALISTS_ATTR), as the
    metrics the API and the CLI show beside the first pass; {} when it was not a finalist.
    `latency_remeasured_ms` is on the same scale as `latency_ms` (ratio x anchor when it has a
    ratio); `latency_remeasured_time_ms` is the time measured."""
    measured = (record or {}).get("trials", {}).get(str(number))
    if not isinstance(measured, dict) or measured.get("median_ms") is None:
        return {}
    interval = measured.get("figure_ci_ms")
    if interval is None and measured.get("ci_low_ms") is not None:
        interval = [measured["ci_low_ms"], measured.get("ci_high_ms")]
    return {
        "latency_remeasured_ms": measured.get("figure_ms", measured["median_ms"]),
        "latency_remeasured_ci_ms": interval,
        "latency_remeasured_time_ms": measured["median_ms"],
        "latency_remeasured_ratio": measured.get("ratio"),
        "latency_remeasured_ratio_ci": [measured.get("ratio_ci_low"), measured.get("ratio_ci_high")],
        "latency_remeasured_at": (record or {}).get("at"),
    }


def remeasurement(study: StudyLike) -> dict[str, Any] | None:
    """The last re-measurement of the finalists (study attr FINALISTS_ATTR), or None."""
    record = study.user_attrs.get(FINALISTS_ATTR)
    return record if isinstance(record, dict) else None


@dataclass(frozen=True)
class LatencyFigure:
    """The latency of a trial that counts, its interval (None: not recorded) and where it is from."""

    ms: float
    low: float | None
    high: float | None
    source: Literal["remeasured", "first_pass"]

    def bounds(self) -> tuple[float, float]:
        """(low, high); a figure without an interval is a point."""
        low = self.low if self.low is not None else self.ms
        return (low, self.high if self.high is not None else self.ms)

    def overlaps(self, other: LatencyFigure) -> bool:
        """Whether the two intervals share a point."""
        (a_low, a_high), (b_low, b_high) = self.bounds(), other.bounds()
        return a_low <= b_high and b_low <= a_high

    def to_dict(self) -> dict[str, Any]:
        interval = [self.low, self.high] if self.low is not None and self.high is not None else None
        return {"latency_ms": self.ms, "latency_ci_ms": interval, "latency_source": self.source}


def latency_figure(trial: FrozenTrial, record: dict[str, Any] | None = None) -> LatencyFigure | None:
    """The trial's latency: its figure of the last re-measurement of the finalists (`record`) when
    it was one of them, else its first-pass figure (`latency_ms`, `latency_ci_ms`); None without."""
    fields = remeasured_fields(record, trial.number)
    if fields.get("latency_remeasured_ms") is not None:
        interval = fields["latency_remeasured_ci_ms"] or [None, None]
        return LatencyFigure(float(fields["latency_remeasured_ms"]), interval[0], interval[1], "remeasured")
    ms = trial.user_attrs.get("latency_ms")
    if ms is None:
        return None
    interval = trial.user_attrs.get(LATENCY_CI_ATTR)
    if isinstance(interval, list) and len(interval) == 2 and None not in interval:
        return LatencyFigure(float(ms), float(interval[0]), float(interval[1]), "first_pass")
    return LatencyFigure(float(ms), None, None, "first_pass")


def seed_record(study: StudyLike) -> dict[str, Any] | None:
    """The last re-training of the top-k with more seeds (study attr SEEDS_ATTR), or None."""
    record = study.user_attrs.get(SEEDS_ATTR)
    return record if isinstance(record, dict) and isinstance(record.get("trials"), dict) else None


def seeds_entry(seed_accs: dict[int, float]) -> dict[str, Any]:
    """One trial's figures of SEEDS_ATTR: its validation accuracy by training seed, their mean and
    (sample) standard deviation; the accuracy interval is mean ± std."""
    values = list(seed_accs.values())
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"val_acc_by_seed": {str(k): v for k, v in seed_accs.items()}, "val_acc_mean": mean,
            "val_acc_std": std, "seeds": len(values)}


def seeds_record(by_trial: dict[int, dict[int, float]], *, seeds: int, top_k: int, planned: list[int],
                 stopped: str | None = None, error: str | None = None) -> dict[str, Any]:
    """The study attr SEEDS_ATTR of one re-training of the top-k: when, how many seeds and trials were
    asked (`planned`: the trials chosen, best first), per trial re-trained with 2+ seeds so far its
    seeds_entry (`by_trial`: trial number -> {training seed: validation accuracy}, its own run
    included), and `stopped` ("cancelled", "timeout") or `error` when it did not finish."""
    trials = {str(n): seeds_entry(accs) for n, accs in by_trial.items() if len(accs) >= 2}
    return {"at": datetime.now(UTC).isoformat(timespec="seconds"), "seeds": seeds, "top_k": top_k,
            "planned": list(planned), "trials": trials, "stopped": stopped,
            "error": error[:2000] if error else None}


def accuracy_interval(trial: FrozenTrial, record: dict[str, Any] | None) -> tuple[float, float] | None:
    """(mean - std, mean + std) of the trial's validation accuracy over seeds, when it was re-trained
    with 2+ seeds (`record`: seed_record); None otherwise (one seed: the tolerance stands in)."""
    entry = ((record or {}).get("trials") or {}).get(str(trial.number))
    if not isinstance(entry, dict) or int(entry.get("seeds") or 0) < 2:
        return None
    mean, std = float(entry["val_acc_mean"]), float(entry["val_acc_std"])
    return (mean - std, mean + std)


@dataclass(frozen=True)
class BestDecision:
    """What `best` picked, and whether it could tell: the tied set (the pick first) and the rules."""

    chosen: FrozenTrial
    tied: list[FrozenTrial]
    figures: dict[int, LatencyFigure | None]
    rule: str  # how one trial is picked (from the tied set)
    tie_rule: str  # when two trials are tied
    accuracy_noise: str
    latency_noise: str
    seeds: dict[int, dict[str, Any]] | None = None  # the candidates re-trained with 2+ seeds

    @property
    def decided(self) -> bool:
        """True when no other candidate is within the noise of the pick."""
        return len(self.tied) == 1

    def to_dict(self) -> dict[str, Any]:
        def row(t: FrozenTrial) -> dict[str, Any]:
            figure = self.figures.get(t.number)
            seeds = (self.seeds or {}).get(t.number)  # only a candidate re-trained with 2+ seeds
            extra = {k: seeds[k] for k in ("val_acc_mean", "val_acc_std", "seeds")} if seeds else {}
            return {"trial": t.number, "val_acc": t.user_attrs.get("val_acc"),
                    **(figure.to_dict() if figure is not None else {"latency_ms": None}), **extra}

        return {"decided": self.decided, "chosen": self.chosen.number, "tied": [row(t) for t in self.tied],
                "rule": self.rule, "tie_rule": self.tie_rule, "accuracy_noise": self.accuracy_noise,
                "latency_noise": self.latency_noise}


def _score_bounds(accuracy: tuple[float, float], figure: LatencyFigure, objective: Any
                  ) -> tuple[float, float]:
    """The score's range over an accuracy range (low, high) and the latency's interval."""
    low_ms, high_ms = figure.bounds()
    worst = mnas_score(max(0.0, accuracy[0]), high_ms, objective)
    best = mnas_score(min(1.0, accuracy[1]), low_ms, objective)
    return (min(worst, best), max(worst, best))


def decide_best(study: StudyLike, *, latency_budget_ms: float | None = None, trial_number: int | None = None,
                accuracy_tolerance: float = ACCURACY_TOLERANCE) -> BestDecision:
    """select_best's pick and the candidates within the noise of it (LookupError as select_best).

    Candidates: the complete trials select_best considers (within the latency budget). Latency:
    each trial's latency_figure (re-measured together when it was a finalist, else first pass).
    Pareto studies: a candidate is tied with the pick when their validation accuracies differ by
    at most `accuracy_tolerance` and the candidate is not clearly slower (its interval does not
    lie wholly above the pick's): the pick's lead is then within the noise of accuracy and of
    latency. Score studies: when their scores' ranges overlap, each range spanning its accuracy
    range and its latency interval. Accuracy noise, both kinds: when the candidate and the pick
    were both re-trained with 2+ seeds (SEEDS_ATTR), each one's accuracy range is its mean ± std
    over seeds (pareto: tied when the two overlap); otherwise the tolerance stands in (the
    accuracy ± `accuracy_tolerance`). A figure without an interval (first protocol) is a point.
    """
    if not math.isfinite(accuracy_tolerance) or not 0 <= accuracy_tolerance < 1:
        raise ValueError(f"accuracy_tolerance must be in [0, 1), got {accuracy_tolerance}")
    chosen = select_best(study, latency_budget_ms=latency_budget_ms, trial_number=trial_number)  # type: ignore[arg-type]
    objective = study_config(study).objective if CONFIG_ATTR in study.user_attrs else None  # type: ignore[arg-type]
    kind = objective.kind if objective is not None else "pareto"
    budget = latency_budget_ms if latency_budget_ms is not None else (
        objective.latency_budget_ms if objective is not None else None)
    record = remeasurement(study)
    candidates = [t for t in _complete(study) if budget is None or t.user_attrs["latency_ms"] <= budget]
    candidates = choosable(candidates)  # oneshot: select_best chooses among the retrained; so do ties
    if chosen.number not in {t.number for t in candidates}:
        candidates.append(chosen)
    figures = {t.number: latency_figure(t, record) for t in candidates}
    # the accuracy select_best ranks by: a one-shot candidate's oneshot_score where it has one
    pick, pick_acc = figures[chosen.number], ranked_accuracy(chosen)
    seeds = seed_record(study)
    intervals = {t.number: accuracy_interval(t, seeds) for t in candidates}

    def accuracy_ranges(t: FrozenTrial, acc: float) -> tuple[tuple[float, float], tuple[float, float]] | None:
        """The candidate's and the pick's accuracy ranges when both were re-trained with 2+ seeds
        (mean ± std each), else None (the tolerance stands in)."""
        a, b = intervals[t.number], intervals[chosen.number]
        return (a, b) if a is not None and b is not None else None

    def tied(t: FrozenTrial) -> bool:
        figure, acc = figures[t.number], ranked_accuracy(t)
        if figure is None or pick is None:
            return False
        seeded_ranges = accuracy_ranges(t, acc)
        if kind == "score":
            mine, theirs = seeded_ranges or ((acc - accuracy_tolerance, acc + accuracy_tolerance),
                                             (pick_acc - accuracy_tolerance, pick_acc + accuracy_tolerance))
            a, b = _score_bounds(mine, figure, objective), _score_bounds(theirs, pick, objective)
            return a[0] <= b[1] and b[0] <= a[1]
        clearly_slower = figure.bounds()[0] > pick.bounds()[1]
        if seeded_ranges is not None:  # both re-trained with 2+ seeds: their intervals overlap
            (a_low, a_high), (b_low, b_high) = seeded_ranges
            return a_low <= b_high and b_low <= a_high and not clearly_slower
        return abs(acc - pick_acc) <= accuracy_tolerance and not clearly_slower

    def order(t: FrozenTrial) -> tuple[float, float, int]:
        primary = t.values[0] if kind == "score" and t.values else ranked_accuracy(t)
        figure = figures[t.number]
        return (-primary, figure.ms if figure is not None else math.inf, t.number)

    others = sorted((t for t in candidates if t.number != chosen.number and tied(t)), key=order)
    scored = chosen.user_attrs.get(ONESHOT_SCORE_ATTR) is not None  # a one-shot candidate ranked by loss
    measure = "one-shot score (exp(-validation loss))" if scored else "validation accuracy"
    first = "the highest score" if kind == "score" else f"the highest {measure}"
    rule = (f"trial {trial_number} as asked" if trial_number is not None else
            f"{first}, then the lower first-pass latency, then the lower trial number (select_best)")
    if kind == "score":
        tie_rule = (f"score ranges overlap (accuracy ± {accuracy_tolerance:g}, or its mean ± std over "
                    "seeds where both were re-trained; latency over its confidence interval)")
    else:
        tie_rule = (f"{measure} within ± {accuracy_tolerance:g} of the pick and latency not "
                    "clearly slower (confidence intervals overlap, or faster)")
    accuracy_noise = (f"one training seed per candidate: accuracy noise is not measured here; differences "
                      f"within ± {accuracy_tolerance:g} are taken as noise (accuracy_tolerance)")
    seeded = {n: (seeds or {})["trials"][str(n)] for n, i in intervals.items() if i is not None}
    if seeded:
        numbers = ", ".join(str(n) for n in sorted(seeded))
        accuracy_noise = (f"trials {numbers} re-trained with {min(e['seeds'] for e in seeded.values())}+ "
                          f"training seeds (at {(seeds or {}).get('at')}): between two of them, "
                          + ("the score ranges span their accuracy's mean ± std" if kind == "score" else
                             "validation accuracy is tied when their mean ± std intervals overlap")
                          + "; otherwise one seed, "
                          f"differences within ± {accuracy_tolerance:g} taken as noise (accuracy_tolerance)")
    if record is not None and record.get("trials"):
        latency_noise = (f"{record.get('ci_level') or 0.95:g} confidence intervals; finalists re-measured "
                         f"together at {record.get('at')} on {record.get('device')}, other trials first pass")
    else:
        latency_noise = "first-pass confidence intervals (the finalists were not re-measured together)"
    if pick is not None and pick.low is None:
        latency_noise += "; the pick has no interval (measured with the first protocol): a point"
    return BestDecision(chosen=chosen, tied=[chosen, *others], figures=figures, rule=rule, tie_rule=tie_rule,
                        accuracy_noise=accuracy_noise, latency_noise=latency_noise,
                        seeds=seeded or None)


def remeasurement_record(results: dict[int, dict[str, Any]], *, device: str, reference: dict[str, Any] | None,
                         error: str | None = None) -> dict[str, Any]:
    """The study attr FINALISTS_ATTR of one re-measurement: when, where, the reference's figure and
    every finalist's LatencyResult dict by trial number (or the error that stopped it)."""
    level = next((r.get("ci_level") for r in results.values() if r.get("ci_level") is not None), None)
    return {"at": datetime.now(UTC).isoformat(timespec="seconds"), "device": device, "ci_level": level,
            "reference": reference, "trials": {str(n): r for n, r in sorted(results.items())},
            "error": error}


def finalists_note(record: dict[str, Any], trials: list[FrozenTrial]) -> str:
    """A Markdown note for optuna-dashboard's study page: the finalists' re-measured latencies with
    their intervals beside the first-pass figures."""
    lines = [NOTE_MARK, f"## Finalists re-measured together ({record.get('at')}, {record.get('device')})", ""]
    if record.get("error"):
        lines.append(f"The re-measurement failed: {record['error']}")
        return "\n".join(lines) + "\n"
    reference = record.get("reference") or {}
    if reference:
        lines.append(f"Reference: {reference.get('name')}, {reference.get('median_ms', 0):.3f} ms. "
                     f"Intervals: {record.get('ci_level')} confidence.")
        lines.append("")
    lines += ["| trial | val acc | re-measured ms [interval] | ratio to reference | first pass ms "
              "[interval] |", "|---:|---:|---|---|---|"]
    by_number = {t.number: t for t in trials}
    for number, r in record.get("trials", {}).items():
        trial = by_number.get(int(number))
        attrs = trial.user_attrs if trial is not None else {}
        first = attrs.get(LATENCY_CI_ATTR)
        first_text = f"{attrs.get('latency_ms', math.nan):.3f}" + (
            f" [{first[0]:.3f}, {first[1]:.3f}]" if isinstance(first, list) and None not in first else "")
        ratio = (f"{r['ratio']:.3f} [{r['ratio_ci_low']:.3f}, {r['ratio_ci_high']:.3f}]"
                 if r.get("ratio") is not None else "-")
        fields = remeasured_fields(record, int(number))
        interval = fields["latency_remeasured_ci_ms"] or [math.nan, math.nan]
        lines.append(f"| {number} | {attrs.get('val_acc', math.nan):.4f} | "
                     f"{fields['latency_remeasured_ms']:.3f} [{interval[0]:.3f}, {interval[1]:.3f}] | "
                     f"{ratio} | {first_text} |")
    return "\n".join(lines) + "\n"


__all__ = [
    "ACCURACY_TOLERANCE",
    "MAX_FINALISTS",
    "NOTE_MARK",
    "SEEDS_ATTR",
    "BestDecision",
    "LatencyFigure",
    "accuracy_interval",
    "anchor_attr",
    "anchor_ms",
    "decide_best",
    "finalist_trials",
    "finalists_note",
    "latency_figure",
    "normalized",
    "remeasured_fields",
    "remeasurement",
    "remeasurement_record",
    "seed_record",
    "seeds_entry",
    "seeds_record",
]
