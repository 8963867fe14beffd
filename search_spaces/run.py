"""RunReport: what one run of a search did and why it ended; one type for the local and the Ray runner."""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

# Why a run ended:
#   done      - cfg.trials trials are finished (complete + pruned);
#   timeout   - cfg.timeout_s of this run ran out (trials in flight were let finish);
#   cancelled - the caller asked the run to stop (should_cancel / stop_event);
#   failing   - trials kept crashing (the same error would repeat for every trial).
Outcome = Literal["done", "timeout", "cancelled", "failing"]
OUTCOMES: tuple[str, ...] = get_args(Outcome)


class RunReport(BaseModel):
    """One run of a search (`workers.local.run_local` or `workers.ray_runner.run_search`).

    The CLI prints it (and exits 1 when `outcome == "failing"`), the service's dispatcher maps it
    to the search's status and stores `to_json()` in the search's row; the API answers it as the
    search's `summary`. Counts are of the whole study (earlier runs included) unless they say
    "this run"; the Ray runner's own measurements are None for the local runner.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    outcome: Outcome = Field(description="why the run ended: done, timeout, cancelled or failing")
    runner: Literal["local", "ray"]
    study_name: str
    trials_requested: int = Field(description="the search's budget of finished trials")
    finished: int = Field(description="complete + pruned trials of the study")
    counts: dict[str, int] = Field(description="trials of the study by state: complete, pruned, fail, "
                                               "running, waiting")
    ran: int = Field(description="trials this run started")
    crashed: int = Field(description="trials of this run that failed with an exception")
    last_error: str | None = Field(None, description="the error of the last crashed trial of this run")
    elapsed_s: float = Field(description="wall-clock seconds of this run")
    recovered: list[int] = Field(default_factory=list, description="trials an earlier run left RUNNING "
                                                                   "and this one failed at its start")
    # The Ray runner's own (None for the local runner).
    run_id: str | None = Field(None, description="Ray: this run's id (its cancel attr's suffix)")
    cancelled_trials: int | None = Field(None, description="Ray: trials of the study stopped by a cancel")
    worker_lost: int | None = Field(None, description="Ray: trials failed because their worker vanished")
    retries_enqueued: int | None = Field(None, description="Ray: re-runs enqueued for lost trials")
    duplicate_claims: int | None = Field(None, description="Ray: trials two tasks ran (0 unless a bug)")
    trial_s: float | None = Field(None, description="Ray: seconds spent in trial functions")
    task_s: float | None = Field(None, description="Ray: seconds spent in tasks (trials + overhead)")
    db_retries: int | None = Field(None, description="Ray: database calls retried (busy, locked)")
    ray: Literal["local", "cluster", "caller"] | None = Field(
        None, description="Ray: started here (local), joined by address (cluster), or the caller's")

    @property
    def failing(self) -> bool:
        """True when the run stopped because trials kept crashing."""
        return self.outcome == "failing"

    def line(self) -> str:
        """One line for people: finished/requested, the counts by state and the outcome."""
        c = self.counts
        return (f"{self.finished}/{self.trials_requested} finished ({c.get('complete', 0)} complete, "
                f"{c.get('pruned', 0)} pruned, {c.get('fail', 0)} failed); outcome: {self.outcome}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields, the runner-specific ones only when set."""
        return self.model_dump(mode="json", exclude_none=True)

    def to_json(self) -> str:
        return self.model_dump_json(exclude_none=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> RunReport:
        """The report `to_json` wrote (pydantic ValidationError naming the field when it is not one)."""
        return cls.model_validate_json(text)


__all__ = ["OUTCOMES", "Outcome", "RunReport"]
