"""The shape of the source tree: layered imports, no import cycles, small modules.

Layers, lowest first: base < ops < models < engine < serving (pipeline, rpc) <
front (cli, magic). A module may import its own layer or a lower one. Every
``import`` statement counts, including those inside functions (they run too,
only later); imports under ``if TYPE_CHECKING:`` do not (they never run).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "mii"

LAYERS = ["base", "ops", "models", "engine", "serving", "front"]

# Longest prefix wins. A module missing here fails test_every_module_has_a_layer:
# a new module must say where it belongs.
LAYER_OF_PREFIX = {
    "mii.config": "base",
    "mii.errors": "base",
    "mii.response": "base",
    "mii.envs": "base",
    "mii.cache": "base",
    "mii.sampling_options": "base",
    "mii.constraint_options": "base",
    "mii.scheduling_options": "base",
    "mii.option_errors": "base",
    "mii.prompts": "base",
    "mii.version": "base",
    "mii.ops": "ops",
    "mii.models": "models",
    "mii.engine": "engine",
    "mii.pipeline": "serving",
    "mii.async_chat": "serving",  # mii.AsyncEngine: the engine's, with the chat template's methods
    "mii.chat_prompts": "serving",
    "mii.engine_thread": "serving",
    "mii.demo": "serving",
    "mii.rpc": "serving",
    "mii.ray_backend": "serving",  # Ray deployments: on mii.rpc's pool, gateway and front
    "mii.cli": "front",
    "mii.magic": "front",
    "mii.__main__": "front",
    "mii": "front",  # the package facade re-exports the public API of every layer
}

MAX_LINES = 450
# Triton kernel files: long argument lists and unrolled tile code, one kernel family each.
KERNEL_FILES = {"mii/ops/triton_attention.py"}
GENERATED = {"mii/rpc/mii_pb2.py", "mii/rpc/mii_pb2_grpc.py"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> str | None:
    for prefix in sorted(LAYER_OF_PREFIX, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return LAYER_OF_PREFIX[prefix]
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported_names(module: str, tree: ast.AST) -> list[tuple[str, int]]:
    """Every mii module that ``module`` imports, with the line, skipping TYPE_CHECKING blocks."""
    is_package = MODULES[module].name == "__init__.py"
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                # `from mii.rpc import registry` imports the submodule mii.rpc.registry
                sub = f"{target}.{alias.name}"
                found.append((sub if sub in MODULES else target, node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return [(name, line) for name, line in found if name == "mii" or name.startswith("mii.")]


def _resolve(name: str) -> str | None:
    """The module of the source tree an imported name refers to (its nearest existing parent)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, dict[str, int]]:
    graph: dict[str, dict[str, int]] = {}
    for module, path in MODULES.items():
        edges: dict[str, int] = {}
        for name, line in _imported_names(module, ast.parse(path.read_text(), str(path))):
            target = _resolve(name)
            if target is not None and target != module:
                edges.setdefault(target, line)
        graph[module] = edges
    return graph


def test_every_module_has_a_layer():
    unplaced = [m for m in MODULES if layer(m) is None]
    assert not unplaced, f"add these modules to LAYER_OF_PREFIX: {unplaced}"


def test_no_import_from_a_higher_layer():
    rank = {name: i for i, name in enumerate(LAYERS)}
    wrong = []
    for module, edges in import_graph().items():
        if module == "mii":
            continue  # the facade
        for target, line in edges.items():
            if rank[layer(target)] > rank[layer(module)]:
                wrong.append(
                    f"{module} ({layer(module)}) line {line} imports {target} ({layer(target)})"
                )
    assert not wrong, "imports from a higher layer:\n" + "\n".join(wrong)


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One import cycle of ``graph`` (as a path that returns to its start), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in graph.get(node, {}):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in graph:
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles():
    # A package's __init__ runs before its submodules; the facade `mii` imports its
    # layers lazily inside functions, which is not a cycle in practice, but a submodule
    # that imports `mii` itself would be one. So the facade's own edges are left out.
    graph = {m: e for m, e in import_graph().items() if m != "mii"}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    graph = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": 1}, "b": {}}) is None


def test_graph_sees_function_level_and_relative_imports():
    code = "def f():\n    from mii.rpc import registry\n    from . import launcher\n"
    tree = ast.parse(code)
    names = [n for n, _ in _imported_names("mii.rpc.client", tree)]
    assert names == ["mii.rpc.registry", "mii.rpc.launcher"]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_is_small(module):
    rel = MODULES[module].relative_to(SRC).as_posix()
    if rel in KERNEL_FILES or rel in GENERATED:
        return
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{rel} has {lines} lines; split it (limit {MAX_LINES})"
