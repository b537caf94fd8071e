"""The layers run one way (docs/ARCHITECTURE.md, "Layers and where they live"): the wire
codec knows nothing above it, connections know nothing of branches, the branch engine
knows the wire layer only through the router seam. Every import counts, at module level
or inside a function; only `if TYPE_CHECKING:` blocks (never run) are left out of the
cycle check.

`.venv/bin/python -m tests.unit.test_layers` prints the module graph in layers (each
module above everything it imports), any import cycle, and any import that runs up the
declared layers (LAYERS)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "proxy"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node of a file except those under `if TYPE_CHECKING:`, which never runs."""
    found: list[ast.AST] = []
    todo = [tree]
    while todo:
        node = todo.pop()
        found.append(node)
        if isinstance(node, ast.If) and (
                (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING")
                or (isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING")):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))
    return found


def imports(path: Path, runtime: bool = False) -> set[str]:
    """Every proxy module a file imports, resolved to module names (`runtime`: those that
    run, leaving out `if TYPE_CHECKING:` blocks)."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rsplit(".", 1)[0]
    found: set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    for node in (_runtime_nodes(tree) if runtime else ast.walk(tree)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("proxy"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if target.startswith("proxy"):
                found.add(target)
                # `from proxy.branching import views` imports the module proxy.branching.views.
                found.update(f"{target}.{a.name}" for a in node.names
                             if (PACKAGE.parent / f"{target}.{a.name}".replace(".", "/")
                                 ).with_suffix(".py").exists()
                             or (PACKAGE.parent / f"{target}.{a.name}".replace(".", "/")
                                 ).is_dir())
    return found


GRAPH = {module_name(p): imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def _package(mod: str) -> bool:
    return (PACKAGE.parent / mod.replace(".", "/")).is_dir()


_RUN = {module_name(p): imports(p, runtime=True) for p in sorted(PACKAGE.rglob("*.py"))}
# The modules each module runs an import of. A package whose `__init__` imports nothing
# (most of them) is left out, as a target too: no cycle can run through it. One that
# re-exports its modules (`proxy.branching.history`) counts like any module.
RUNTIME = {mod: {d for d in deps if d in GRAPH and d != mod
                 and (not _package(d) or _RUN.get(d))}
           for mod, deps in _RUN.items()
           if deps or not _package(mod)}


def components(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components (Tarjan), dependencies before their importers."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(mod: str) -> None:
        index[mod] = low[mod] = len(index)
        stack.append(mod)
        on_stack.add(mod)
        for dep in sorted(graph[mod]):
            if dep not in index:
                visit(dep)
                low[mod] = min(low[mod], low[dep])
            elif dep in on_stack:
                low[mod] = min(low[mod], index[dep])
        if low[mod] == index[mod]:
            group = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                group.append(top)
                if top == mod:
                    break
            found.append(sorted(group))

    for mod in sorted(graph):
        if mod not in index:
            visit(mod)
    return found


def cycle_in(group: list[str], graph: dict[str, set[str]]) -> list[str]:
    """One shortest import cycle through the first module of a component, to print."""
    start = group[0]
    paths = {start: [start]}
    todo = [start]
    while todo:
        mod = todo.pop(0)
        for dep in sorted(graph[mod] & set(group)):
            if dep == start:
                return paths[mod] + [start]
            if dep not in paths:
                paths[dep] = paths[mod] + [dep]
                todo.append(dep)
    return [start]


def cycles(graph: dict[str, set[str]]) -> list[str]:
    return [f"{len(g)} modules: " + " -> ".join(cycle_in(g, graph)) + "\n    all: " + ", ".join(g)
            for g in components(graph) if len(g) > 1]


def layers(graph: dict[str, set[str]]) -> list[list[str]]:
    """The graph in layers: layer 0 imports no proxy module, each module sits one above
    the highest it imports; a cycle's modules share one layer (shown as `{a b}`)."""
    level: dict[str, int] = {}
    rows: dict[int, list[str]] = {}
    for group in components(graph):
        deps = {d for m in group for d in graph[m]} - set(group)
        here = max((level[d] + 1 for d in deps), default=0)
        level.update((m, here) for m in group)
        rows.setdefault(here, []).append(group[0] if len(group) == 1
                                         else "{" + " ".join(group) + "}")
    return [sorted(rows[i]) for i in sorted(rows)]


def report(graph: dict[str, set[str]]) -> str:
    lines = [f"layer {i}: " + "  ".join(m.removeprefix("proxy.") for m in row)
             for i, row in enumerate(layers(graph))]
    found = cycles(graph)
    lines.append(f"import cycles: {len(found)}")
    lines.extend("  " + c for c in found)
    return "\n".join(lines)


def test_no_import_cycle() -> None:
    """An import cycle makes a module unreadable and untestable without the modules
    above it; a function-level import only hides one, so it counts the same."""
    found = cycles(RUNTIME)
    assert found == [], "import cycles in proxy/:\n" + "\n".join(found)


def test_the_cycle_check_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == ["3 modules: a -> b -> c -> a\n    all: a, b, c"]
    assert layers(graph) == [["{a b c}"], ["d"]]


def test_the_graph_sees_the_package() -> None:
    assert "proxy.branching.engine" in GRAPH and "proxy.wire.opmsg" in GRAPH
    assert "proxy.branching.planner" in GRAPH["proxy.branching.commands.read"]


def _branching(*names: str) -> tuple[str, ...]:
    return tuple(f"proxy.branching.{name}" for name in names)


# The layers, lowest first (docs/ARCHITECTURE.md, "Layers and where they live"): a module
# imports modules of its own layer and of the layers below, never of one above. A name
# stands for that module and everything under it; the longest name that matches wins.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("process", ("proxy.config", "proxy.logs", "proxy.metrics", "proxy.embedded")),
    ("wire", ("proxy.wire",)),
    ("upstream", ("proxy.upstream",)),
    ("net", ("proxy.net",)),
    ("leaves", _branching("bsonorder", "idkey", "naming", "errors", "locks", "audit",
                          "stages", "failpoints", "batching")),
    # The engine runs the capture, the snapshot fences and the lifecycle sweeps itself.
    ("engine", _branching("engine", "model", "wal", "runner", "overlay", "catalog", "views",
                          "planner", "cursormerge", "viewscan", "unique", "authz", "snapshot",
                          "capture", "lifecycle", "txn", "masking", "voids", "catalogundo")),
    ("operations", _branching("history", "copymode", "gc", "sizes", "lineage", "requests",
                              "operations")),
    ("handlers", _branching("commands")),
    ("router", _branching("router")),
    ("front doors", ("proxy.admin", "proxy.cli", "proxy.app", "proxy.mcpserver",
                     "proxy.cluster", "proxy.workers", "proxy.workerlink")),
]


def layer_of(mod: str, layers: list[tuple[str, tuple[str, ...]]] = LAYERS,
             ) -> tuple[int, str] | None:
    """(rank, name) of the layer a module belongs to; None if no layer names it."""
    best: tuple[int, int, str] | None = None
    for rank, (name, prefixes) in enumerate(layers):
        for prefix in prefixes:
            if (mod == prefix or mod.startswith(prefix + ".")) and \
                    (best is None or len(prefix) > best[0]):
                best = (len(prefix), rank, name)
    return None if best is None else (best[1], best[2])


def _namespace(mod: str) -> bool:
    """A package whose `__init__` imports nothing: a name, not code (`proxy.branching`)."""
    return _package(mod) and not _RUN.get(mod) and not GRAPH.get(mod)


def upward(graph: dict[str, set[str]],
           layers: list[tuple[str, tuple[str, ...]]] = LAYERS) -> list[str]:
    """Every import of a module of a higher layer, as `importer (layer) -> imported (layer)`."""
    found = []
    for mod, deps in sorted(graph.items()):
        here = layer_of(mod, layers)
        for dep in sorted(deps):
            there = None if _namespace(dep) else layer_of(dep, layers)
            if here is not None and there is not None and there[0] > here[0]:
                found.append(f"{mod} ({here[1]}) -> {dep} ({there[1]})")
    return found


def test_no_module_imports_a_higher_layer() -> None:
    """Every import counts here, `if TYPE_CHECKING:` ones too: a type from a layer above
    is knowledge of it all the same."""
    found = upward(GRAPH)
    assert found == [], "imports that run up the layers:\n  " + "\n  ".join(found)


def test_every_module_has_a_layer() -> None:
    """A new module is placed in LAYERS, or the order check would not see it."""
    unplaced = sorted(mod for mod in GRAPH
                      if mod != "proxy" and not _namespace(mod) and layer_of(mod) is None)
    assert unplaced == [], "modules in no layer of LAYERS: " + ", ".join(unplaced)


def test_the_order_check_finds_an_upward_import() -> None:
    layers = [("low", ("a",)), ("mid", ("b",)), ("high", ("b.c", "d"))]
    graph = {"a": {"b"}, "b": {"a", "b.c"}, "b.c": {"b"}, "b.x": {"a"}, "d": {"b.c", "a"}}
    assert upward(graph, layers) == ["a (low) -> b (mid)", "b (mid) -> b.c (high)"]


# Narrower than the order: what a layer may reach below it at all. The engine knows the
# connections only through the router seam; the wire codec knows nothing but itself.
RULES = [
    ("proxy.wire", ("proxy.wire",)),
    ("proxy.net", ("proxy.net", "proxy.wire", "proxy.upstream", "proxy.metrics")),
    ("proxy.branching", ("proxy.branching", "proxy.wire", "proxy.net.router", "proxy.config")),
    ("proxy.admin", ("proxy.admin", "proxy.branching", "proxy.config", "proxy.metrics",
                     "proxy.wire")),
]


@pytest.mark.parametrize(("layer", "allowed"), RULES, ids=[r[0] for r in RULES])
def test_layer_imports_only_what_is_below_it(layer: str, allowed: tuple[str, ...]) -> None:
    wrong = sorted(f"{mod} -> {dep}" for mod, deps in GRAPH.items()
                   if mod == layer or mod.startswith(layer + ".")
                   for dep in deps
                   if dep != "proxy" and not any(dep == a or dep.startswith(a + ".")
                                                 for a in allowed))
    assert wrong == []


if __name__ == "__main__":
    print(report(RUNTIME))
    found = upward(GRAPH)
    print(f"imports that run up the layers: {len(found)}")
    print("".join(f"  {line}\n" for line in found), end="")
