"""A sweep's grid (``config.sweep.grid``, ``samples``, ``seeds``) -> its trials, each a checked
config; every mistake is one UserError before anything trains (the package's ``sweep`` runs
them).
"""
from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import hashlib
import itertools
import math
import re
from typing import Any

import ml_collections
import numpy as np

from imgcls_jax import configlib, models, teacher
from imgcls_jax.errors import UserError

_EXAMPLE = "\"{'optim.learning_rate': [0.2, 0.1], 'label_smoothing': [0.0, 0.1]}\""
RANGES = ('uniform', 'log_uniform', 'int_uniform')
_RANGE_EXAMPLE = ("{'log_uniform': [1e-4, 1e-1]}, {'uniform': [0.0, 0.3]} or "
                  "{'int_uniform': [1, 8]}")
# Keys a sweep may not vary: its own, and those that change what the ranking measures.
REFUSED = {'sweep': 'a sweep cannot sweep its own keys',
           'cross_validation': 'every setting must be ranked the same way; set it for the whole '
                               'sweep (--config.cross_validation.folds=K)',
           'data.eval_split': 'every setting must be ranked on the same split; set it for the '
                              'whole sweep (--config.data.eval_split=...)'}
OFF = {'grid': '', 'seeds': 1, 'samples': 0, 'metric': '', 'mode': '', 'shard': '', 'halving': 0,
       'first_rung': 0.0}


@dataclasses.dataclass(frozen=True)
class Range:
  """Values drawn at random (``config.sweep.samples``), floats to 3 significant digits (more
  where the range is narrow)."""
  kind: str           # one of RANGES
  low: float
  high: float

  def draw(self, rng: np.random.Generator) -> float | int:
    if self.kind == 'int_uniform':
      return int(rng.integers(int(self.low), int(self.high) + 1))
    if self.kind == 'uniform':
      value = rng.uniform(self.low, self.high)
    else:
      value = math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
    # 3 significant digits, or as many as tell the range's ends apart; never outside the range
    top = max(abs(self.low), abs(self.high))
    digits = max(3, 2 + math.ceil(math.log10(top / (self.high - self.low)))) if top else 3
    return min(max(float(f'{value:.{digits}g}'), self.low), self.high)


@dataclasses.dataclass
class Trial:
  name: str                     # its directory under the sweep's workdir
  setting: str                  # the grid's values, e.g. 'optim.learning_rate=0.1, label_smoothing=0'
  overrides: dict[str, Any]
  seed: int
  config: ml_collections.ConfigDict
  config_json: dict[str, Any]   # the config before training (what a rerun compares)


def _range(key: str, spec: dict[Any, Any]) -> Range:
  kind = next(iter(spec)) if len(spec) == 1 else None
  bounds = spec.get(kind) if kind in RANGES else None
  if (not isinstance(bounds, (list, tuple)) or len(bounds) != 2
      or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b)
                 for b in bounds)):
    raise UserError(f"config.sweep.grid['{key}'] is {spec!r}: a range is one of {_RANGE_EXAMPLE}"
                    ' (two finite numbers).')
  low, high = bounds
  if not low < high:
    raise UserError(f"config.sweep.grid['{key}'] is {spec!r}: the range's low end must be below "
                    'its high end.')
  if kind == 'log_uniform' and low <= 0:
    raise UserError(f"config.sweep.grid['{key}'] is {spec!r}: a log_uniform range needs a low end "
                    '> 0.')
  if kind == 'int_uniform' and not all(isinstance(b, int) for b in bounds):
    raise UserError(f"config.sweep.grid['{key}'] is {spec!r}: an int_uniform range takes two "
                    'integers.')
  return Range(kind, low, high)


def _literal(text: str) -> Any:
  try:
    tree = ast.parse(text.strip(), mode='eval')
    if isinstance(tree.body, ast.Dict):   # literal_eval keeps the last of two equal keys
      keys = [ast.literal_eval(k) for k in tree.body.keys if k is not None]
      twice = sorted({k for k in keys if keys.count(k) > 1}, key=str)
      if twice:
        raise UserError(f"config.sweep.grid names '{twice[0]}' twice; give each key once, with "
                        'all its values in one list.')
    return ast.literal_eval(tree)
  except (ValueError, SyntaxError, TypeError) as e:
    detail = str(e).splitlines()[0] if str(e) else type(e).__name__
    if 'malformed node' in detail:
      detail = 'only Python literals: quoted keys and strings, numbers, True / False / None'
    raise UserError(f'config.sweep.grid is not a Python dict literal ({detail}); write e.g. '
                    f'--config.sweep.grid={_EXAMPLE}.') from None


def parse_grid(text: str) -> dict[str, list[Any] | Range]:
  """``config.sweep.grid`` as ``{key: [values] or Range}``, or a UserError naming what is
  wrong."""
  grid = _literal(text)
  if not isinstance(grid, dict) or not grid:
    raise UserError(f'config.sweep.grid must be a non-empty dict of config keys to lists of '
                    f'values, got {grid!r}; write e.g. --config.sweep.grid={_EXAMPLE}.')
  out = {}
  for key, values in grid.items():
    if not isinstance(key, str):
      raise UserError(f'config.sweep.grid has the key {key!r}; keys are dotted config names '
                      "such as 'optim.learning_rate'.")
    for refused, why in REFUSED.items():
      if key == refused or key.startswith(refused + '.'):
        raise UserError(f"config.sweep.grid sets '{key}': {why}.")
    if isinstance(values, dict) and key != 'model':
      out[key] = _range(key, values)
      continue
    if not isinstance(values, (list, tuple)) or not values:
      raise UserError(f"config.sweep.grid['{key}'] must be a non-empty list of values (or a "
                      f'range, e.g. {_RANGE_EXAMPLE}), got {values!r}.')
    out[key] = list(values)
  return out


def _unknown(key: str, config: ml_collections.ConfigDict) -> UserError:
  near = difflib.get_close_matches(key, list(configlib.flat(config)), n=1)
  return UserError(f"config.sweep.grid sets '{key}', which is not a config key"
                   + (f" (did you mean '{near[0]}'?)" if near else '')
                   + '; see configs/default.py for the documented schema.')


def _a(type_name: str) -> str:
  return f"{'an' if type_name[0] in 'aeiou' else 'a'} {type_name}"


def _like(key: str, current: Any, value: Any) -> Any:
  """``value`` in the type of the key's ``current`` value (int -> float, list -> tuple), or a
  UserError when it has another type."""
  def bad(why: str) -> UserError:
    return UserError(f"config.sweep.grid gives '{key}' the value {value!r}, but {why}.")
  if current is None:
    return value
  if value is None:
    raise bad(f'that key needs {_a(type(current).__name__)} (now {current!r})')
  if isinstance(value, bool) != isinstance(current, bool):
    raise bad(f'that key takes {_a(type(current).__name__)} (now {current!r})')
  if isinstance(current, float) and isinstance(value, int):
    return float(value)
  if isinstance(current, tuple) and isinstance(value, (list, tuple)):
    kinds = {type(v) for v in current}
    if len(kinds) == 1 and current:
      (kind,) = kinds
      value = tuple(_like(f'{key}[{i}]', current[0], v) for i, v in enumerate(value))
      if not all(isinstance(v, kind) for v in value):
        raise bad(f'its items are {kind.__name__}s (now {current!r})')
    return tuple(value)
  if not isinstance(value, type(current)):
    raise bad(f'that key takes {_a(type(current).__name__)} (now {current!r})')
  return value


def _json_types(value: Any) -> Any:
  if isinstance(value, dict):
    return {k: _json_types(v) for k, v in value.items()}
  return tuple(_json_types(v) for v in value) if isinstance(value, (list, tuple)) else value


def set_key(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
  """Sets the dotted ``key`` of ``config`` to ``value`` as ``--config.<key>=`` would; ``'model'``
  takes a whole model, ``{'name': ..., <its arguments>}`` (to sweep model families)."""
  if key == 'model':
    if not isinstance(value, dict) or not isinstance(value.get('name'), str):
      raise UserError(f"config.sweep.grid['model'] lists {value!r}; each value must be a whole "
                      "model, e.g. {'name': 'resnet18'} or {'name': 'cnn', 'widths': [16, 32]}.")
    with config.unlocked():
      config.model = ml_collections.ConfigDict(_json_types(value))
    return
  parts = key.split('.')
  node = config
  for part in parts[:-1]:
    if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
      raise _unknown(key, config)
    node = node[part]
  leaf = parts[-1]
  if leaf not in node:
    if parts[0] == 'model' and len(parts) == 2:  # a model constructor's own argument
      with node.unlocked(), node.ignore_type():
        node[leaf] = _json_types(value)
      return
    raise _unknown(key, config)
  current = node[leaf]
  if isinstance(current, ml_collections.ConfigDict):
    raise UserError(f"config.sweep.grid sets '{key}', a group of keys; sweep the keys in it "
                    f"(e.g. '{key}.{next(iter(current.keys()), '...')}').")
  value = _like(key, current, value)
  try:
    node[leaf] = value
  except TypeError:
    raise UserError(f"config.sweep.grid gives '{key}' the value {value!r}, which that key does "
                    f'not take (now {current!r}).') from None


def _text(value: Any) -> str:
  if isinstance(value, dict):
    return '_'.join([str(value.get('name'))] + [f'{k}={_text(v)}' for k, v in value.items()
                                                 if k != 'name'])
  if isinstance(value, (list, tuple)):
    return '-'.join(_text(v) for v in value)
  return str(value)


def _dir_name(text: str) -> str:
  safe = re.sub(r'[^A-Za-z0-9._=+-]', '_', text)
  if len(safe) > 120 or safe != text:  # keep names distinct once shortened or made safe
    safe = f'{safe[:100]}-{hashlib.sha1(text.encode()).hexdigest()[:8]}'
  return safe


def settings(grid: dict[str, list[Any] | Range], samples: Any, seed: int) -> list[dict[str, Any]]:
  """The grid's settings: every combination (``samples`` 0) or ``samples`` distinct ones drawn
  at random, fixed by ``seed`` (each list's values equally likely)."""
  if not isinstance(samples, int) or isinstance(samples, bool) or samples < 0:
    raise UserError(f'config.sweep.samples must be an integer >= 0 (0 = every combination of the '
                    f'grid), got {samples!r}.')
  ranges = [k for k, v in grid.items() if isinstance(v, Range)]
  if samples == 0:
    if ranges:
      raise UserError(f"config.sweep.grid gives '{ranges[0]}' a range; draw settings from it with "
                      'config.sweep.samples=N (N > 0), or list its values.')
    return [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]
  rng = np.random.default_rng(seed)
  if not ranges:
    combos = list(itertools.product(*grid.values()))
    if samples > len(combos):
      raise UserError(f'config.sweep.samples={samples}, but the grid has {len(combos)} '
                      'combinations; use config.sweep.samples=0 for all of them.')
    # a permutation's first N: a larger N keeps the settings a smaller one drew
    return [dict(zip(grid, combos[i])) for i in rng.permutation(len(combos))[:samples]]
  out, seen = [], set()
  for _ in range(100 * samples):
    s = {k: v.draw(rng) if isinstance(v, Range) else v[int(rng.integers(len(v)))]
         for k, v in grid.items()}
    if repr(s) not in seen:
      seen.add(repr(s))
      out.append(s)
      if len(out) == samples:
        return out
  raise UserError(f'config.sweep.samples={samples}: only {len(out)} distinct settings could be '
                  'drawn from the grid; ask for fewer or widen its ranges.')


def trials(config: ml_collections.ConfigDict) -> list[Trial]:
  """Every trial of ``config.sweep`` with its config, each checked (UserError before any runs)."""
  grid = parse_grid(config.sweep.grid)
  seeds = config.sweep.seeds
  if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1:
    raise UserError(f'config.sweep.seeds must be an integer >= 1, got {seeds!r}.')
  if 'seed' in grid and seeds > 1:
    raise UserError("config.sweep.grid sets 'seed' and config.sweep.seeds > 1; use one of them.")
  out, configs = [], {}
  for n, overrides in enumerate(settings(grid, config.sweep.samples, int(config.seed))):
    setting = ', '.join(f'{k}={_text(v)}' for k, v in overrides.items())
    for j in range(seeds if 'seed' not in grid else 1):
      c = copy.deepcopy(config)
      for k, v in OFF.items():   # a trial is a plain run
        c.sweep[k] = v
      for key, value in sorted(overrides.items(), key=lambda kv: kv[0] != 'model'):
        set_key(c, key, value)   # a whole model first, then arguments given beside it
      if 'seed' not in grid:
        c.seed = config.seed + j
      teacher.absolute_paths(c)   # as training saves it in config.json
      try:
        configlib.validate(c)
        models.check_arguments(c.model.name, c.model.keys())
      except UserError as e:
        raise UserError(f'The sweep setting {setting}: {e}') from None
      as_json = configlib.config_dict(c)
      first, same = configs.setdefault(repr(as_json), (n, setting))
      if first != n:
        raise UserError(f'The sweep settings {same} and {setting} are the same config; list each '
                        'value once (more seeds: config.sweep.seeds).')
      name = _dir_name('+'.join(f'{k}={_text(v)}' for k, v in overrides.items())
                       + ('' if 'seed' in grid else f'+seed={c.seed}'))
      out.append(Trial(name, setting, overrides, int(c.seed), c, as_json))
  names = [t.name for t in out]
  if len(set(names)) != len(names):
    raise UserError('Two settings of config.sweep.grid give the same directory name; list '
                    'distinct values.')
  return out
