"""The package's shape: no import circles between modules, no module importing another module's private names."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lockedopd"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports() -> dict[str, list[tuple[str, str | None]]]:
    """module → [(imported module, imported name or None)], every import statement (also inside functions)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    found: dict[str, list[tuple[str, str | None]]] = {}
    for module, path in modules.items():
        edges = []
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges += [(alias.name, None) for alias in node.names if alias.name.startswith("lockedopd")]
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(module, path.name == "__init__.py", node)
                if not target.startswith("lockedopd"):
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    edges.append((sub, None) if sub in modules else (target, alias.name))
        found[module] = edges
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_no_import_cycles_between_modules():
    imports = _imports()
    # an edge to a package is an edge to its __init__; a module importing its own parent package is not a circle
    # (Python has that package initialised before the module)
    graph = {
        module: {t for t, _ in edges if t in imports and t != module and not module.startswith(t + ".")}
        for module, edges in imports.items()
    }
    assert _cycles(graph) == []


def test_the_known_circles_are_gone():
    imports = _imports()
    edges = {(module, target) for module, targets in imports.items() for target, _ in targets}
    assert ("lockedopd.lock.controller", "lockedopd.opd.trainer") not in edges
    adapter = {m for m in imports if m.startswith("lockedopd.adapter.")}
    inner = {m: {t for t, _ in imports[m] if t in adapter} for m in adapter}
    assert _cycles(inner) == []


def test_no_module_imports_another_modules_private_names():
    offenders = [
        f"{module} imports {target}.{name}"
        for module, edges in _imports().items()
        for target, name in edges
        if name is not None and name.startswith("_") and target != module
    ]
    offenders += [
        f"{module} imports private module {target}"
        for module, edges in _imports().items()
        for target, _ in edges
        if any(part.startswith("_") and part != "__init__" for part in target.split("."))
    ]
    assert offenders == []


@pytest.mark.parametrize("name", ["SubspaceBasis", "LockPolicy", "TrackerSettings"])
def test_new_public_names_are_exported(name):
    import lockedopd

    assert getattr(lockedopd, name).__module__.startswith("lockedopd.subspace")


def test_the_package_top_level_holds_few_modules():
    # the rest is grouped by role: runtime/, lock/, opd/, subspace/, adapter/, optim/, tasks/, teachers/, ...
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 8, top


def test_the_training_loop_stays_readable():
    assert len((PACKAGE / "opd" / "trainer.py").read_text().splitlines()) <= 400


def test_every_module_the_readme_names_exists():
    readme = (PACKAGE.parent / "README.md").read_text()
    table = readme.split("## Where things are", 1)[1].split("\n## ", 1)[0]
    named = re.findall(r"`(lockedopd/[\w/]+(?:\.py)?/?)`", table)
    assert len(named) >= 20  # the table names the package's main modules
    missing = [path for path in named if not (PACKAGE.parent / path).exists()]
    assert missing == []
    # and every subpackage of lockedopd appears in it
    packages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    mentioned = {path.split("/")[1].removesuffix(".py") for path in named}
    assert packages - mentioned == set()


def test_no_function_in_the_package_is_longer_than_80_lines():
    long = [
        f"{path.relative_to(PACKAGE.parent)}:{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path in PACKAGE.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno + 1 > 80
    ]
    assert long == []


def test_the_config_module_imports_no_runtime():
    # the config declares choices and checks values; the modules that implement them are looked up by name
    config_imports = {target for target, _ in _imports()["lockedopd.opd.config"]}
    assert config_imports <= {"lockedopd.opd.values", "lockedopd.registry", "lockedopd.subspace.settings"}, (
        config_imports
    )
    leaf_imports = {t for m in ("lockedopd.opd.values", "lockedopd.subspace.settings") for t, _ in _imports()[m]}
    assert leaf_imports == set()
