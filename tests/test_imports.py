"""The module graph of jembed stays a set of layers: no import cycle, no private name used across
modules. Computed statically (ast), top-level AND function-local imports alike, so a cycle cannot
hide behind an import inside a function. The layers are listed in jembed/__init__.py ("Code map").

Function-local imports are allowed (optional heavy dependencies such as fastapi or torch stay local,
and so may a lazy import of a jembed module), but never to close a cycle.
"""
from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "jembed"

PENDING_PRIVATE: set[tuple[str, str]] = set()
PENDING_CYCLES: list[set[str]] = []


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for path in sorted(PACKAGE.rglob("*.py")):
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    out[name.removesuffix(".__init__")] = path
  return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
  """The jembed module `name` lives in (a package's attribute resolves to the package)."""
  while name and name not in MODULES:
    name = name.rpartition(".")[0]
  return name or None


def _imports(module: str, path: pathlib.Path):
  """(target module, imported name or None, local alias, line) of every jembed import in `module`."""
  package = module if path.name == "__init__.py" else module.rpartition(".")[0]
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      for a in node.names:
        if a.name.split(".")[0] == "jembed":
          yield a.name, None, a.asname or a.name, node.lineno
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(parts + ([base] if base else []))
      if base.split(".")[0] != "jembed":
        continue
      for a in node.names:
        yield base, a.name, a.asname or a.name, node.lineno


def _graph():
  edges: dict[str, set[str]] = {m: set() for m in MODULES}
  private: list[tuple[str, str, int]] = []
  for module, path in MODULES.items():
    aliases = {}  # local name -> the jembed module it is bound to
    for base, name, alias, line in _imports(module, path):
      full = f"{base}.{name}" if name and f"{base}.{name}" in MODULES else base
      target = _resolve(full)
      if target and target != module:
        edges[module].add(target)
      if name and name.startswith("_") and not name.startswith("__") and _resolve(base) != module:
        private.append((module, f"{base}.{name}", line))
      if name is None:  # `import jembed.x as y` binds y; `import jembed.x` binds jembed
        aliases.update({alias: base} if alias != base else {"jembed": "jembed"})
      elif full in MODULES:
        aliases[alias] = full
    for node in ast.walk(ast.parse(path.read_text())):
      if not (isinstance(node, ast.Attribute) and node.attr.startswith("_")
              and not node.attr.startswith("__")):
        continue
      chain, value = [], node.value
      while isinstance(value, ast.Attribute):
        chain.append(value.attr)
        value = value.value
      if isinstance(value, ast.Name) and value.id in aliases:
        owner = ".".join([aliases[value.id]] + chain[::-1])
        if owner in MODULES and owner != module:
          private.append((module, f"{owner}.{node.attr}", node.lineno))
  return edges, private


def _cycles(edges: dict[str, set[str]]) -> list[set[str]]:
  """The strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in sorted(edges[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = set()
      while True:
        w = stack.pop()
        on.discard(w)
        comp.add(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(comp)

  for v in sorted(edges):
    if v not in index:
      visit(v)
  return out


EDGES, PRIVATE = _graph()


def test_the_graph_is_seen():
  # The checks below would pass vacuously on a broken parser: the loop's own imports must show.
  assert {"jembed.state", "jembed.reliability", "jembed.modelspec"} <= EDGES["jembed.train"]
  assert "jembed.peft.export" in EDGES["jembed.peft.lora"]   # a function-local import counts too
  assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


def test_no_import_cycles():
  cycles = [c for c in _cycles(EDGES) if c not in PENDING_CYCLES]
  lines = []
  for c in cycles:
    lines.append(" <-> ".join(sorted(c)) + ": " + "; ".join(
        f"{a} -> {b}" for a in sorted(c) for b in sorted(EDGES[a] & c)))
  assert not cycles, "import cycles (move the shared part one layer down):\n" + "\n".join(lines)


def test_no_private_names_across_modules():
  used = sorted({(m, name, line) for m, name, line in PRIVATE if (m, name) not in PENDING_PRIVATE})
  assert not used, "private names used from another module (make them public or move them):\n" + \
      "\n".join(f"{m}:{line} uses {name}" for m, name, line in used)
