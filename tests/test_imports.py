"""Architecture guard: no import circle among raydebias modules, counting imports inside functions (a lazy import
that dodges a circle is still one) and the package ``__init__`` modules every import runs; ``if TYPE_CHECKING:``
imports aside. And the core imports no method."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "raydebias"


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = p.relative_to(PKG.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text())
    skip = set()
    for node in ast.walk(tree):  # `if TYPE_CHECKING:` blocks
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    deps = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                deps.add(t)
    return deps


def _graph() -> dict[str, set[str]]:
    """Module → the modules importing it runs: those it names, and (as Python does) every package ``__init__`` on
    the way to each of them (``import a.b.c`` runs ``a/__init__`` and ``a/b/__init__`` first)."""
    mods = _modules()
    known = set(mods)
    graph = {}
    for m, p in mods.items():
        deps = _imports(p, m, known)
        parents = {".".join(d.split(".")[:i]) for d in deps for i in range(1, d.count(".") + 1)}
        graph[m] = deps | {q for q in parents if q in known and q != m and not m.startswith(q + ".")}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            strong(v)
    return out


def test_no_import_circle_in_the_package():
    assert _cycles(_graph()) == []


def test_the_scan_finds_a_circle_when_there_is_one():
    g = _graph()
    g["raydebias.config"] = g["raydebias.config"] | {"raydebias.pipeline"}  # pipeline → … → config → pipeline
    assert any("raydebias.config" in c and "raydebias.pipeline" in c for c in _cycles(g))


def test_a_circle_through_a_package_init_counts():
    g = _graph()
    # config imports core.registry, which runs core/__init__ (→ core.context) first: a lazy import of config in
    # core.context would close a circle that names no module of the circle directly
    assert "raydebias.core" in g["raydebias.config"]
    g["raydebias.core.context"] = g["raydebias.core.context"] | {"raydebias.config"}
    assert any({"raydebias.config", "raydebias.core"} <= set(c) for c in _cycles(g))


def test_core_imports_no_method_or_stage():
    g = _graph()
    for m, deps in g.items():
        if m.startswith("raydebias.core"):
            assert all(d.startswith(("raydebias.core", "raydebias.config", "raydebias._internal")) for d in deps), (m, deps)
