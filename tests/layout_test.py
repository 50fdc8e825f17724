"""The project's import graph: no cycles, imports flow one way, and nothing
shipped is reachable only from tests.

Static (from `ast`), so it sees every import, also those inside functions, and
the kernel modules the backends load by name (`backend.load('pkg.mod_{}', ...)`).
"""

import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ('t5x_like', 'models', 'partitioning', 'pallas_kernels')
BACKENDS = ('gpu', 'tpu')
# Who may import whom (STYLE.md): t5x_like -> models -> {partitioning, pallas_kernels}.
ALLOWED = {'t5x_like': set(PACKAGES), 'models': {'models', 'partitioning', 'pallas_kernels'},
           'partitioning': {'partitioning'}, 'pallas_kernels': {'pallas_kernels'}}


def _modules():
  out = {}
  for pkg in PACKAGES:
    for folder, dirs, files in os.walk(os.path.join(ROOT, pkg)):
      dirs[:] = sorted(d for d in dirs if d != '__pycache__')
      for f in sorted(files):
        if f.endswith('.py'):
          parts = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].split(os.sep)
          out['.'.join(parts[:-1] if parts[-1] == '__init__' else parts)] = os.path.join(folder, f)
  return out


MODULES = _modules()


def _imports(path, own_name=None):
  """The project modules a file imports (a submodule, not its package's __init__)."""
  tree = ast.parse(open(path).read(), path)
  is_pkg = path.endswith('__init__.py')
  found = set()

  def add(name):
    while name and name not in MODULES:
      name = name.rpartition('.')[0]
    if name and name != own_name:
      found.add(name)
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        add(a.name)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        pkg = own_name.split('.') if is_pkg else own_name.split('.')[:-1]
        pkg = pkg[:len(pkg) - node.level + 1]
        base = '.'.join(pkg + ([base] if base else []))
      for a in node.names:
        add(f'{base}.{a.name}' if f'{base}.{a.name}' in MODULES else base)
    elif isinstance(node, ast.Constant) and isinstance(node.value, str):
      # Modules loaded by name, e.g. backend.load('pallas_kernels.flash_attention.{}', b).
      if re.fullmatch(r'[\w.]*\{\}[\w.]*', node.value) and '.' in node.value:
        for b in BACKENDS:
          if node.value.format(b) in MODULES:
            found.add(node.value.format(b))
  return found


GRAPH = {name: _imports(path, name) for name, path in MODULES.items()}


def _cycles(graph):
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
      scc = []
      while True:
        w = stack.pop()
        on.discard(w)
        scc.append(w)
        if w == v:
          break
      if len(scc) > 1:
        out.append(sorted(scc))
  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_no_import_cycles():
  assert _cycles(GRAPH) == []


def test_imports_flow_one_way():
  bad = [(a, b) for a, deps in GRAPH.items() for b in deps
         if b.split('.')[0] not in ALLOWED[a.split('.')[0]]]
  assert bad == []


def _entry_points():
  """Non-test roots: the entry shims, scripts, modules run with `python -m` (they have a
  `__main__` block), and modules gin files import."""
  roots = set()
  for mod in MODULES:
    path = os.path.join(ROOT, *mod.split('.')) + '.py'
    if os.path.exists(path) and "if __name__ == '__main__':" in open(path).read():
      roots.add(mod)
  for shim in ('train', 'infer', 'eval'):
    roots |= _imports(os.path.join(ROOT, f'{shim}.py'), shim)
  for f in sorted(os.listdir(os.path.join(ROOT, 'scripts'))):
    if f.endswith('.py'):
      roots |= _imports(os.path.join(ROOT, 'scripts', f), f'scripts.{f[:-3]}')
  for folder, _, files in os.walk(os.path.join(ROOT, 'gin')):
    for f in files:
      if f.endswith('.gin'):
        text = open(os.path.join(folder, f)).read()
        for pkg, name in re.findall(r'^from\s+([\w.]+)\s+import\s+(\w+)', text, re.M):
          mod = f'{pkg}.{name}'
          roots.add(mod if mod in MODULES else pkg)
  return {r for r in roots if r in MODULES}


def test_every_shipped_module_is_reached_from_non_test_code():
  seen, todo = set(), list(_entry_points())
  while todo:
    m = todo.pop()
    if m not in seen:
      seen.add(m)
      todo.extend(GRAPH[m])
      parent = m.rpartition('.')[0]
      if parent in MODULES:  # importing a.b runs a/__init__.py
        todo.append(parent)
  assert sorted(set(MODULES) - seen) == []


@pytest.mark.parametrize('entry', ['t5x_like.train'])
def test_the_train_entry_reaches_the_kernels(entry):
  seen, todo = set(), [entry]
  while todo:
    m = todo.pop()
    if m not in seen:
      seen.add(m)
      todo.extend(GRAPH[m])
  assert {'pallas_kernels.flash_attention.ops', 'pallas_kernels.moe_routing.gmm_ops'} <= seen
