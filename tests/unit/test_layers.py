"""The package's layers, read from its source with ``ast`` (nothing is imported).

Layers point one way: commands -> library -> core. Checked here:

- only the command layer (``mt_flax/cli.py``, ``mt_flax/commands/``,
  ``mt_flax/__main__.py``) imports ``mt_flax.cli`` or ``mt_flax.commands``;
- the package's own imports form no cycle;
- no module changes a malloc setting (``mallopt``, ``malloc_trim``,
  ``MALLOC_*`` / ``GLIBC_TUNABLES`` variables, loading an allocator with
  ctypes): importing mt_flax leaves the allocator as the process found it.

Every import counts: at module level and inside functions, ``import x``,
``from x import y`` (``x.y`` when ``y`` is a submodule, else ``x``), relative
imports, and ``importlib.import_module("...")`` with a literal name.

A submodule is not counted as importing its parent packages: Python runs
``mt_flax/data/__init__.py`` before any ``mt_flax.data.*`` module, whichever
is imported first, so that order is the language's, not a dependency the
submodule chose; counting it would make every ``__init__`` that re-exports
its submodules a cycle. A submodule that imports a *name* from its parent
(``from mt_flax.data import load_pairs`` inside ``mt_flax/data``) does depend
on the ``__init__`` and is counted.
"""
from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = "mt_flax"
ROOT = pathlib.Path(__file__).resolve().parents[1]
COMMAND_LAYER = ("mt_flax.cli", "mt_flax.commands", "mt_flax.__main__")
MALLOC_CALLS = {"mallopt", "malloc_trim"}
LIBRARY_LOADERS = {"CDLL", "PyDLL", "LoadLibrary", "dlopen"}


def package_modules(root: pathlib.Path = ROOT) -> dict[str, pathlib.Path]:
  """Dotted module name -> source file, for every ``.py`` of the package."""
  out = {}
  for path in sorted((root / PACKAGE).rglob("*.py")):
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts.pop()
    out[".".join(parts)] = path
  return out


def _known(name: str, modules: dict) -> str | None:
  """``name`` or its longest prefix that is a module of the package; None outside it."""
  while name and name not in modules:
    name = name.rpartition(".")[0]
  return name or None


def _from_base(module: str, is_package: bool, node: ast.ImportFrom) -> str:
  if not node.level:
    return node.module or ""
  parts = module.split(".") if is_package else module.split(".")[:-1]
  parts = parts[:len(parts) - node.level + 1]
  return ".".join(parts + ([node.module] if node.module else []))


def _literal_import(node: ast.AST) -> str | None:
  """The name in ``importlib.import_module("x")`` / ``__import__("x")``, else None."""
  if not isinstance(node, ast.Call) or not node.args:
    return None
  func = node.func
  name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
  arg = node.args[0]
  if name in ("import_module", "__import__") and isinstance(arg, ast.Constant) \
      and isinstance(arg.value, str):
    return arg.value
  return None


def imports_of(module: str, tree: ast.AST, modules: dict) -> set[str]:
  """The package's modules that ``module`` imports (see the module docstring)."""
  is_package = modules[module].name == "__init__.py"
  names = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names += [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = _from_base(module, is_package, node)
      names += [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    elif _literal_import(node):
      names.append(_literal_import(node))
  found = {_known(name, modules) for name in names if name.split(".")[0] == PACKAGE}
  return found - {None, module}


def import_graph(root: pathlib.Path = ROOT) -> dict[str, set[str]]:
  modules = package_modules(root)
  return {m: imports_of(m, ast.parse(p.read_text(), str(p)), modules) for m, p in modules.items()}


def _in_command_layer(module: str) -> bool:
  return any(module == top or module.startswith(top + ".") for top in COMMAND_LAYER)


def command_layer_violations(graph: dict[str, set[str]]) -> list[str]:
  """``"a imports b"`` for every module outside the command layer that imports into it."""
  return [f"{m} imports {target}" for m in sorted(graph) if not _in_command_layer(m)
          for target in sorted(graph[m]) if _in_command_layer(target)]


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
  """Tarjan's algorithm, iterative; components of one module without a self-import are left out."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []
  for start in sorted(graph):
    if start in index:
      continue
    work = [(start, iter(sorted(graph[start])))]
    index[start] = low[start] = len(index)
    stack.append(start)
    on_stack.add(start)
    while work:
      node, children = work[-1]
      child = next(children, None)
      if child is not None:
        if child not in index:
          index[child] = low[child] = len(index)
          stack.append(child)
          on_stack.add(child)
          work.append((child, iter(sorted(graph[child]))))
        elif child in on_stack:
          low[node] = min(low[node], index[child])
        continue
      work.pop()
      if work:
        low[work[-1][0]] = min(low[work[-1][0]], low[node])
      if low[node] == index[node]:
        component = []
        while True:
          member = stack.pop()
          on_stack.discard(member)
          component.append(member)
          if member == node:
            break
        if len(component) > 1 or node in graph[node]:
          out.append(sorted(component))
  return out


def _cycle_in(component: list[str], graph: dict[str, set[str]]) -> list[str]:
  """One concrete cycle through the component's first module: ``[a, b, ..., a]``."""
  start, members = component[0], set(component)
  paths = {start: [start]}
  frontier = [start]
  while frontier:
    next_frontier = []
    for node in frontier:
      for child in sorted(graph[node] & members):
        if child == start:
          return paths[node] + [start]
        if child not in paths:
          paths[child] = paths[node] + [child]
          next_frontier.append(child)
    frontier = next_frontier
  return component


def import_cycles(graph: dict[str, set[str]]) -> list[str]:
  """``"a -> b -> a"`` for one cycle of each group of modules that import each other, with
  the group's other modules in brackets."""
  out = []
  for component in _strongly_connected(graph):
    cycle = _cycle_in(component, graph)
    rest = [m for m in component if m not in cycle]
    out.append(" -> ".join(cycle) + (f" (with {', '.join(rest)})" if rest else ""))
  return out


def _touches_malloc(node: ast.AST) -> str | None:
  """What in ``node`` changes a malloc setting, in words, or None."""
  if isinstance(node, ast.Attribute) and node.attr in MALLOC_CALLS:
    return f"uses {node.attr}"
  if isinstance(node, ast.Name) and node.id in MALLOC_CALLS:
    return f"uses {node.id}"
  if isinstance(node, ast.Constant) and isinstance(node.value, str):
    text = node.value
    if text in MALLOC_CALLS or text.startswith("MALLOC_") or text == "GLIBC_TUNABLES":
      return f"names {text!r}"
  if isinstance(node, ast.Call) and node.args:
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    arg = node.args[0]
    if name in LIBRARY_LOADERS and isinstance(arg, ast.Constant) and "malloc" in str(arg.value):
      return f"loads {arg.value!r} with {name}"
  return None


def malloc_settings(root: pathlib.Path = ROOT) -> list[str]:
  """``"module (line N): what"`` for every place a module touches malloc settings."""
  found = set()
  for module, path in package_modules(root).items():
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      what = _touches_malloc(node)
      if what:
        found.add((module, node.lineno, what))
  return [f"{module} (line {line}): {what}" for module, line, what in sorted(found)]


# ----------------------------------------------------------------------------- the rules


def test_only_the_command_layer_imports_cli_and_commands():
  bad = command_layer_violations(import_graph())
  assert not bad, ("only mt_flax/cli.py, mt_flax/commands/ and mt_flax/__main__.py may import "
                   "mt_flax.cli or mt_flax.commands: " + "; ".join(bad))


def test_the_package_imports_form_no_cycle():
  cycles = import_cycles(import_graph())
  assert not cycles, "import cycle(s) in the package: " + "; ".join(cycles)


def test_no_module_changes_malloc_settings():
  found = malloc_settings()
  assert not found, "importing mt_flax must change no malloc setting: " + "; ".join(found)


# ----------------------------------------------------------------------------- the checker itself


def write_package(root: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
  for name, text in files.items():
    path = root / PACKAGE / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
  return root


@pytest.fixture
def toy(tmp_path):
  """A small package of the same name: a command, a library, a subpackage."""
  return write_package(tmp_path, {
      "__init__.py": "", "cli.py": "", "__main__.py": "import importlib\n",
      "commands/__init__.py": "", "commands/go.py": "from mt_flax import cli, lib\n",
      "lib.py": "from mt_flax.data import a\n",
      "data/__init__.py": "from mt_flax.data.a import f\n",
      "data/a.py": "def f():\n  from . import b\n", "data/b.py": "from .. import errors\n",
      "errors.py": ""})


def test_imports_are_resolved_at_every_level(toy):
  graph = import_graph(toy)
  assert graph["mt_flax.commands.go"] == {"mt_flax.cli", "mt_flax.lib"}
  assert graph["mt_flax.lib"] == {"mt_flax.data.a"}
  assert graph["mt_flax.data.a"] == {"mt_flax.data.b"}        # inside a function, relative
  assert graph["mt_flax.data.b"] == {"mt_flax.errors"}         # two levels up
  assert graph["mt_flax.data"] == {"mt_flax.data.a"}
  assert not command_layer_violations(graph) and not import_cycles(graph)


def test_a_library_module_importing_the_command_layer_is_named(toy):
  write_package(toy, {"lib.py": "def run():\n  from mt_flax.commands import go\n",
                      "errors.py": "import importlib\nimportlib.import_module('mt_flax.cli')\n"})
  assert command_layer_violations(import_graph(toy)) == [
      "mt_flax.errors imports mt_flax.cli", "mt_flax.lib imports mt_flax.commands.go"]


def test_a_cycle_is_named_with_its_modules(toy):
  write_package(toy, {"errors.py": "from mt_flax.data import f\n"})   # a name of the __init__
  assert import_cycles(import_graph(toy)) == [
      "mt_flax.data -> mt_flax.data.a -> mt_flax.data.b -> mt_flax.errors -> mt_flax.data"]


def test_malloc_settings_are_found(toy):
  write_package(toy, {"lib.py": "import ctypes\nctypes.CDLL('libc.so.6').mallopt(-8, 1)\n",
                      "errors.py": "import os\nos.environ['MALLOC_ARENA_MAX'] = '2'\n"})
  assert malloc_settings(toy) == ["mt_flax.errors (line 2): names 'MALLOC_ARENA_MAX'",
                                  "mt_flax.lib (line 2): uses mallopt"]
