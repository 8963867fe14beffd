"""The Optuna storage as one caller's dashboard sees it: their studies, writes limited to notes and files."""

from __future__ import annotations

from collections.abc import Callable, Container, Sequence
from typing import Any

from optuna.distributions import BaseDistribution
from optuna.storages import BaseStorage
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState


class ReadOnlyStudyError(KeyError):
    """Refused by the service: studies are created, renamed, deleted and told through the API only."""


class ScopedStorage(BaseStorage):
    """The Optuna storage as one caller's dashboard sees it.

    `readable(study_id)` and `writable(study_id)` decide; a study or trial the caller may not read
    raises KeyError (optuna-dashboard answers 404). Writes other than system attrs (notes and
    artifact records) are refused for everyone: the service owns the studies' life cycle.
    """

    def __init__(
        self,
        inner: BaseStorage,
        readable: Callable[[int], bool],
        writable: Callable[[int], bool],
        study_of_trial: Callable[[int], int | None],
    ) -> None:
        self._inner = inner
        self._readable = readable
        self._writable = writable
        self._study_of_trial = study_of_trial

    def _study(self, study_id: int) -> int:
        if not self._readable(study_id):
            raise KeyError(f"No study with study_id {study_id} exists.")
        return study_id

    def _trial(self, trial_id: int) -> int:
        study_id = self._study_of_trial(trial_id)
        if study_id is None or not self._readable(study_id):
            raise KeyError(f"No trial with trial_id {trial_id} exists.")
        return trial_id

    def _writable_study(self, study_id: int) -> int:
        if not self._writable(self._study(study_id)):
            raise ReadOnlyStudyError("only the owner of a search writes notes and files on its study")
        return study_id

    # studies
    def create_new_study(self, directions: Sequence[StudyDirection], study_name: str | None = None) -> int:
        raise ReadOnlyStudyError("create searches through the API: POST /api/v1/searches")

    def delete_study(self, study_id: int) -> None:
        raise ReadOnlyStudyError("studies of searches cannot be deleted from the dashboard")

    def set_study_user_attr(self, study_id: int, key: str, value: Any) -> None:
        raise ReadOnlyStudyError("study user attributes are the service's")

    def set_study_system_attr(self, study_id: int, key: str, value: Any) -> None:
        self._inner.set_study_system_attr(self._writable_study(study_id), key, value)  # notes, files

    def get_study_id_from_name(self, study_name: str) -> int:
        return self._study(self._inner.get_study_id_from_name(study_name))

    def get_study_name_from_id(self, study_id: int) -> str:
        return self._inner.get_study_name_from_id(self._study(study_id))

    def get_study_directions(self, study_id: int) -> list[StudyDirection]:
        return self._inner.get_study_directions(self._study(study_id))

    def get_study_user_attrs(self, study_id: int) -> dict[str, Any]:
        return self._inner.get_study_user_attrs(self._study(study_id))

    def get_study_system_attrs(self, study_id: int) -> dict[str, Any]:
        return self._inner.get_study_system_attrs(self._study(study_id))

    def get_all_studies(self) -> list[Any]:
        studies = [s for s in self._inner.get_all_studies() if self._readable(s._study_id)]
        return sorted(studies, key=lambda s: s._study_id)

    # trials
    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        raise ReadOnlyStudyError("trials are created by the search's workers")

    def set_trial_param(
        self, trial_id: int, param_name: str, param_value_internal: float, distribution: BaseDistribution
    ) -> None:
        raise ReadOnlyStudyError("trials are written by the search's workers")

    def set_trial_state_values(
        self, trial_id: int, state: TrialState, values: Sequence[float] | None = None
    ) -> bool:
        raise ReadOnlyStudyError("trials are told by the search's workers")

    def set_trial_intermediate_value(self, trial_id: int, step: int, intermediate_value: float) -> None:
        raise ReadOnlyStudyError("trials are written by the search's workers")

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        raise ReadOnlyStudyError("trial user attributes are the search's results")

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        study_id = self._study_of_trial(self._trial(trial_id))
        self._writable_study(int(study_id))  # type: ignore[arg-type]
        self._inner.set_trial_system_attr(trial_id, key, value)  # files attached to a running trial

    def get_trial_id_from_study_id_trial_number(self, study_id: int, trial_number: int) -> int:
        return self._inner.get_trial_id_from_study_id_trial_number(self._study(study_id), trial_number)

    def get_trial(self, trial_id: int) -> FrozenTrial:
        return self._inner.get_trial(self._trial(trial_id))

    def get_all_trials(
        self, study_id: int, deepcopy: bool = True, states: Container[TrialState] | None = None
    ) -> list[FrozenTrial]:
        return self._inner.get_all_trials(self._study(study_id), deepcopy=deepcopy, states=states)

    def get_n_trials(self, study_id: int, state: tuple[TrialState, ...] | TrialState | None = None) -> int:
        return self._inner.get_n_trials(self._study(study_id), state)

    def get_best_trial(self, study_id: int) -> FrozenTrial:
        return self._inner.get_best_trial(self._study(study_id))

    def remove_session(self) -> None:
        self._inner.remove_session()

    def check_trial_is_updatable(self, trial_id: int, trial_state: TrialState) -> None:
        self._inner.check_trial_is_updatable(trial_id, trial_state)
