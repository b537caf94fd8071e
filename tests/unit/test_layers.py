"""The layers run one way (docs/ARCHITECTURE.md, "Layers and where they live"): the wire
codec knows nothing above it, connections know nothing of branches, the branch engine
knows the wire layer only through the router seam. Every import counts, at module level
or inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "proxy"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every proxy module a file imports, resolved to module names."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
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


def test_the_graph_sees_the_package() -> None:
    assert "proxy.branching.engine" in GRAPH and "proxy.wire.opmsg" in GRAPH
    assert "proxy.branching.views" in GRAPH["proxy.branching.commands.aggregate"] or \
        "proxy.branching.views" in GRAPH["proxy.branching.commands.read"]


# (layer, what it may import from proxy) — anything else in proxy is refused.
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
