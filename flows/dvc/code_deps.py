"""Which source files a stage runs, read from the source: the transitive closure of the project
modules its entry modules import. Every `import` and `from ... import` statement counts, those
inside functions too (the stages import their heavy dependencies lazily), and so do the package
`__init__.py` files that run on the way. dvc.yaml's code dependencies are this closure, so an
edit to any module a stage can execute makes DVC run the stage again: the record follows the code.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("tasks", "flows", "schemas")  # the project's own packages (pyproject's [tool.setuptools])


def module_file(name: str, root: Path = REPO) -> Path | None:
    """tasks.catalog -> tasks/catalog.py; a package -> its __init__.py; None if not a project module."""
    if name.split(".")[0] not in PACKAGES:
        return None
    path = root.joinpath(*name.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


def _with_packages(name: str) -> list[str]:
    """Importing a.b.c runs a/__init__.py and a/b/__init__.py first."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


@cache
def imported_modules(name: str, root: Path = REPO) -> frozenset[str]:
    """The project modules that `name`'s source imports anywhere in the file."""
    path = module_file(name, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: `from . import x` inside package p means p.x
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from p import x` imports p, and p.x too when x is a module rather than a name in p
            candidates = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for candidate in candidates:
            if module_file(candidate, root) is not None:
                found.update(_with_packages(candidate))
    return frozenset(found)


def closure(entries: tuple[str, ...], root: Path = REPO) -> list[str]:
    """Repo-relative paths of every project module the entries can execute, sorted."""
    seen: set[str] = set()
    todo = [m for entry in entries for m in _with_packages(entry)]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        if module_file(name, root) is None:
            raise ValueError(f"{name} is not a module of this project under {root}")
        seen.add(name)
        todo.extend(imported_modules(name, root) - seen)
    return sorted(str(module_file(m, root).relative_to(root)) for m in seen)
