"""jaxft's modules import one another without a cycle (a cycle works only in an import order that happens to hold)."""
import ast
from pathlib import Path

import jaxft

ROOT = Path(jaxft.__file__).parent


def _graph() -> dict[str, set[str]]:
  """module -> the jaxft modules it imports (anywhere in its body). `from pkg import name` depends on
  pkg.name where that is a module, else on pkg; a submodule's parent packages are implied, not edges."""
  files = {}
  for f in ROOT.rglob("*.py"):
    parts = f.relative_to(ROOT.parent).with_suffix("").parts
    files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
  graph = {}
  for name, f in files.items():
    package = name if f.name == "__init__.py" else name.rpartition(".")[0]
    deps = set()
    for node in ast.walk(ast.parse(f.read_text(), str(f))):
      if isinstance(node, ast.Import):
        deps |= {a.name for a in node.names}
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          up = package.split(".")[: len(package.split(".")) - node.level + 1]
          base = ".".join(up + ([base] if base else []))
        deps |= {f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names}
    graph[name] = {d for d in deps if d in files and d != name}
  return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components of more than one module (Tarjan)."""
  index, low, stack, on, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while not component or component[-1] != v:
        component.append(stack.pop())
        on.discard(component[-1])
      if len(component) > 1:
        out.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_no_import_cycles():
  graph = _graph()
  assert len(graph) > 40 and "jaxft.runs" in graph["jaxft.train"]  # the scan sees the package
  assert _cycles(graph) == []


def test_the_scan_finds_a_cycle():
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
  assert _cycles(graph) == [["a", "b", "c"]]
