"""The package's import structure (docs/internals.md): no import cycles between modules, nothing private
imported across modules, and the model classes (`sae_dist.sae`) import nothing of processes or optimizers
(`sae_dist.parallel`, `sae_dist.train`).

The graph is read from the source with `ast`, independently of Python's import machinery: an edge A -> B for
every `import B` / `from B import x` / `from . import x` that runs when A is imported (module level, not
inside a function body, not under `if TYPE_CHECKING:`).
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# kernels/ is installed as sae_dist.kernels (pyproject's package-dir).
SOURCES = {"sae_dist": ROOT / "sae_dist", "sae_dist.kernels": ROOT / "kernels"}


def _modules():
    """{dotted module name: (path, is_package)} for every .py file of the package."""
    out = {}
    for prefix, base in SOURCES.items():
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base).with_suffix("").parts
            if prefix == "sae_dist" and rel[:1] == ("kernels",):
                continue  # the symlink to kernels/, listed under its own prefix
            is_pkg = rel[-1] == "__init__"
            parts = rel[:-1] if is_pkg else rel
            out[".".join((prefix, *parts)).rstrip(".")] = (path, is_pkg)
    return out


MODULES = _modules()


def _resolve(name, level, module, is_pkg):
    if level == 0:
        return name
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _eager_imports(tree):
    """Import nodes that run at import time: skip function bodies and `if TYPE_CHECKING:` blocks."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _edges(eager_only):
    """[(importer, imported module, imported names)] within the package."""
    edges = []
    for module, (path, is_pkg) in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        every = (n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)))
        nodes = _eager_imports(tree) if eager_only else every
        for node in nodes:
            if isinstance(node, ast.Import):
                edges += [(module, a.name, ()) for a in node.names if a.name in MODULES]
                continue
            target = _resolve(node.module or "", node.level, module, is_pkg)
            names = tuple(a.name for a in node.names)
            if target in MODULES:
                edges.append((module, target, names))
            # `from pkg import submodule` imports the submodule too
            edges += [(module, f"{target}.{n}", ()) for n in names if f"{target}.{n}" in MODULES]
    return edges


def _find_cycle(graph):
    """One cycle of the directed graph as a list of nodes, or None (iterative depth-first search)."""
    state = {}
    for start in graph:
        if start in state:
            continue
        path, stack = [], [(start, iter(sorted(graph[start])))]
        state[start] = "open"
        path.append(start)
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = "done"
                stack.pop()
                path.pop()
            elif state.get(child) == "open":
                return path[path.index(child):] + [child]
            elif child not in state:
                state[child] = "open"
                path.append(child)
                stack.append((child, iter(sorted(graph.get(child, ())))))
    return None


def test_the_package_has_modules_to_check():
    assert {"sae_dist.sae.base", "sae_dist.train.trainer", "sae_dist.kernels.encoder_topk"} <= set(MODULES)


def test_no_import_cycle_between_modules():
    graph = {m: set() for m in MODULES}
    for importer, imported, _ in _edges(eager_only=True):
        # a package's __init__ importing its own submodules is how packages export names, not a cycle
        if importer != imported and not imported.startswith(importer + "."):
            graph[importer].add(imported)
    assert _find_cycle(graph) is None, f"import cycle: {' -> '.join(_find_cycle(graph))}"


def test_the_cycle_finder_sees_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_nothing_private_is_imported_across_modules():
    private = [
        f"{importer} imports {name} from {imported}"
        for importer, imported, names in _edges(eager_only=False)
        for name in names
        if name.startswith("_") and not name.startswith("__") and imported != importer
    ]
    assert private == []


@pytest.mark.parametrize("layer", ["sae_dist.parallel", "sae_dist.train"])
def test_model_classes_import_nothing_of_processes_or_optimizers(layer):
    offending = sorted(
        f"{importer} -> {imported}"
        for importer, imported, _ in _edges(eager_only=False)
        if importer.startswith("sae_dist.sae") and (imported == layer or imported.startswith(layer + "."))
    )
    assert offending == []
