"""The module-level import graph of ``detectkit`` (``callbacks/`` mapped as ``detectkit.callbacks``)
has no cycle, and the core never imports the callbacks.

Only imports that run when a module is imported count (module body, class bodies, ``if``/``try``
blocks; not ``if TYPE_CHECKING``): an import inside a function is a deliberate lazy load. The
layer contracts that also cover lazy imports are import-linter's (``make lint``); this test keeps
the suite itself honest when it runs without the linter.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"detectkit": ROOT / "detectkit", "detectkit.callbacks": ROOT / "callbacks"}


def module_files() -> dict[str, Path]:
    out = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def module_level_imports(module: str, path: Path) -> list[str]:
    """Absolute names imported when ``module`` is imported (``from a import b`` gives ``a.b`` and ``a``)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: list[str] = []

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                names.extend(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    parts = parts[: len(parts) - node.level + 1]
                    base = ".".join([*parts, base] if base else parts)
                names.append(base)
                names.extend(f"{base}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.If):
                if not _is_type_checking(node.test):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)
                visit(node.orelse)
                visit(node.finalbody)
            elif isinstance(node, (ast.ClassDef, ast.With)):
                visit(node.body)

    visit(ast.parse(path.read_text(), str(path)).body)
    return names


def import_graph() -> dict[str, set[str]]:
    """``module -> modules of the package it imports at module level``."""
    files = module_files()
    graph = {}
    for module, path in files.items():
        graph[module] = {n for n in module_level_imports(module, path) if n in files and n != module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as ``[a, b, ..., a]``, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_the_walker_sees_imports_and_cycles():
    graph = import_graph()
    assert "detectkit.checkpoint.record" in graph["detectkit.checkpoint.loader"]
    assert "detectkit.checkpoint" in graph["detectkit.models.yolo_nas.weights"]
    assert "detectkit.callbacks.utils" in graph["detectkit.callbacks.pruning"]  # the mapped package
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_module_level_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "module-level import cycle: " + " -> ".join(cycle or [])


def test_the_core_never_imports_the_callbacks():
    files = module_files()
    offenders = [
        f"{module}: {name}"
        for module, path in files.items()
        if not module.startswith("detectkit.callbacks")
        for node in ast.walk(ast.parse(path.read_text()))  # lazy imports included
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for name in ([a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""])
        if name == "detectkit.callbacks" or name.startswith("detectkit.callbacks.")
    ]
    assert not offenders, "the core imports detectkit.callbacks:\n" + "\n".join(offenders)


def test_load_climbs_the_layers_only_through_registrations(tmp_path):
    """``detectkit.load`` of a weights file calls upward only where a lower layer holds something an
    upper one registered: the registry calls the family's builder, the checkpoint loader the model's
    declared ``apply_record`` hook (before the redesign the path climbed back up 13 times)."""
    import sys

    import tomllib

    import detectkit
    from detectkit.checkpoint import save_weights

    layers = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]["layers"]
    rank = {}
    for i, row in enumerate(reversed(layers)):  # lowest first
        for name in row.replace("(", "").replace(")", "").replace(":", "|").split("|"):
            rank[name.strip()] = i

    def layer(module: str) -> str | None:
        parts = module.split(".")
        return parts[1] if parts[0] == "detectkit" and len(parts) > 1 and parts[1] in rank else None

    path = tmp_path / "w.pt"
    save_weights(detectkit.create_model("yolo_nas_s", num_classes=2), path)
    upward: set[tuple[str, str, str]] = set()

    def profile(frame, event, arg):
        if event == "call" and frame.f_back is not None:
            callee, caller = layer(frame.f_globals.get("__name__", "")), layer(frame.f_back.f_globals.get("__name__", ""))
            if callee and caller and rank[callee] > rank[caller]:
                upward.add((caller, callee, frame.f_code.co_name))

    sys.setprofile(profile)
    try:
        detectkit.load(path)
    finally:
        sys.setprofile(None)
    assert upward == {("registry", "models", "yolo_nas_s"), ("checkpoint", "models", "apply_record")}
