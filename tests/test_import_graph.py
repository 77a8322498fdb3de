"""The import graph of ``jaxdq``, ``pallas_kernels`` and ``converters`` has no cycle, and
``pallas_kernels`` imports nothing from ``jaxdq``.

Read from the source (AST), not by importing: every ``import`` / ``from ... import``
statement counts, including those inside functions, methods and ``if`` blocks (an import
hidden in a function still closes a cycle, it only delays it), and
``importlib.import_module("...")`` / ``__import__("...")`` with a literal name.

Edges: ``import a.b.c`` → module ``a.b.c`` (a package: its ``__init__``);
``from a.b import c`` → ``a.b.c`` where ``c`` is a submodule of package ``a.b``, else
``a.b`` (the package's ``__init__``, which defines ``c``); relative imports are resolved
against the importing module's package.  Only modules of the three packages are nodes
(third-party imports are ignored); a parent package is not an implied target of importing
its submodule (Python runs the parent's ``__init__`` first, but a child importing its
parent by that route is not a cycle that can bite).
"""
from __future__ import annotations

import ast
import collections
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("jaxdq", "pallas_kernels", "converters")


def module_files(root: pathlib.Path, packages) -> dict[str, pathlib.Path]:
    """``{dotted module name: file}`` of every ``.py`` file under ``root/<package>``."""
    out = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            rel = path.relative_to(root).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _package_of(module: str, path: pathlib.Path) -> str:
    """The package a relative import in ``module`` is resolved against."""
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def _resolve_relative(module: str, path: pathlib.Path, level: int, name: str | None) -> str:
    base = _package_of(module, path).split(".")
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def imports_of(module: str, path: pathlib.Path) -> list[tuple[str, int, list[str]]]:
    """``(imported module, line, names)`` for every import statement in the file; for
    ``from X import a, b`` the entry is X with names [a, b]."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append((alias.name, node.lineno, []))
        elif isinstance(node, ast.ImportFrom):
            target = (_resolve_relative(module, path, node.level, node.module) if node.level
                      else node.module)
            found.append((target, node.lineno, [a.name for a in node.names]))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            f = node.func
            fname = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if fname in ("import_module", "__import__"):
                found.append((node.args[0].value, node.lineno, []))
    return found


def import_graph(root: pathlib.Path, packages):
    """``(edges, raw)``: ``edges[a][b]`` = first line of ``a`` importing ``b`` (nodes: the
    packages' modules); ``raw[a]`` = every imported name ``(module, line)`` as written."""
    files = module_files(root, packages)
    edges: dict[str, dict[str, int]] = {m: {} for m in files}
    raw: dict[str, list[tuple[str, int]]] = {m: [] for m in files}
    for mod, path in files.items():
        for target, line, names in imports_of(mod, path):
            raw[mod].append((target, line))
            targets = []
            if names and target in files and files[target].name == "__init__.py":
                for n in names:  # from pkg import name: the submodule pkg.name if there is one
                    sub = f"{target}.{n}"
                    targets.append(sub if sub in files else target)
                    if sub in files:
                        raw[mod].append((sub, line))
            elif target in files:
                targets.append(target)
            for t in targets:
                if t != mod:
                    edges[mod].setdefault(t, line)
    return edges, raw


def strongly_connected(edges) -> list[list[str]]:
    """Tarjan's SCCs with more than one module (or a module importing itself), sorted."""
    index, low, on, stack, out = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
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
            if len(comp) > 1 or v in edges[v]:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(out)


def _shortest_path(edges, src, dst, allowed):
    prev, queue = {src: None}, collections.deque([src])
    while queue:
        v = queue.popleft()
        if v == dst:
            path = []
            while v is not None:
                path.append(v)
                v = prev[v]
            return path[::-1]
        for w in sorted(edges[v]):
            if w in allowed and w not in prev:
                prev[w] = v
                queue.append(w)
    return None


def cycles(edges) -> list[list[str]]:
    """Concrete cycles (first module repeated at the end): for every import edge ``u → v``
    inside a strongly connected component, ``u → v`` and the shortest way back from ``v``
    to ``u``; deduplicated up to rotation.  Every module and every edge of every circle
    appears in at least one of them."""
    found, seen = [], set()
    for comp in strongly_connected(edges):
        allowed = set(comp)
        for u in comp:
            for v in sorted(edges[u]):
                if v not in allowed:
                    continue
                back = _shortest_path(edges, v, u, allowed)
                cyc = [u] + back  # u → v … → u
                ring = cyc[:-1]
                i = ring.index(min(ring))
                key = tuple(ring[i:] + ring[:i])
                if key not in seen:
                    seen.add(key)
                    found.append(list(key) + [key[0]])
    return found


def describe(edges, cyc) -> str:
    """``a:LINE → b:LINE → a``: each module with the line of its import of the next one."""
    return " → ".join(f"{a}:{edges[a][b]}" for a, b in zip(cyc, cyc[1:])) + f" → {cyc[-1]}"


def unresolved_imports(root: pathlib.Path, packages) -> list[str]:
    """Imports of a module of these packages that has no file (stale after a move/removal);
    reported by ``python tests/test_import_graph.py``, not a test failure."""
    files = module_files(root, packages)
    out = []
    for mod, path in files.items():
        for target, line, _ in imports_of(mod, path):
            if target.split(".")[0] in packages and target not in files:
                out.append(f"{mod}:{line} imports {target}, which does not exist")
    return out


def jaxdq_imports_in_pallas_kernels(raw) -> list[str]:
    bad = []
    for mod, imps in sorted(raw.items()):
        if mod.split(".")[0] != "pallas_kernels":
            continue
        for target, line in imps:
            if target == "jaxdq" or target.startswith("jaxdq."):
                bad.append(f"{mod} line {line}: imports {target}")
    return bad


def check(packages) -> list[str]:
    """Every problem found, one line each (empty: clean)."""
    edges, raw = import_graph(ROOT, packages)
    problems = []
    comps = strongly_connected(edges)
    cyc = cycles(edges)
    if comps:
        problems.append(f"{len(comps)} import circle(s) (strongly connected groups of modules), "
                        f"{len(cyc)} distinct cycle(s) through their import edges:")
        for comp in comps:
            problems.append(f"  circle of {len(comp)} modules: {', '.join(comp)}")
            for c in cyc:
                if c[0] in comp:
                    problems.append(f"    {describe(edges, c)}")
    bad = jaxdq_imports_in_pallas_kernels(raw)
    if bad:
        problems.append("pallas_kernels must import nothing from jaxdq:")
        problems += [f"  {b}" for b in bad]
    return problems


def test_no_import_cycles_and_pallas_kernels_is_independent_of_jaxdq():
    problems = check(PACKAGES)
    assert not problems, "\n" + "\n".join(problems)


def test_pallas_kernels_alone_has_no_cycle_and_no_jaxdq_import():
    edges, _ = import_graph(ROOT, ("pallas_kernels",))
    assert "pallas_kernels" in edges and "pallas_kernels.int_gemm" in edges  # the walker found the package
    problems = check(("pallas_kernels",))
    assert not problems, "\n" + "\n".join(problems)


def test_the_walker_sees_hidden_relative_and_submodule_imports(tmp_path):
    """A synthetic package: a cycle closed by an import inside a function, a relative
    ``from . import sub`` (a submodule edge, not the package's), a ``from pkg import name``
    of a non-module (the package's ``__init__``), and a jaxdq import in pallas_kernels."""
    (tmp_path / "pkga").mkdir()
    (tmp_path / "pkga" / "__init__.py").write_text("X = 1\n")
    (tmp_path / "pkga" / "a.py").write_text("from . import b\n")
    (tmp_path / "pkga" / "b.py").write_text("def f():\n    from pkga.c import g\n    return g\n")
    (tmp_path / "pkga" / "c.py").write_text("import pkga.a\nfrom pkga import X\n")
    (tmp_path / "pkga" / "d.py").write_text("import numpy\nfrom pkga import b\n")
    (tmp_path / "pallas_kernels").mkdir()
    (tmp_path / "pallas_kernels" / "__init__.py").write_text("")
    (tmp_path / "pallas_kernels" / "k.py").write_text(
        "import importlib\n\ndef h():\n    return importlib.import_module('jaxdq.quant')\n")
    edges, raw = import_graph(tmp_path, ("pkga", "pallas_kernels"))
    assert edges["pkga.a"] == {"pkga.b": 1} and edges["pkga.b"] == {"pkga.c": 2}
    assert edges["pkga.c"] == {"pkga.a": 1, "pkga": 2} and edges["pkga.d"] == {"pkga.b": 2}
    assert strongly_connected(edges) == [["pkga.a", "pkga.b", "pkga.c"]]
    assert cycles(edges) == [["pkga.a", "pkga.b", "pkga.c", "pkga.a"]]
    assert jaxdq_imports_in_pallas_kernels(raw) == ["pallas_kernels.k line 4: imports jaxdq.quant"]


if __name__ == "__main__":  # python tests/test_import_graph.py: print the report
    for line in check(PACKAGES) or ["no cycle; pallas_kernels imports nothing from jaxdq"]:
        print(line)
    for line in unresolved_imports(ROOT, PACKAGES):
        print("note:", line)
