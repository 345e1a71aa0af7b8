"""The package's layers: the dispatch and the kernels' policy import without Triton and without the repository's
tools, and the modules of swinv2_fast import one another without a cycle (read from the source: module-level
import statements only, so a function-local import does not count, and none is needed to break a cycle)."""

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
# the installed package's folders (pyproject.toml's package-dir)
PACKAGE_DIRS = {"swinv2_fast": ROOT / "swinv2_fast", "swinv2_fast.kernels": ROOT / "kernels"}

_WITHOUT_TRITON = """
import sys
import torch  # torch probes for triton itself; block it for what follows
for name in [m for m in sys.modules if m == 'triton' or m.startswith('triton.')]:
    del sys.modules[name]
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == 'triton' or name.startswith('triton.') or name == 'tools' or name.startswith('tools.'):
            raise ImportError(name + ' blocked for this test')
sys.meta_path.insert(0, Block())
import swinv2_fast
import swinv2_fast.functional
import swinv2_fast.kernels.tiles
loaded = [m for m in sys.modules if m.startswith('swinv2_fast.kernels.triton_') or m == 'swinv2_fast.kernels.op'
          or m == 'tools' or m.startswith('tools.')]
print('loaded:', sorted(loaded))
"""


def test_the_dispatch_and_the_policy_import_without_triton_or_tools():
    """swinv2_fast, its dispatch (functional.py) and the kernels' policy (kernels/tiles.py) import with Triton
    and tools/ blocked, and load none of the Triton files or the custom op (they are imported when first
    launched)."""
    result = subprocess.run([sys.executable, "-P", "-c", _WITHOUT_TRITON], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "loaded: []" in result.stdout, result.stdout


def _module_name(path: pathlib.Path) -> str:
    """The installed name of a source file of the package, subpackages included (swinv2_fast/patch/step.py:
    swinv2_fast.patch.step)."""
    for package, folder in PACKAGE_DIRS.items():
        if path.is_relative_to(folder):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    raise AssertionError(path)


def _top_level_statements(body):
    """Module-level statements, also inside top-level if/try blocks (not inside functions or classes)."""
    for node in body:
        yield node
        if isinstance(node, (ast.If, ast.Try)):
            for block in (
                node.body,
                node.orelse,
                getattr(node, "finalbody", []),
                *[h.body for h in getattr(node, "handlers", [])],
            ):
                yield from _top_level_statements(block)


def import_graph():
    """{module: the swinv2_fast modules it imports at module level}."""
    modules = {_module_name(p): p for folder in PACKAGE_DIRS.values() for p in folder.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.stem == "__init__" else name.rpartition(".")[0]
        edges = set()
        for node in _top_level_statements(ast.parse(path.read_text()).body):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    parent = ".".join(parts[: len(parts) - node.level + 1])
                    base = f"{parent}.{base}" if base else parent
                # `from package import module` imports that module; `from module import name`, the module
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names
                ]
            else:
                continue
            edges.update(t for t in targets if t in modules and t != name)
        graph[name] = edges
    return graph


def find_cycle(graph):
    """A cycle of the graph as a list of modules (the first repeated at the end), or None."""
    state = {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for succ in sorted(graph[node]):
            if state.get(succ) == "open":
                return stack[stack.index(succ) :] + [succ]
            if succ not in state:
                found = visit(succ, stack)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node, [])
            if found:
                return found
    return None


def test_the_package_imports_without_a_cycle():
    graph = import_graph()
    assert "swinv2_fast.kernels.tiles" in graph and "swinv2_fast.functional" in graph, sorted(graph)
    assert "swinv2_fast.kernels.tiles" in graph["swinv2_fast.functional"]
    assert "swinv2_fast.patch.step" in graph["swinv2_fast.patch.timm"]  # subpackages are read too
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
