"""The core's shape, checked: no import cycles among deltatune's modules (imports at module
level; a function-level import is how a lower layer reaches a higher one on purpose), no module
importing another's private names, no method named in the core, every registered method in the
invariant matrix, and the package's public names derived from the method registry."""

from __future__ import annotations

import ast
from pathlib import Path

import deltatune as dt
from deltatune.config import registered_classes

PACKAGE = Path(dt.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))}


def _absolute(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _top_level_imports() -> dict[str, set[str]]:
    modules = _modules()
    packages = {_module_name(p) for p in PACKAGE.rglob("__init__.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, tree in modules.items():
        for node in tree.body:  # module level only
            if isinstance(node, ast.ImportFrom):
                target = _absolute(module, node, module in packages)
                for alias in node.names:
                    candidate = f"{target}.{alias.name}"
                    graph[module].add(candidate if candidate in modules else target)
            elif isinstance(node, ast.Import):
                graph[module].update(a.name for a in node.names)
    return {m: {t for t in targets if t in modules and t != m} for m, targets in graph.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                found.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_no_import_cycles():
    graph = _top_level_imports()
    # a package's __init__ importing its own submodules is how a package is built, not a cycle
    for module in graph:
        graph[module] = {t for t in graph[module] if not t.startswith(module + ".")}
    assert _cycles(graph) == []


def test_no_module_imports_another_modules_private_names():
    offending = []
    for module, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("deltatune")):
                offending += [f"{module}: {a.name}" for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    assert offending == []


#: the core: what every method goes through, which must not know any method in particular
CORE = ["deltatune.api", "deltatune.io", "deltatune.placement", "deltatune.composition", "deltatune.report",
        "deltatune.layer", "deltatune.config", "deltatune.heads", "deltatune.outputs", "deltatune.targets",
        "deltatune.anatomy", "deltatune.backends",
        "deltatune.train.trainer", "deltatune.train.loop", "deltatune.train.settings", "deltatune.train.objectives"]


def test_the_core_names_no_method():
    """No core module imports a method's module, or compares anything with a method's name:
    where a method needs something of the core, it overrides a declared hook."""
    method_names = {cls.method for cls in registered_classes()}
    found = []
    for module, tree in _modules().items():
        if module not in CORE:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = _absolute(module, node, False)
                if target.startswith("deltatune.methods"):
                    found.append(f"{module}:{node.lineno}: imports {target}")
            elif isinstance(node, ast.Compare):
                for side in [node.left, *node.comparators]:
                    values = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
                    for value in values:
                        if isinstance(value, ast.Constant) and value.value in method_names:
                            found.append(f"{module}:{node.lineno}: compares with the method name {value.value!r}")
    assert found == []


def test_every_registered_method_is_in_the_invariant_matrix():
    """Standalone methods in test_invariants.py; methods over other deltas in
    test_invariants_over_deltas.py (which checks that side itself)."""
    from test_invariants import METHODS

    covered = {make().method for make in METHODS.values()}
    assert {cls.method for cls in registered_classes() if cls.standalone} - covered == set()


def test_public_names_come_from_the_registry():
    for cls in registered_classes():
        assert getattr(dt, cls.__name__) is cls and cls.__name__ in dt.__all__
    assert all(hasattr(dt, name) for name in dt.__all__)
