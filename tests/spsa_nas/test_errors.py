"""spsa_nas.errors: pydantic validation errors as field problems and one-line messages."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ValidationError, model_validator

from spsa_nas.config import TrainConfig
from spsa_nas.errors import FieldProblem, field_problems, format_validation_error


class _Pair(BaseModel):
    low: int
    high: int

    @model_validator(mode="after")
    def _ordered(self) -> _Pair:
        if self.low > self.high:
            raise ValueError("low must not exceed high")
        return self


def _error(model: type[BaseModel], data: object) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        model.model_validate(data)
    return info.value


def test_problems_carry_loc_message_type_and_input() -> None:
    [problem] = field_problems(_error(TrainConfig, {"epochs": 0}))
    assert problem.loc == ("epochs",) and problem.type == "greater_than_equal" and problem.input == 0
    assert problem.msg == "Input should be greater than or equal to 1"
    assert problem.as_dict() == {"loc": ["epochs"], "msg": problem.msg, "type": "greater_than_equal"}


def test_a_prefix_goes_before_every_loc_and_value_error_is_dropped() -> None:
    problems = field_problems(_error(_Pair, {"low": 3, "high": 1}), prefix=("body", "range"))
    assert problems == [
        FieldProblem(("body", "range"), "low must not exceed high", "value_error", {"low": 3, "high": 1})
    ]


def test_one_line_names_each_field() -> None:
    message = format_validation_error(_error(TrainConfig, {"epochs": 0, "lr": "fast"}), prefix=("train",))
    assert message == (
        "train.epochs: Input should be greater than or equal to 1; "
        "train.lr: Input should be a valid number, unable to parse string as a number"
    )
    assert format_validation_error(_error(_Pair, {"low": 2, "high": 1})) == "low must not exceed high"
