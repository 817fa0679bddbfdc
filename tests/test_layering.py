"""The package's layering, read from the source with ``ast`` (nothing of imgcls_jax is imported).

- no import cycles among imgcls_jax modules (function-level imports count too);
- the modes are the top floor: no module imports a mode, except ``imgcls_jax.main`` (the mode
  table) and k-fold cross-validation, which calls the training loop;
- TensorFlow is imported only under ``imgcls_jax/data/`` and by the exporter, and
  ``data/info.py``, ``data/images.py``, ``data/arrays.py``, ``data/resident.py`` and
  ``data/reader.py`` stay free of it (at import; reader imports the tf.data modules lazily);
- the run layer (models, steps, eval_steps, sharding, state, run, restored_split, evaluation,
  outcomes, held_out_fits, inference) and the training and evaluation modes load no TensorFlow, also
  not through the imgcls_jax modules they import at module level (an arrays file trains and
  evaluates without it: tests/test_arrays.py runs them).

One runtime check backs the last point: with TensorFlow unimportable, the run layer imports and
runs one real train step.
"""
from __future__ import annotations

import ast
import collections
import dataclasses
import functools
import os
import subprocess
import sys
import warnings


from tests.conftest import REPO, subprocess_env

PACKAGE = 'imgcls_jax'
MODES = ('imgcls_jax.train', 'imgcls_jax.evaluate', 'imgcls_jax.cross_validation',
         'imgcls_jax.predict', 'imgcls_jax.export', 'imgcls_jax.serve', 'imgcls_jax.classical',
         'imgcls_jax.embed', 'imgcls_jax.compare', 'imgcls_jax.calibrate', 'imgcls_jax.sweep')
MODE_TABLE = 'imgcls_jax.main'                     # may reference every mode
ALLOWED_MODE_EDGES = {('imgcls_jax.cross_validation', 'imgcls_jax.train'),  # k-fold trains
                      ('imgcls_jax.sweep', 'imgcls_jax.train'),  # a sweep trains each trial ...
                      ('imgcls_jax.sweep', 'imgcls_jax.cross_validation')}  # ... or k-folds it
TF_MODULES = ('tensorflow', 'tensorflow_datasets', 'tf2onnx', 'jax.experimental.jax2tf')
TF_IMPORTERS = ('imgcls_jax.data', 'imgcls_jax.export')   # modules, or packages with everything
TF_FREE_DATA = ('imgcls_jax.data.info', 'imgcls_jax.data.images', 'imgcls_jax.data.arrays',
                'imgcls_jax.data.resident', 'imgcls_jax.data.reader')
RUN_LAYER = ('imgcls_jax.models',  # with submodules
             'imgcls_jax.steps', 'imgcls_jax.eval_steps', 'imgcls_jax.sharding', 'imgcls_jax.state',
             'imgcls_jax.run', 'imgcls_jax.evaluation', 'imgcls_jax.inference',
             'imgcls_jax.restored_split', 'imgcls_jax.outcomes',
             'imgcls_jax.train', 'imgcls_jax.evaluate',  # the modes that train on an arrays file
             'imgcls_jax.calibrate', 'imgcls_jax.held_out', 'imgcls_jax.held_out_fits',
             'imgcls_jax.distill',
             'imgcls_jax.teacher')


# ---- the import graph ----

@dataclasses.dataclass(frozen=True)
class Import:
  """One imported name: a module, or for ``from a import b`` where ``a.b`` is no module, ``a``."""
  target: str
  path: str         # the importing file, relative to the repository
  line: int
  lazy: bool        # inside a function or method: runs only when that is called

  def where(self) -> str:
    if self.line == 0:  # not a statement: importing a.b.c runs a/__init__.py and a/b/__init__.py
      return f'{self.path}: parent package, runs first'
    return f'{self.path}:{self.line}' + (', lazy' if self.lazy else '')


@dataclasses.dataclass
class Module:
  name: str
  path: str
  is_package: bool
  internal: list[Import] = dataclasses.field(default_factory=list)   # imports of PACKAGE modules
  external: list[Import] = dataclasses.field(default_factory=list)   # full dotted names


def module_files(root: str, package: str) -> dict[str, tuple[str, bool]]:
  """Dotted module name -> (path relative to ``root``, is a package) for every ``.py`` file."""
  found = {}
  for dirpath, dirnames, filenames in os.walk(os.path.join(root, package)):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith(('.', '__pycache__')))
    for filename in sorted(filenames):
      if not filename.endswith('.py'):
        continue
      rel = os.path.relpath(os.path.join(dirpath, filename), root)
      parts = rel[:-len('.py')].split(os.sep)
      is_package = parts[-1] == '__init__'
      found['.'.join(parts[:-1] if is_package else parts)] = (rel, is_package)
  return found


def _is_type_checking(test: ast.expr) -> bool:
  return ((isinstance(test, ast.Name) and test.id == 'TYPE_CHECKING') or
          (isinstance(test, ast.Attribute) and test.attr == 'TYPE_CHECKING'))


class _ImportCollector(ast.NodeVisitor):
  """(dotted name, the ``from`` part or None, level, line, lazy) of every import statement.

  ``if TYPE_CHECKING:`` blocks are skipped (they never run); ``importlib.import_module('x')`` and
  ``__import__('x')`` with a literal name count as imports.
  """

  def __init__(self):
    self.found: list[tuple[str, str | None, int, int, bool]] = []
    self._depth = 0

  def _scope(self, node):
    self._depth += 1
    self.generic_visit(node)
    self._depth -= 1

  visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _scope

  def visit_If(self, node: ast.If):
    if _is_type_checking(node.test):
      for child in node.orelse:
        self.visit(child)
    else:
      self.generic_visit(node)

  def visit_Import(self, node: ast.Import):
    for alias in node.names:
      self.found.append((alias.name, None, 0, node.lineno, self._depth > 0))

  def visit_ImportFrom(self, node: ast.ImportFrom):
    for alias in node.names:
      self.found.append((alias.name, node.module or '', node.level, node.lineno, self._depth > 0))

  def visit_Call(self, node: ast.Call):
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, 'id', '')
    if (name in ('import_module', '__import__') and node.args and
        isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str) and
        not node.args[0].value.startswith('.')):
      self.found.append((node.args[0].value, None, 0, node.lineno, self._depth > 0))
    self.generic_visit(node)


def _resolve_base(module: str, is_package: bool, level: int, base: str) -> str:
  """The absolute module that ``from <level dots><base> import ...`` in ``module`` names."""
  if level == 0:
    return base
  parts = module.split('.') if is_package else module.split('.')[:-1]
  parts = parts[:len(parts) - (level - 1)]
  return '.'.join(parts + ([base] if base else []))


def _in_package(name: str, package: str) -> bool:
  return name == package or name.startswith(package + '.')


def build_graph(root: str, package: str) -> dict[str, Module]:
  """Every module of ``package`` under ``root`` with what it imports, from the source alone."""
  files = module_files(root, package)
  graph = {}
  for name, (rel, is_package) in files.items():
    with open(os.path.join(root, rel), encoding='utf-8') as f:
      tree = ast.parse(f.read(), filename=rel)
    collector = _ImportCollector()
    collector.visit(tree)
    mod = Module(name, rel, is_package)
    for imported, base, level, line, lazy in collector.found:
      if base is None:                                 # import a.b.c
        target = imported
      else:                                            # from base import imported
        base = _resolve_base(name, is_package, level, base)
        sub = f'{base}.{imported}'
        # A submodule when one exists (or, outside the package, always: 'jax.experimental.jax2tf').
        target = base if imported == '*' or (_in_package(base, package) and sub not in files) \
            else sub
      imp = Import(target, rel, line, lazy)
      kind = mod.internal if _in_package(target, package) else mod.external
      if imp not in kind:  # from a import (b, c): one edge per statement
        kind.append(imp)
    graph[name] = mod
  return graph


@functools.lru_cache(maxsize=None)
def package_graph() -> dict[str, Module]:
  return build_graph(REPO, PACKAGE)


def _edges(graph: dict[str, Module], *, module_level_only: bool = False
           ) -> dict[str, dict[str, Import]]:
  """src -> {dst: the first import making that edge} between modules of the graph."""
  edges: dict[str, dict[str, Import]] = {}
  for name, mod in graph.items():
    out = edges.setdefault(name, {})
    for imp in mod.internal:
      if imp.target in graph and imp.target != name and not (module_level_only and imp.lazy):
        if imp.target not in out or (out[imp.target].lazy and not imp.lazy):
          out[imp.target] = imp
  return edges


def _strongly_connected(edges: dict[str, dict[str, Import]]) -> list[list[str]]:
  """Tarjan's strongly connected components with more than one module."""
  index, low, stack, on_stack, comps = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(edges.get(v, {})):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        comps.append(sorted(comp))

  for v in sorted(edges):
    if v not in index:
      visit(v)
  return comps


def _shortest_path(edges: dict[str, dict[str, Import]], start: str, goal: str,
                   allowed: set[str] | None = None) -> list[str] | None:
  """Modules from ``start`` to ``goal`` (both included; a cycle when equal), or None."""
  parent = {w: start for w in edges.get(start, {}) if allowed is None or w in allowed}
  queue = collections.deque(sorted(parent))
  while queue:
    v = queue.popleft()
    if v == goal:
      path = [v]
      while path[-1] != start or len(path) == 1:
        path.append(parent[path[-1]])
      return path[::-1]
    for w in sorted(edges.get(v, {})):
      if w not in parent and (allowed is None or w in allowed):
        parent[w] = v
        queue.append(w)
  return None


def _format_chain(edges: dict[str, dict[str, Import]], path: list[str]) -> str:
  out = path[0]
  for a, b in zip(path, path[1:]):
    out += f' -> {b} [{edges[a][b].where()}]'
  return out


def find_cycles(graph: dict[str, Module]) -> list[str]:
  """One shortest cycle through each module that lies on a cycle, as readable chains."""
  edges = _edges(graph)
  cycles, seen = [], set()
  for comp in _strongly_connected(edges):
    for start in comp:
      path = _shortest_path(edges, start, start, set(comp))
      key = frozenset(zip(path, path[1:]))
      if key not in seen:
        seen.add(key)
        cycles.append(_format_chain(edges, path))
  return cycles


def _is_tf(name: str) -> bool:
  return any(name == m or name.startswith(m + '.') for m in TF_MODULES)


def _tf_imports(mod: Module, *, module_level_only: bool = False) -> list[Import]:
  return [i for i in mod.external if _is_tf(i.target) and not (module_level_only and i.lazy)]


def _ancestors(name: str) -> list[str]:
  parts = name.split('.')
  return ['.'.join(parts[:i]) for i in range(1, len(parts))]


def tf_loaded_on_import(graph: dict[str, Module], name: str) -> list[str]:
  """How importing ``name`` reaches TensorFlow: module-level imports are followed through the
  package (with each module's parent packages, whose ``__init__`` runs first); one line each."""
  edges = _edges(graph, module_level_only=True)
  for mod in graph:  # importing a.b.c runs a/__init__.py and a/b/__init__.py too
    for parent in _ancestors(mod):
      if parent in graph:
        edges[mod].setdefault(parent, Import(parent, graph[mod].path, 0, False))
  found = []
  for reached in [name] + sorted(_reachable(edges, name)):
    for imp in _tf_imports(graph[reached], module_level_only=reached != name):
      chain = (_format_chain(edges, _shortest_path(edges, name, reached))
               if reached != name else name)
      found.append(f'{chain}: imports {imp.target} [{imp.where()}]')
  return found


def _reachable(edges: dict[str, dict[str, Import]], start: str) -> set[str]:
  seen, todo = set(), [start]
  while todo:
    for w in edges.get(todo.pop(), {}):
      if w not in seen and w != start:
        seen.add(w)
        todo.append(w)
  return seen


def _mode_of(name: str) -> str | None:
  return next((m for m in MODES if _in_package(name, m)), None)


def mode_violations(graph: dict[str, Module]) -> list[str]:
  """Imports of a mode by anything but main's mode table and the allowed k-fold -> train."""
  bad = []
  for name, mod in sorted(graph.items()):
    if name == MODE_TABLE:
      continue
    for imp in mod.internal:
      src, dst = _mode_of(name), _mode_of(imp.target)
      if dst is None or src == dst or (src, dst) in ALLOWED_MODE_EDGES:
        continue
      what = f'mode {src}' if src else f'library module {name}'
      bad.append(f'{what} imports mode {imp.target} [{imp.where()}]')
  return bad


def _expand(graph: dict[str, Module], names: tuple[str, ...]) -> tuple[list[str], list[str]]:
  """(modules of the graph named or under a package named, names with no module yet)."""
  present, missing = [], []
  for n in names:
    under = sorted(m for m in graph if _in_package(m, n))
    present += under
    if not under:
      missing.append(n)
  return present, missing


def _note_missing(missing: list[str]) -> None:
  for n in missing:
    warnings.warn(f'{n} does not exist yet ({n.replace(".", "/")}.py); not checked.',
                  UserWarning, stacklevel=2)


# ---- imgcls_jax ----

def test_the_graph_sees_the_package():
  g = package_graph()
  assert {'imgcls_jax', 'imgcls_jax.main', 'imgcls_jax.steps', 'imgcls_jax.models'} <= set(g)
  assert sum(len(m.internal) for m in g.values()) > 20     # the parser found the imports


def test_no_import_cycles():
  cycles = find_cycles(package_graph())
  assert not cycles, ('import cycles among imgcls_jax modules (function-level imports count: '
                      'they still tie the modules together):\n  ' + '\n  '.join(cycles))


def test_modes_are_the_top_floor():
  bad = mode_violations(package_graph())
  assert not bad, ('a mode is imported by another module (only imgcls_jax.main and '
                   'cross_validation / sweep -> train may; shared code belongs in the run layer):\n  '
                   + '\n  '.join(bad))


def test_tensorflow_only_in_data_and_the_exporter():
  g = package_graph()
  bad = [f'{name} imports {imp.target} [{imp.where()}]'
         for name, mod in sorted(g.items()) for imp in _tf_imports(mod)
         if not any(_in_package(name, allowed) for allowed in TF_IMPORTERS)]
  present, missing = _expand(g, TF_FREE_DATA)
  _note_missing(missing)
  bad += [line for name in present for line in tf_loaded_on_import(g, name)]
  assert not bad, ('TensorFlow outside imgcls_jax/data and imgcls_jax/export.py, or in a '
                   f'TF-free data module ({", ".join(TF_FREE_DATA)}):\n  ' + '\n  '.join(bad))


def test_run_layer_loads_no_tensorflow():
  g = package_graph()
  present, missing = _expand(g, RUN_LAYER)
  _note_missing(missing)
  assert present
  bad = [line for name in present for line in tf_loaded_on_import(g, name)]
  assert not bad, ('the run layer reaches TensorFlow (directly, or through module-level imports; '
                   'import imgcls_jax.data inside the function that reads a dataset):\n  '
                   + '\n  '.join(bad))


_STEP_WITHOUT_TF = """
import sys
for blocked in {blocked!r}:
  sys.modules[blocked] = None          # importing any of them now raises ImportError
for blocked in {blocked!r}:
  try:
    __import__(blocked)
  except ImportError:
    pass
  else:
    raise SystemExit(f'{{blocked}} is not blocked')
import functools, importlib
for name in {modules!r}:
  importlib.import_module(name)
import jax
import numpy as np
from configs import default
from imgcls_jax import models, optim, sharding, steps
from imgcls_jax import state as state_lib

config = default.get_config()
mesh = sharding.make_mesh(1)
lr = optim.schedule(config.optim, batch_size=8, total_steps=10, warmup_steps=0)
tx = optim.build(config.optim, lr)
model_fn = models.from_config(config, 10, 1)
state, shardings = state_lib.create(model_fn, tx, config.seed, mesh)
train = jax.jit(functools.partial(steps.train_step, model_def=state_lib.model_def(model_fn), tx=tx,
                                  lr_schedule=lr, cfg=steps.step_config(config, 10)),
                in_shardings=(shardings, sharding.batch_sharding(mesh)),
                out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
rng = np.random.default_rng(0)
batch = {{'image': rng.integers(0, 256, (8, 8, 8, 1), dtype=np.uint8),
         'label': rng.integers(0, 10, (8,), dtype=np.int32)}}
state, metrics = train(state, batch)
assert int(state.step) == 1 and np.isfinite(float(metrics['loss'])), metrics
print('trained one step; loss', float(metrics['loss']))
"""


def test_run_layer_trains_a_step_without_tensorflow():
  present, missing = _expand(package_graph(), RUN_LAYER)
  _note_missing(missing)
  script = _STEP_WITHOUT_TF.format(blocked=TF_MODULES, modules=present)
  r = subprocess.run([sys.executable, '-c', script], cwd=REPO, env=subprocess_env(1),
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, f'stdout:\n{r.stdout}\nstderr:\n{r.stderr[-3000:]}'
  assert 'trained one step' in r.stdout


# ---- the builder, on a made-up package ----

def test_graph_builder_on_a_small_package(tmp_path):
  files = {
      'pkg/__init__.py': '',
      'pkg/a.py': 'from pkg import b\nfrom pkg.sub import helper as h\nimport tensorflow as tf\n',
      'pkg/b.py': ('from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n  from pkg import c\n'
                   'def f():\n  from . import a\n  from jax.experimental import jax2tf\n'
                   'class C:\n  import numpy\n'),
      'pkg/sub/__init__.py': 'from .helper import X\nfrom .. import c\n',
      'pkg/sub/helper.py': 'from pkg.sub import X\nimport pkg.c\n',
      'pkg/c.py': 'import importlib\nlazy = lambda: importlib.import_module("pkg.a")\n',
      'pkg/d.py': 'from pkg.sub import helper\nfrom pkg import a\n',
      'pkg/e/__init__.py': 'import tensorflow_datasets.core\n',
      'pkg/e/f.py': '',
  }
  for rel, text in files.items():
    (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / rel).write_text(text)
  g = build_graph(str(tmp_path), 'pkg')
  assert set(g) == {'pkg', 'pkg.a', 'pkg.b', 'pkg.c', 'pkg.d', 'pkg.e', 'pkg.e.f', 'pkg.sub',
                    'pkg.sub.helper'}
  edges = lambda m: {(i.target, i.lazy) for i in g[m].internal}  # noqa: E731
  assert edges('pkg.a') == {('pkg.b', False), ('pkg.sub.helper', False)}
  assert edges('pkg.b') == {('pkg.a', True)}           # the TYPE_CHECKING import never runs
  assert edges('pkg.sub') == {('pkg.sub.helper', False), ('pkg.c', False)}
  assert edges('pkg.sub.helper') == {('pkg.sub', False), ('pkg.c', False)}  # X: no module
  assert edges('pkg.c') == {('pkg.a', True)}
  assert {(i.target, i.lazy) for i in g['pkg.b'].external} == {
      ('typing.TYPE_CHECKING', False), ('jax.experimental.jax2tf', True), ('numpy', False)}
  assert sorted(find_cycles(g)) == [
      'pkg.a -> pkg.b [pkg/a.py:1] -> pkg.a [pkg/b.py:5, lazy]',
      'pkg.c -> pkg.a [pkg/c.py:2, lazy] -> pkg.sub.helper [pkg/a.py:2] '
      '-> pkg.c [pkg/sub/helper.py:2]',
      'pkg.sub -> pkg.sub.helper [pkg/sub/__init__.py:1] -> pkg.sub [pkg/sub/helper.py:1]']
  assert tf_loaded_on_import(g, 'pkg.c') == []          # a is imported lazily only
  assert tf_loaded_on_import(g, 'pkg.b') == [
      'pkg.b: imports jax.experimental.jax2tf [pkg/b.py:6, lazy]']
  assert tf_loaded_on_import(g, 'pkg.d') == [
      'pkg.d -> pkg.a [pkg/d.py:2]: imports tensorflow [pkg/a.py:3]']
  assert tf_loaded_on_import(g, 'pkg.e.f') == [
      'pkg.e.f -> pkg.e [pkg/e/f.py: parent package, runs first]: '
      'imports tensorflow_datasets.core [pkg/e/__init__.py:1]']


def test_training_loads_no_scipy_stats_or_sklearn_at_import():
  """Start-up (issue 18): ``scipy.stats`` alone is ~1.6 s of imports on 2 cores, scikit-learn
  more; the training mode and the run layer use neither, so they import neither (the report's
  intervals import ``scipy.stats`` when they are computed)."""
  code = ('import sys, imgcls_jax.main, imgcls_jax.train, imgcls_jax.run, imgcls_jax.report; '
          "print(sorted(m for m in ('scipy.stats', 'sklearn') if m in sys.modules))")
  res = subprocess.run([sys.executable, '-c', code], cwd=REPO, env=subprocess_env(1),
                       capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-2000:]
  assert res.stdout.strip() == '[]', res.stdout
