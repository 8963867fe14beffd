"""The direction of imports between the packages (DESIGN.md): a layer never imports one above it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# package -> top-level modules it must never import
FORBIDDEN = {
    "spsa_nas": {"optuna", "optuna_dashboard", "ray", "sqlalchemy", "fastapi", "uvicorn",
                 "alembic", "search_spaces", "workers", "service"},
    "search_spaces": {"ray", "fastapi", "uvicorn", "workers", "service"},
    "workers": {"fastapi", "uvicorn", "service"},
}


IMPORTERS = {"import_module", "__import__"}  # importlib.import_module(...), __import__(...)


def _imports(path: Path) -> set[str]:
    """Top-level packages a file imports: import statements, `import_module("x.y")` and
    `__import__("x")` with a literal name, and the names listed in a `*_MODULES` constant (module
    names imported later by a loop)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if called in IMPORTERS and isinstance(node.args[0].value, str):
                names.add(node.args[0].value.split(".")[0])
        elif isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id.endswith("_MODULES") for t in node.targets
        ):
            for item in ast.walk(node.value):
                if isinstance(item, ast.Constant) and isinstance(item.value, str):
                    names.add(item.value.split(".")[0])
    return names


def test_the_import_finder_sees_dynamic_imports(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text(
        "import importlib\nfrom importlib import import_module\n"
        "importlib.import_module('ray.util')\nimport_module('fastapi')\n__import__('uvicorn')\n"
        "PLUGIN_MODULES = ('service.cli.serve',)\n"
    )
    assert _imports(source) == {"importlib", "ray", "fastapi", "uvicorn", "service"}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_flow_one_way(package: str) -> None:
    offenders = []
    for path in sorted((ROOT / package).rglob("*.py")):
        bad = _imports(path) & FORBIDDEN[package]
        if bad:
            offenders.append(f"{path.relative_to(ROOT)} imports {sorted(bad)}")
    assert not offenders, "\n".join(offenders)


def test_every_source_file_says_what_it_holds() -> None:
    missing = []
    for package in ("spsa_nas", "search_spaces", "workers", "service", "benchmarks"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if "migrations/versions" in str(path) and path.read_text().startswith('"""'):
                continue
            doc = ast.get_docstring(ast.parse(path.read_text()))
            if not doc:
                missing.append(str(path.relative_to(ROOT)))
    assert not missing, f"files without a first-line docstring: {missing}"
