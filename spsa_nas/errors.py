"""Pydantic validation errors as field problems and one-line messages, for every front end."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

Loc = tuple[str | int, ...]


@dataclass(frozen=True)
class FieldProblem:
    """One wrong field: where (`loc`), what is wrong (`msg`), pydantic's error `type` and the input."""

    loc: Loc
    msg: str
    type: str = "value_error"
    input: Any = None

    @property
    def dotted(self) -> str:
        """`loc` as `train.epochs` (empty for the model as a whole)."""
        return ".".join(str(part) for part in self.loc)

    def as_dict(self) -> dict[str, Any]:
        """The entry of a 422 answer's `detail` list, shaped like FastAPI's own."""
        return {"loc": list(self.loc), "msg": self.msg, "type": self.type}


def field_problems(exc: ValidationError, *, prefix: Sequence[str | int] = ()) -> list[FieldProblem]:
    """One FieldProblem per error of `exc`, its loc under `prefix`; the message without pydantic's
    `Value error, ` prefix (a validator's own message says what to do)."""
    return [
        FieldProblem(
            loc=(*prefix, *error["loc"]),
            msg=error["msg"].removeprefix("Value error, "),
            type=error["type"],
            input=error.get("input"),
        )
        for error in exc.errors(include_url=False)
    ]


def format_validation_error(
    exc: ValidationError, *, prefix: Sequence[str | int] = (), sep: str = "; "
) -> str:
    """`exc` in one line: `train.epochs: Input should be ...; objective: ...` (`prefix` before each loc)."""
    return sep.join(
        f"{problem.dotted}: {problem.msg}" if problem.loc else problem.msg
        for problem in field_problems(exc, prefix=prefix)
    )
