"""The test tree mirrors the package, and test modules share code only through conftest.py and
tests/helpers.py (a test module imported by another runs its module-level code twice and ties the
two modules' fixtures together)."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import REPO

TESTS = REPO / "tests"


def _test_files() -> list[Path]:
    return sorted(p for p in TESTS.rglob("test_*.py") if "__pycache__" not in p.parts)


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_no_test_module_imports_another():
    bad = {}
    for path in [*_test_files(), TESTS / "helpers.py", TESTS / "conftest.py"]:
        mods = _imported_modules(path)
        hits = sorted(m for m in mods if m.split(".")[-1].startswith(("test_", "conftest")))
        if hits:
            bad[str(path.relative_to(REPO))] = hits
    assert not bad, f"import shared code from tests.helpers instead: {bad}"


def test_test_directories_mirror_the_package():
    packages = {p.name for p in (REPO / "miaotui").iterdir() if (p / "__init__.py").is_file()}
    dirs = {p.parent for p in _test_files()} - {TESTS}
    for d in dirs:
        assert d.parent == TESTS and d.name in packages, f"{d}: no miaotui/{d.name}/ package"
        assert (d / "__init__.py").is_file(), f"{d} needs an __init__.py (tests are packages)"
