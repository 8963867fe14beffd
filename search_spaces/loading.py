"""Loading search spaces: YAML, files, dicts and the built-ins, with file/line/field in every error."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from search_spaces.space import AlphaRange, Path_, SearchSpace, SpaceError, SpaceProblem, StageChoices

BUILTIN_DIR = Path(__file__).with_name("builtin")


def _line_map(node: yaml.Node, path: Path_ = ()) -> Iterator[tuple[Path_, int]]:
    """(field path, 1-based line) for every node of a composed YAML document."""
    yield path, node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            raw = key.value
            key_path: str | int = int(raw) if isinstance(raw, str) and raw.isdigit() else raw
            yield (*path, key_path), key.start_mark.line + 1
            for sub_path, line in _line_map(value, (*path, key_path)):
                if sub_path != (*path, key_path):
                    yield sub_path, line
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            yield from _line_map(item, (*path, i))


_FIELDS = {
    "space": set(SearchSpace.model_fields),
    "stage": set(StageChoices.model_fields),
    "alpha": set(AlphaRange.model_fields),
}


def _clean_loc(loc: tuple[Any, ...], data: Any) -> Path_:
    """A pydantic error location without the union-member tags, following the data."""
    path: list[str | int] = []
    node = data
    for part in loc:
        if isinstance(node, dict) and part in node:
            path.append(part)
            node = node[part]
        elif isinstance(node, dict) and isinstance(part, int | str) and str(part).isdigit() \
                and int(part) in node:
            path.append(int(part))
            node = node[int(part)]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            path.append(part)
            node = node[part]
        elif isinstance(part, str) and any(part in fields for fields in _FIELDS.values()):
            path.append(part)  # a field that is missing in the data
            node = None
    return tuple(path)


def _valid_fields(path: Path_) -> set[str]:
    if "alpha" in path[:-1]:
        return _FIELDS["alpha"]
    if path and path[0] in ("stages", "all_stages"):
        return _FIELDS["stage"]
    return _FIELDS["space"]


_SHAPE_ERRORS = {"list_type", "dict_type", "model_type", "model_attributes_type"}


def _problems(exc: ValidationError, data: Any) -> list[tuple[Path_, str]]:
    errors = [(err, _clean_loc(tuple(err["loc"]), data)) for err in exc.errors(include_url=False)]
    found: list[tuple[Path_, str]] = []
    for err, path in errors:
        if err["type"] in _SHAPE_ERRORS and any(
            other is not err and other["type"] not in _SHAPE_ERRORS and p[: len(path)] == path
            for other, p in errors
        ):
            continue  # the other member of a union (list vs range, list vs mapping) fits better
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, SpaceProblem):
            path = (*path, *cause.path)
            message = cause.message
        elif err["type"] == "extra_forbidden":
            message = (f"unknown field {path[-1]!r}; valid: "
                       f"{', '.join(sorted(_valid_fields(path)))}")
        elif err["type"] == "missing":
            message = "required field is missing"
        else:
            message = f"{err['msg']} (got {err.get('input')!r})"
        if all(p != path for p, _ in found):  # union branches repeat the same place
            found.append((path, message))
    return found


def _dotted(path: Path_) -> str:
    return ".".join(str(p) for p in path) or "<top level>"


def parse_space(data: Any, *, source: str | None = None, lines: dict[Path_, int] | None = None
                ) -> SearchSpace:
    """Validate `data` (a dict) as a SearchSpace; errors name source, line and field."""
    where = source or "<inline space>"
    if not isinstance(data, dict):
        raise SpaceError(f"{where}: a search space is a mapping with fields "
                         f"{', '.join(SearchSpace.model_fields)}; got {type(data).__name__}")
    try:
        return SearchSpace.model_validate(data)
    except ValidationError as exc:
        messages = []
        for path, message in _problems(exc, data):
            line = None
            if lines:
                for k in range(len(path), -1, -1):
                    if path[:k] in lines:
                        line = lines[path[:k]]
                        break
            prefix = f"{where}:{line}" if line else where
            messages.append(f"{prefix}: {_dotted(path)}: {message}")
        raise SpaceError("; ".join(messages), messages) from None


def parse_space_yaml(text: str, *, source: str) -> SearchSpace:
    """Parse and validate YAML text; `source` names it (a file path) in errors."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpaceError(f"{source}{line}: not valid YAML: {problem}") from None
    lines = dict(_line_map(node)) if node is not None else {}
    return parse_space(data, source=source, lines=lines)


def _builtin_paths() -> dict[str, Path]:
    return {p.stem: p for p in sorted(BUILTIN_DIR.glob("*.yaml"))}


def builtin_spaces() -> dict[str, SearchSpace]:
    """The built-in spaces, by name."""
    spaces = {}
    for name, path in _builtin_paths().items():
        space = parse_space_yaml(path.read_text(), source=str(path))
        if space.name != name:
            raise SpaceError(f"{path}: name {space.name!r} differs from the file name {name!r}")
        spaces[name] = space
    return spaces


def load_space(spec: str | Path | dict[str, Any] | SearchSpace, *, source: str | None = None
               ) -> SearchSpace:
    """A space from a built-in name, a YAML file path, or a dict (an inline space)."""
    if isinstance(spec, SearchSpace):
        return spec
    if isinstance(spec, dict):
        return parse_space(spec, source=source)
    builtin = _builtin_paths()
    if isinstance(spec, str) and spec in builtin:
        return parse_space_yaml(builtin[spec].read_text(), source=str(builtin[spec]))
    path = Path(spec)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise SpaceError(f"{path}: no such search-space file")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise SpaceError(f"{path}: cannot read: {exc}") from None
        return parse_space_yaml(text, source=source or str(path))
    raise SpaceError(f"unknown search space {str(spec)!r}: not a built-in "
                     f"({', '.join(builtin)}) and not a .yaml file")
