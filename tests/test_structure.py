"""The package's shape holds: imports run one way (no circle, lazy imports included), no module reads
a private name another module defines, and no class or function outgrows a room one can live in."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "vmapclan"
FILES = {p: ast.parse(p.read_text(), str(p)) for p in ROOT.rglob("*.py") if "bench" not in p.parts}
SHIMS = {"specs", "fused", "nn", "board"}  # the old names of renamed modules: they only import the new one


def module(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: pathlib.Path, tree: ast.AST) -> set[str]:
    here, found = module(path), set()
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.startswith("vmapclan"):
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("vmapclan"))
    return found


MODULES = {module(p): p for p in FILES}


def test_imports_run_one_way():
    graph = {m: {d for d in imports(p, FILES[p]) if d in MODULES and d not in (m, "vmapclan")}
             for m, p in MODULES.items() if m != "vmapclan" and m.rpartition(".")[2] not in SHIMS}
    seen, done = [], set()

    def visit(m):
        if m in done:
            return
        if m in seen:
            pytest.fail(f"an import circle: {' -> '.join(seen[seen.index(m):] + [m])}")
        seen.append(m)
        for d in graph.get(m, ()):
            visit(d)
        seen.pop()
        done.add(m)

    for m in graph:
        visit(m)


def private_names(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def test_no_module_reads_another_modules_private_names():
    defined = {p: private_names(t) for p, t in FILES.items()}
    reads = []
    for path, tree in FILES.items():
        elsewhere = set().union(*(names for p, names in defined.items() if p != path)) - defined[path]
        reads += [f"{module(path)}:{n.lineno} .{n.attr}" for n in ast.walk(tree)
                  if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Load) and n.attr in elsewhere]
    assert not reads, reads


@pytest.mark.parametrize("kind, limit", [(ast.ClassDef, 550), (ast.FunctionDef, 80)])
def test_rooms_stay_small(kind, limit):
    big = [f"{module(p)}.{n.name}: {n.end_lineno - n.lineno + 1} lines" for p, t in FILES.items()
           for n in ast.walk(t) if isinstance(n, kind) and n.end_lineno - n.lineno + 1 > limit]
    assert not big, big
