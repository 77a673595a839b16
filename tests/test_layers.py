"""The package's layers point only down (README, "Layout"): an import graph drawn from the source.

Every import statement counts, function-level ones too (a deferred import is still a dependency a
reader has to follow), and TYPE_CHECKING ones (a circle made for a type hint is still a circle).
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Layer of each module, by longest matching prefix. A module may import its own layer or lower ones.
LAYERS = {
    "safegen.errors": 0, "safegen.config": 0,
    "safegen.models": 1, "safegen.engine": 1,
    "safegen.sampling": 2,
    "safegen.refine": 3,
    "safegen.policy": 4,
    "safegen.generator": 5, "safegen.keywords": 5,
    "safegen": 6,  # the entry points: cli, the batch command's modules, serve/, the lazy package root
    "safegen.research": 7,  # benchmarks only
}
RESEARCH = "safegen.research"


def modules(root: Path = ROOT) -> dict[str, Path]:
    found = {}
    for path in sorted((root / "safegen").rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def import_graph(root: Path = ROOT, extra: tuple[Path, ...] = ()) -> dict[str, set[str]]:
    """module -> the safegen modules it imports (a name imported from a package that is itself a
    module counts as that module, not the package)."""
    known = modules(root)
    sources = dict(known)
    for path in extra:
        sources[str(path)] = path
    graph: dict[str, set[str]] = {}
    for name, path in sources.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name in known)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                subs = {f"{module}.{a.name}" for a in node.names} & set(known)
                if subs:
                    targets |= subs
                if module in known and len(subs) < len(node.names):
                    targets.add(module)
        graph[name] = targets - {name}
    return graph


def layer(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[best]


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def floors(graph: dict[str, set[str]]) -> int:
    """The longest chain of imports (the graph's depth), for the report; needs no circle."""
    memo: dict[str, int] = {}

    def depth(v: str) -> int:
        if v not in memo:
            memo[v] = 1 + max((depth(w) for w in graph[v]), default=0)
        return memo[v]

    return max(depth(v) for v in graph)


def test_no_import_circle():
    assert circles(import_graph()) == []


def test_imports_point_only_down():
    graph = import_graph()
    upward = sorted((m, t) for m, ts in graph.items() for t in ts
                    if layer(t) > layer(m) and not m.startswith(RESEARCH))
    assert upward == []


def test_only_research_and_benchmarks_import_research():
    extra = tuple(sorted((ROOT / "tests").glob("*.py")))
    graph = import_graph(extra=extra)
    users = sorted(m for m, ts in graph.items() if not m.startswith(RESEARCH)
                   and any(t.startswith(RESEARCH) for t in ts))
    # tests may exercise the research code; nothing in the package may
    assert [u for u in users if u.startswith("safegen")] == []


def test_every_module_has_a_layer():
    assert all(isinstance(layer(m), int) for m in modules())


def test_the_package_and_its_parser_load_no_torch():
    code = ("import sys, safegen, safegen.cli; safegen.cli.build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_the_checker_sees_a_circle_and_an_upward_import(tmp_path):
    """The graph code itself: a planted circle and a planted upward import are found."""
    pkg = tmp_path / "safegen"
    (pkg / "models").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "errors.py").write_text("")
    (pkg / "models" / "__init__.py").write_text("")
    (pkg / "models" / "a.py").write_text("def f():\n    from . import b\n")
    (pkg / "models" / "b.py").write_text("from .a import f\nfrom ..generator import g\n")
    (pkg / "generator.py").write_text("")
    graph = import_graph(tmp_path)
    assert circles(graph) == [["safegen.models.a", "safegen.models.b"]]
    assert [(m, t) for m, ts in graph.items() for t in ts if layer(t) > layer(m)] == [
        ("safegen.models.b", "safegen.generator")]
