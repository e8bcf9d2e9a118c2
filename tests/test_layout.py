"""What the layout promises, read from the source: no import cycles in tasks/ and bench/
(imports inside functions count), bench/ imports nothing from tests/, and the fast path is
switched by its Plan alone: every choice is a field of the frozen Plan, and no module of
tasks/fast holds a mutable switch or is written to from outside."""

import __future__

import ast
import dataclasses
import importlib
import pkgutil
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources(*folders: str) -> dict[str, Path]:
    return {_module_name(p): p for folder in folders for p in sorted((REPO / folder).rglob("*.py"))}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of `modules` that this file imports, anywhere in it. bench's scripts import
    their siblings by bare name (bench/ on sys.path)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            for candidate in (name, f"bench.{name}"):
                if candidate in modules:
                    found.add(candidate)
                    break
    found.discard(_module_name(path))
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


@pytest.mark.parametrize("folders", [("tasks", "flows"), ("bench",)])
def test_no_import_cycles(folders):
    modules = _sources(*folders)
    graph = {name: _imports(path, modules) for name, path in modules.items()}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_bench_imports_nothing_from_tests():
    tests = _sources("tests")
    for name, path in _sources("bench").items():
        assert not _imports(path, tests), f"{name} imports {_imports(path, tests)}"


# Every choice the fast path makes; the code reads these from the Plan (tasks/fast/plan.py)
CHOICES = {
    "fast",
    "liger",
    "gradient_checkpointing",
    "precision",
    "optimizer",
    "compile",
    "nf4_traced",
    "split",
    "offload",
    "fused_projections",
    "adapters_in_gemm",
    "residual",
    "triton",
    "swiglu_kernel",
    "pad_k",
    "partitioner_cse",
    "activation_memory_budget",
    "checkpoint",
}
IMMUTABLE = (bool, int, float, str, bytes, type(None), frozenset, types.MappingProxyType)
CACHES = {"tasks.fast.ops.layer_checkpoint._STREAMS"}  # a side CUDA stream per device, made once: no choice


def _fast_modules() -> list:
    import tasks.fast

    return [
        importlib.import_module(info.name) for info in pkgutil.walk_packages(tasks.fast.__path__, prefix="tasks.fast.")
    ]


def _immutable(value) -> bool:
    if isinstance(value, tuple):
        return all(_immutable(v) for v in value)
    return isinstance(value, IMMUTABLE)


def test_every_fast_path_choice_is_a_field_of_the_frozen_plan():
    from tasks.fast.plan import Plan

    plan = Plan(fast=True, liger=False, gradient_checkpointing=True, precision="bf16")
    assert CHOICES <= {f.name for f in dataclasses.fields(Plan)}
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.triton = False
    assert set(plan.describe()) == {f.name for f in dataclasses.fields(Plan)} - {"note"}  # all in the summary


def test_fast_path_modules_hold_no_mutable_switch():
    """Module-level values of tasks/fast are functions, classes, modules or immutable constants
    (the mappings read-only); no function rebinds a module global."""
    modules = _fast_modules()
    assert {m.__name__ for m in modules} >= {
        "tasks.fast.plan",
        "tasks.fast.patch",
        "tasks.fast.ops.nf4_lora",
        "tasks.fast.ops.nf4_triton",
        "tasks.fast.ops.swiglu_lora",
        "tasks.fast.ops.layer_checkpoint",
    }
    for module in modules:
        for name, value in vars(module).items():
            if name.startswith("__") or f"{module.__name__}.{name}" in CACHES:
                continue
            if isinstance(value, (types.ModuleType, type, __future__._Feature)) or callable(value):
                continue
            assert _immutable(value), f"{module.__name__}.{name} is a mutable {type(value).__name__}"
        tree = ast.parse(Path(module.__file__).read_text())
        assert not [n for n in ast.walk(tree) if isinstance(n, ast.Global)], f"{module.__name__} rebinds a global"


def test_nothing_writes_to_a_fast_path_module():
    """No assignment `module.NAME = ...` (nor monkeypatch.setattr of a constant) on a module of
    tasks/fast anywhere in tasks/, flows/, bench/ or tests/: a bench variant or a test builds a
    Plan (dataclasses.replace) instead."""
    fast = {m.__name__ for m in _fast_modules()}
    for path in sorted(p for folder in ("tasks", "flows", "bench", "tests") for p in (REPO / folder).rglob("*.py")):
        tree = ast.parse(path.read_text())
        aliases = {}  # local name -> fast module
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                for alias in node.names:
                    if f"{node.module}.{alias.name}" in fast:
                        aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in fast and alias.asname:
                        aliases[alias.asname] = alias.name
        for node in ast.walk(tree):
            targets = (
                node.targets
                if isinstance(node, ast.Assign)
                else [node.target]
                if isinstance(node, (ast.AugAssign, ast.AnnAssign))
                else []
            )
            for target in targets:
                for t in ast.walk(target):
                    if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id in aliases:
                        pytest.fail(f"{path.relative_to(REPO)}:{t.lineno} assigns {aliases[t.value.id]}.{t.attr}")
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "setattr" and len(node.args) >= 2:
                owner, attr = node.args[0], node.args[1]
                name = attr.value if isinstance(attr, ast.Constant) and isinstance(attr.value, str) else ""
                if isinstance(owner, ast.Name) and owner.id in aliases and name.isupper():
                    pytest.fail(f"{path.relative_to(REPO)}:{node.lineno} sets {aliases[owner.id]}.{name}")
                if (
                    isinstance(owner, ast.Constant)
                    and isinstance(owner.value, str)
                    and owner.value.rsplit(".", 1)[0] in fast
                ):
                    pytest.fail(f"{path.relative_to(REPO)}:{node.lineno} sets {owner.value}")


def test_tasks_never_import_prefect_mlflow_or_dvc():
    for path in sorted((REPO / "tasks").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module]
                if isinstance(node, ast.ImportFrom) and node.module
                else []
            )
            bad = [n for n in names if n.split(".")[0] in ("prefect", "mlflow", "dvc")]
            assert not bad, f"{path.relative_to(REPO)}:{node.lineno} imports {bad}"
