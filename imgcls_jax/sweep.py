"""Hyperparameter sweeps: the train command with ``--config.sweep.grid``.

  python -m imgcls_jax.main --config=configs/default.py --workdir=/tmp/sweep \\
      --config.sweep.grid="{'optim.learning_rate': [0.4, 0.1, 0.025], 'label_smoothing': [0, 0.1]}" \\
      --config.sweep.seeds=3

Every combination of the grid's values (or, with ``sweep.samples=N``, N distinct settings drawn at
random, where a key may also be a range such as ``{'log_uniform': [1e-4, 1e-1]}``), times
``sweep.seeds`` seeds (``seed``, ``seed + 1``, ...), is a trial: the config with those keys set, trained as a plain run (a k-fold run when
``cross_validation.folds`` > 0) in ``<workdir>/<key>=<value>+...+seed=<s>``, which resumes like any
run (no commas: a trial's directory can be listed where paths are comma-separated, e.g. as a
distillation teacher).
Every trial's config is checked before the first one trains. A finished trial's result is kept in
its directory (``sweep_trial.json``) and a rerun of the same command does not train it again; a
trial that diverges (NaN loss) or stops on an error is recorded and the sweep goes on. The settings
are ranked by ``sweep.metric`` on ``data.eval_split`` (the final evaluation; with folds, the mean
over folds), mean +- std over seeds (ddof=0): ``sweep.md``, ``sweep.json``, ``sweep.csv`` (one row
per trial) and ``sweep.png``, and printed. Each trial's directory is a whole model: predict,
export, serve or evaluate the best one.
"""
from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import hashlib
import itertools
import json
import logging
import math
import os
import re
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from imgcls_jax import (configlib, cross_validation, models, plots, report, report_multilabel,
                        sweep_report, train)
from imgcls_jax.errors import UserError

RESULT_FILE = 'sweep_trial.json'
LOWER_IS_BETTER = ('loss', 'ece', 'ece_classwise', 'hamming_loss')
_EXAMPLE = "\"{'optim.learning_rate': [0.2, 0.1], 'label_smoothing': [0.0, 0.1]}\""
RANGES = ('uniform', 'log_uniform', 'int_uniform')
_RANGE_EXAMPLE = ("{'log_uniform': [1e-4, 1e-1]}, {'uniform': [0.0, 0.3]} or "
                  "{'int_uniform': [1, 8]}")


@dataclasses.dataclass(frozen=True)
class Range:
  """Values drawn at random (``config.sweep.samples``), floats to 3 significant digits."""
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
    return float(f'{value:.3g}')


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


def parse_grid(text: str) -> dict[str, list[Any] | Range]:
  """``config.sweep.grid`` as ``{key: [values] or Range}``, or a UserError naming what is
  wrong."""
  try:
    grid = ast.literal_eval(text)
  except (ValueError, SyntaxError) as e:
    raise UserError(f'config.sweep.grid is not a Python dict literal ({type(e).__name__}: '
                    f'{str(e).splitlines()[0]}); write e.g. --config.sweep.grid={_EXAMPLE}.'
                    ) from None
  if not isinstance(grid, dict) or not grid:
    raise UserError(f'config.sweep.grid must be a non-empty dict of config keys to lists of '
                    f'values, got {grid!r}; write e.g. --config.sweep.grid={_EXAMPLE}.')
  out = {}
  for key, values in grid.items():
    if not isinstance(key, str):
      raise UserError(f'config.sweep.grid has the key {key!r}; keys are dotted config names '
                      "such as 'optim.learning_rate'.")
    if isinstance(values, dict):
      out[key] = _range(key, values)
      continue
    if not isinstance(values, (list, tuple)) or not values:
      raise UserError(f"config.sweep.grid['{key}'] must be a non-empty list of values (or a "
                      f'range, e.g. {_RANGE_EXAMPLE}), got {values!r}.')
    if len({repr(v) for v in values}) != len(values):
      raise UserError(f"config.sweep.grid['{key}'] lists a value twice ({list(values)!r}); "
                      'list each value once (more seeds: config.sweep.seeds).')
    out[key] = list(values)
  return out


def _unknown(key: str, config: ml_collections.ConfigDict) -> UserError:
  near = difflib.get_close_matches(key, list(configlib.flat(config)), n=1)
  return UserError(f"config.sweep.grid sets '{key}', which is not a config key"
                   + (f" (did you mean '{near[0]}'?)" if near else '')
                   + '; see configs/default.py for the documented schema.')


def set_key(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
  """Sets the dotted ``key`` of ``config`` to ``value`` as ``--config.<key>=`` would."""
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
        node[leaf] = value
      return
    raise _unknown(key, config)
  current = node[leaf]
  if isinstance(current, ml_collections.ConfigDict):
    raise UserError(f"config.sweep.grid sets '{key}', a group of keys; sweep the keys in it "
                    f"(e.g. '{key}.{next(iter(current.keys()), '...')}').")
  if isinstance(current, tuple) and isinstance(value, list):
    value = tuple(value)
  if (isinstance(current, float) and isinstance(value, int)
      and not isinstance(value, bool)):
    value = float(value)
  try:
    node[leaf] = value
  except TypeError:
    raise UserError(f"config.sweep.grid gives '{key}' the value {value!r}, but that key takes a "
                    f'{type(current).__name__} (now {current!r}).') from None


def _text(value: Any) -> str:
  if isinstance(value, (list, tuple)):
    return '-'.join(_text(v) for v in value)
  return str(value)


def _dir_name(text: str) -> str:
  safe = re.sub(r'[^A-Za-z0-9._=+-]', '_', text)
  if len(safe) > 120 or safe != text:  # keep names distinct once shortened or made safe
    safe = f'{safe[:100]}-{hashlib.sha1(text.encode()).hexdigest()[:8]}'
  return safe


_SWEEP_OFF = {'grid': '', 'seeds': 1, 'samples': 0, 'metric': '', 'mode': '', 'shard': ''}


def shard(text: str) -> tuple[int, int]:
  """``config.sweep.shard`` 'i/n' as (i, n); '' is (0, 1), every trial."""
  if not text:
    return 0, 1
  m = re.fullmatch(r'\s*(\d+)\s*/\s*(\d+)\s*', text)
  if not m or not int(m.group(1)) < int(m.group(2)):
    raise UserError(f"config.sweep.shard must be 'i/n' with 0 <= i < n (this process trains "
                    f"trials i, i + n, ...; e.g. a job array's task index and size), got "
                    f"'{text}'.")
  return int(m.group(1)), int(m.group(2))


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
    return [dict(zip(grid, combos[i])) for i in rng.choice(len(combos), samples, replace=False)]
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
  if not isinstance(seeds, int) or seeds < 1:
    raise UserError(f'config.sweep.seeds must be an integer >= 1, got {seeds!r}.')
  for key in grid:
    if key.startswith('sweep.') or key == 'sweep':
      raise UserError(f"config.sweep.grid sets '{key}'; a sweep cannot sweep its own keys.")
  if 'seed' in grid and seeds > 1:
    raise UserError("config.sweep.grid sets 'seed' and config.sweep.seeds > 1; use one of them.")
  out = []
  for overrides in settings(grid, config.sweep.samples, int(config.seed)):
    setting = ', '.join(f'{k}={_text(v)}' for k, v in overrides.items())
    for j in range(seeds if 'seed' not in grid else 1):
      c = copy.deepcopy(config)
      for k, v in _SWEEP_OFF.items():   # a trial is a plain run
        c.sweep[k] = v
      for key, value in overrides.items():
        set_key(c, key, value)
      if 'seed' not in grid:
        c.seed = config.seed + j
      try:
        configlib.validate(c)
        models.family(c.model.name)
      except UserError as e:
        raise UserError(f'The sweep setting {setting}: {e}') from None
      name = _dir_name('+'.join(f'{k}={_text(v)}' for k, v in overrides.items())
                       + ('' if 'seed' in grid else f'+seed={c.seed}'))
      out.append(Trial(name, setting, overrides, int(c.seed), c, configlib.config_dict(c)))
  names = [t.name for t in out]
  if len(set(names)) != len(names):
    raise UserError('Two settings of config.sweep.grid give the same directory name; list '
                    'distinct values.')
  return out


def ranking(config: ml_collections.ConfigDict) -> tuple[str, str]:
  """(metric, 'max' | 'min') from config.sweep; '' metric = accuracy (or map, decided later)."""
  metric, mode = config.sweep.metric, config.sweep.mode
  known = set(report.SCALAR_KEYS) | set(report_multilabel.SCALAR_KEYS)
  if metric and metric not in known:
    raise UserError(f"config.sweep.metric='{metric}' is not an evaluation metric; use one of: "
                    f"{', '.join(sorted(known))}.")
  if mode not in ('', 'max', 'min'):
    raise UserError(f"config.sweep.mode must be 'max', 'min' or '' (by the metric), got "
                    f"'{mode}'.")
  return metric, mode


def _cached(directory: str, trial: Trial) -> dict[str, Any] | None:
  """A result saved by an earlier run of this very trial (same config), else None."""
  try:
    with open(os.path.join(directory, RESULT_FILE)) as f:
      saved = json.load(f)
  except (OSError, ValueError):
    return None
  if saved.get('config') != trial.config_json or saved.get('status') not in ('finished',
                                                                              'diverged'):
    return None
  return saved['row']


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
  out = {}
  for k, v in metrics.items():
    try:
      out[k] = float(v)
    except (TypeError, ValueError):
      continue
  return out


def _train(config: ml_collections.ConfigDict, directory: str) -> dict[str, Any]:
  if config.cross_validation.folds > 0:
    summary = cross_validation.cross_validate(config, directory)
    return summary if 'interrupted_in_fold' in summary else summary['mean']
  return train.train_and_evaluate(config, directory)


def run_trial(trial: Trial, directory: str) -> dict[str, Any]:
  """Trains one trial; its row (status 'finished' with metrics, 'diverged' or 'error'), or the
  training's own result when it was interrupted (SIGTERM / SIGINT)."""
  row: dict[str, Any] = {'trial': trial.name, 'setting': trial.setting,
                         'overrides': trial.overrides, 'seed': trial.seed, 'workdir': directory}
  start = time.perf_counter()
  try:
    result = _train(trial.config, directory)
  except train.TrainingDiverged as e:
    row.update(status='diverged', error=str(e))
  except UserError as e:
    row.update(status='error', error=str(e))
  else:
    if 'interrupted_at_step' in result or 'interrupted_in_fold' in result:
      return result
    row.update(status='finished', metrics=_scalars(result))
  row['wall_s'] = time.perf_counter() - start
  if row['status'] != 'error':   # written whole: another shard may be reading it
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f'.{os.getpid()}.{RESULT_FILE}')
    with open(tmp, 'w') as f:
      json.dump({'config': trial.config_json, 'status': row['status'], 'row': row}, f, indent=1)
    os.replace(tmp, os.path.join(directory, RESULT_FILE))
  return row


def _order_key(value: float | None, mode: str) -> tuple[int, float]:
  if value is None or not math.isfinite(value):
    return (1, 0.0)
  return (0, -value if mode == 'max' else value)


def summarize(rows: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any]:
  """The settings ranked by ``metric`` (mean over their finished seeds), best first."""
  by_setting: dict[str, list[dict[str, Any]]] = {}
  for r in rows:
    by_setting.setdefault(r['setting'], []).append(r)
  settings = []
  for setting, rs in by_setting.items():
    done = [r for r in rs if r['status'] == 'finished' and metric in r['metrics']]
    values = [r['metrics'][metric] for r in done]
    common = [k for k in (done[0]['metrics'] if done else {})
              if all(k in r['metrics'] for r in done)]
    best = min(done, key=lambda r: _order_key(r['metrics'][metric], mode)) if done else None
    settings.append({
        'setting': setting, 'overrides': rs[0]['overrides'], 'trials': len(rs),
        'finished': len(done), 'diverged': sum(r['status'] == 'diverged' for r in rs),
        'errors': sum(r['status'] == 'error' for r in rs),
        'pending': sum(r['status'] == 'pending' for r in rs),
        'mean': float(np.mean(values)) if values else None,
        'std': float(np.std(values)) if values else None,
        'values': values, 'means': {k: float(np.mean([r['metrics'][k] for r in done]))
                                    for k in common},
        'best_workdir': best['workdir'] if best else None})
  settings.sort(key=lambda s: _order_key(s['mean'], mode))  # stable: grid order among ties
  return {'metric': metric, 'mode': mode, 'settings': settings,
          'best': settings[0] if settings and settings[0]['mean'] is not None else None}


def _write(workdir: str, summary: dict[str, Any], dataset: str) -> None:
  """sweep.json / .md / .csv / .png, each replaced whole (shards may finish together)."""
  def replace(name: str, write: Any) -> None:
    tmp = os.path.join(workdir, f'.{os.getpid()}.{name}')   # (the extension names the format)
    write(tmp)
    os.replace(tmp, os.path.join(workdir, name))

  def text(content: str) -> Any:
    def write(path: str) -> None:
      with open(path, 'w') as f:
        f.write(content)
    return write

  replace('sweep.json', text(json.dumps(summary, indent=1)))
  replace('sweep.md', text(sweep_report.markdown(summary)))
  replace('sweep.csv', lambda path: sweep_report.write_csv(summary, path))
  replace('sweep.png', lambda path: plots.sweep(
      summary['settings'], summary['metric'], path,
      title=f"{dataset}: {summary['metric']} on {summary['split']}"))


def sweep(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains every trial of ``config.sweep`` (resuming, skipping finished ones); returns the
  summary, or ``{'interrupted_in_trial': name, ...}`` after a SIGTERM / SIGINT."""
  if jax.process_count() > 1:
    raise UserError('A sweep runs in a single process; launch it without config.distributed '
                    '(or launch each setting as its own run).')
  workdir = os.path.abspath(workdir)
  metric, mode = ranking(config)
  mine, shards = shard(config.sweep.shard)
  todo = trials(config)
  os.makedirs(workdir, exist_ok=True)
  folds = int(config.cross_validation.folds)
  split = (f'{folds}-fold cross-validation of {config.data.train_split}' if folds > 0
           else config.data.eval_split)
  note = None
  if folds == 0 and 'test' in split:
    note = (f"The settings are ranked on data.eval_split='{split}', so the best one's score is "
            'biased upward by the choice. Rank on a validation split instead (e.g. '
            "data.train_split='train[:90%]', data.eval_split='train[90%:]') and evaluate the "
            'chosen run once on the test split (--mode=evaluate --config.evaluate.split=test).')
    logging.warning('%s', note)
  logging.info('Sweep of %d trials (%d settings) in %s.', len(todo),
               len({t.setting for t in todo}), workdir)
  t0 = time.perf_counter()
  rows = []
  for i, t in enumerate(todo):
    directory = os.path.join(workdir, t.name)
    row = _cached(directory, t)
    if row is not None:
      logging.info('Trial %d/%d %s: %s in an earlier run; not trained again.', i + 1, len(todo),
                   t.name, row['status'])
    elif i % shards != mine:   # another process's trial, not finished yet
      row = {'trial': t.name, 'setting': t.setting, 'overrides': t.overrides, 'seed': t.seed,
             'workdir': directory, 'status': 'pending', 'wall_s': 0.0}
    else:
      logging.info('Trial %d/%d: %s', i + 1, len(todo), t.name)
      row = run_trial(t, directory)
      if 'status' not in row:
        logging.warning('The sweep stopped in trial %s; run the same command again to resume.',
                        t.name)
        return {'interrupted_in_trial': t.name, **row}
      if row['status'] != 'finished':
        logging.warning('Trial %s %s: %s', t.name, row['status'], row['error'])
    rows.append(row)
  if not metric:
    multilabel = any('map' in r.get('metrics', {}) for r in rows)
    metric = 'map' if multilabel else 'accuracy'
  mode = mode or ('min' if metric in LOWER_IS_BETTER else 'max')
  done = [r for r in rows if r['status'] == 'finished']
  if done and not any(metric in r['metrics'] for r in done):
    raise UserError(f"config.sweep.metric='{metric}' is not among the trials' metrics "
                    f"({', '.join(sorted(done[0]['metrics']))}); rerun with one of them (the "
                    'trials are not trained again).')
  summary = {**summarize(rows, metric, mode), 'trials': rows, 'grid': config.sweep.grid,
             'samples': int(config.sweep.samples), 'seeds': int(config.sweep.seeds),
             'shard': config.sweep.shard, 'dataset': config.data.name, 'split': split,
             'workdir': workdir, 'note': note, 'wall_time_s': time.perf_counter() - t0}
  _write(workdir, summary, config.data.name)
  print('\n'.join(sweep_report.table_lines(summary)), flush=True)
  pending = sum(r['status'] == 'pending' for r in rows)
  if pending:
    print(f'{pending} trial(s) of other shards not finished yet; once they are, run the command '
          'without config.sweep.shard for the whole summary (nothing trains again).', flush=True)
  if not done and not pending:
    raise UserError(f"No trial of the sweep finished (the first: {rows[0]['status']}: "
                    f"{rows[0]['error']}); the summary is in {workdir}/sweep.md.")
  return summary
