"""Hyperparameter sweeps: the train command with ``--config.sweep.grid``.

  python -m imgcls_jax.main --config=configs/default.py --workdir=/tmp/sweep \\
      --config.sweep.grid="{'optim.learning_rate': [0.4, 0.1, 0.025], 'label_smoothing': [0, 0.1]}" \\
      --config.sweep.seeds=3

Every combination of the grid's values (or, with ``sweep.samples=N``, N distinct settings drawn at
random, where a key may also be a range such as ``{'log_uniform': [1e-4, 1e-1]}``), times
``sweep.seeds`` seeds (``seed``, ``seed + 1``, ...), is a trial: the config with those keys set
(``imgcls_jax/sweep_grid.py``; every trial's config is checked before the first one trains),
trained as a plain run (a k-fold run when ``cross_validation.folds`` > 0) in
``<workdir>/<key>=<value>+...+seed=<s>``, which resumes like any run (no commas: a trial's
directory can be listed where paths are comma-separated, e.g. as a distillation teacher).

A trial's ``sweep_trial.json`` holds its config and, once done, its result: a rerun of the same
command skips finished trials and resumes an unfinished one; a trial directory written with another
config is refused (delete it or use a new workdir), never resumed with the new one. A trial that
diverges (NaN loss) or stops on an error is recorded and the sweep goes on. Each trial is scored as
the model its directory serves: the checkpoint ``config.evaluate.checkpoint`` picks (the best by
``checkpoint.best_metric`` by default), by its evaluation on ``data.eval_split`` (with folds: the
mean over folds). The settings are ranked by ``sweep.metric``, mean +- std over seeds (ddof=0), a
setting with a diverged or failed seed below every complete one: ``sweep.md``, ``sweep.json``,
``sweep.csv`` (one row per trial) and ``sweep.png``, and printed.
"""
from __future__ import annotations

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

from imgcls_jax import (checkpoint, cross_validation, evaluation, metrics, plots, preemption,
                        report, sweep_grid, sweep_report, sweep_store, train)
from imgcls_jax.errors import UserError

LOWER_IS_BETTER = ('loss', 'ece', 'ece_classwise', 'hamming_loss')
Trial = sweep_grid.Trial


def ranking(config: ml_collections.ConfigDict) -> tuple[str, str]:
  """(metric, 'max' | 'min') that ``config.sweep`` ranks by (default top-1; tagging: mAP)."""
  multilabel = bool(config.data.get('multilabel', False))
  metric = config.sweep.metric or ('map' if multilabel else 'accuracy')
  known = [m for m in report.eval_metric_names(multilabel) if m != 'count']
  if metric not in known:
    raise UserError(f"config.sweep.metric='{metric}' is not an evaluation metric of a "
                    f"{'multi-label' if multilabel else 'single-label'} run; use one of: "
                    f"{', '.join(sorted(known))}.")
  mode = config.sweep.mode
  if mode not in ('', 'max', 'min'):
    raise UserError(f"config.sweep.mode must be 'max', 'min' or '' (by the metric), got "
                    f"'{mode}'.")
  return metric, mode or ('min' if metric in LOWER_IS_BETTER else 'max')


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


def _scalars(values: dict[str, Any]) -> dict[str, float]:
  out = {}
  for k, v in values.items():
    try:
      out[k] = float(v)
    except (TypeError, ValueError):
      continue
  return out


def served(config: ml_collections.ConfigDict, directory: str,
           final: dict[str, float]) -> tuple[int | None, str, dict[str, float]]:
  """(step, how it was chosen, its evaluation metrics) of the checkpoint that evaluate, predict,
  export and serve take from ``directory`` by default (``config.evaluate.checkpoint``)."""
  path = os.path.join(directory, 'metrics.jsonl')
  with checkpoint.Checkpointer.from_config(directory, config, read_only=True) as ckpt:
    latest = ckpt.latest_step()
    if latest is None:
      return None, 'no checkpoint', final
    step, how = evaluation.choose_step(ckpt, config.evaluate.checkpoint, path)
    saved = ckpt.metrics(step)
  if step == latest:
    return step, how, final
  records = [r for r in metrics.read_jsonl(path) if r.get('split') == 'eval'
             and int(r.get('step', -1)) == step] if os.path.exists(path) else []
  if not records and not saved:   # (a step named by number that was never evaluated)
    return step, f'{how}, not evaluated', {}
  chosen = _scalars(records[-1] if records else saved)
  return step, how, {k: v for k, v in chosen.items() if k in final}


def _train(config: ml_collections.ConfigDict, directory: str) -> dict[str, Any]:
  if config.cross_validation.folds > 0:
    summary = cross_validation.cross_validate(config, directory)
    return summary if 'interrupted_in_fold' in summary else summary['mean']
  return train.train_and_evaluate(config, directory)


def _score(trial: Trial, directory: str, row: dict[str, Any], final: dict[str, float]) -> None:
  """Puts the trial's score into ``row``: the served checkpoint's metrics (k-fold: the means)."""
  row['final_metrics'] = final
  if trial.config.cross_validation.folds > 0:
    row.update(checkpoint='last of each fold (mean over folds)', metrics=final)
    return
  step, how, chosen = served(trial.config, directory, final)
  row.update(checkpoint_step=step, checkpoint=how, metrics=chosen,
             scored_at=str(trial.config.evaluate.checkpoint))


def rescored(trial: Trial, directory: str, saved: dict[str, Any]) -> dict[str, Any]:
  """A finished trial's row, scored again when ``config.evaluate.checkpoint`` changed since."""
  row = {**saved['row'], 'workdir': directory}   # (the sweep may have moved since)
  if (row['status'] != 'finished' or trial.config.cross_validation.folds > 0
      or row.get('scored_at') == str(trial.config.evaluate.checkpoint)):
    return row
  _score(trial, directory, row, row['final_metrics'])
  sweep_store.write(directory, {**saved, 'config': trial.config_json, 'row': row})
  return row


def _row(trial: Trial, directory: str) -> dict[str, Any]:
  return {'trial': trial.name, 'setting': trial.setting, 'overrides': trial.overrides,
          'seed': trial.seed, 'workdir': directory}


def run_trial(trial: Trial, directory: str) -> dict[str, Any]:
  """Trains one trial; its row (status 'finished' with metrics, 'diverged' or 'error'), or the
  training's own result when it was interrupted (SIGTERM / SIGINT)."""
  row = _row(trial, directory)
  sweep_store.write(directory, {'config': trial.config_json, 'status': 'started'})
  start = time.perf_counter()
  try:
    result = _train(trial.config, directory)
    if 'interrupted_at_step' in result or 'interrupted_in_fold' in result:
      return result
    row['status'] = 'finished'
    _score(trial, directory, row, _scalars(result))
  except train.TrainingDiverged as e:
    row.update(status='diverged', error=str(e))
  except UserError as e:
    row.update(status='error', error=str(e))
  except Exception as e:  # e.g. out of memory for this setting: the others still run
    logging.exception('Trial %s failed:', trial.name)
    row.update(status='error', error=f'{type(e).__name__}: {str(e).splitlines()[0][:300]}'
               if str(e) else type(e).__name__)
  row['wall_s'] = time.perf_counter() - start
  sweep_store.write(directory, {'config': trial.config_json, 'status': row['status'], 'row': row})
  return row


def _elsewhere(trial: Trial, directory: str) -> dict[str, Any]:
  """The row of a trial this process does not train: 'running' while another process holds it,
  else its saved result (an error too), else 'pending'."""
  row = {**_row(trial, directory), 'wall_s': 0.0, 'status': 'running'}
  if sweep_store.busy(directory):
    return row
  saved = sweep_store.read(directory)
  if (saved is not None and saved.get('status') in ('finished', 'diverged', 'error')
      and not sweep_store.differences(saved.get('config') or {}, trial.config_json)):
    return {**saved['row'], 'workdir': directory}
  return {**row, 'status': 'pending'}


def _value(row: dict[str, Any], metric: str) -> float | None:
  v = row.get('metrics', {}).get(metric) if row['status'] == 'finished' else None
  return v if v is not None and math.isfinite(v) else None


def summarize(rows: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any]:
  """The settings ranked by ``metric``: those with a result for every seed by their mean, then
  those with a diverged, failed, non-finite or unfinished seed, then those without a result; best
  first."""
  by_setting: dict[str, list[dict[str, Any]]] = {}
  for r in rows:
    by_setting.setdefault(r['setting'], []).append(r)
  settings = []
  for setting, rs in by_setting.items():
    done = [r for r in rs if _value(r, metric) is not None]
    values = [_value(r, metric) for r in done]
    common = [k for k in (done[0]['metrics'] if done else {})
              if all(k in r['metrics'] for r in done)]
    best = done[int(np.argmax(values) if mode == 'max' else np.argmin(values))] if done else None
    count = lambda status: sum(r['status'] == status for r in rs)
    settings.append({
        'setting': setting, 'overrides': rs[0]['overrides'], 'trials': len(rs),
        'finished': len(done), 'diverged': count('diverged'), 'errors': count('error'),
        'pending': count('pending') + count('running'),
        'no_value': sum(r['status'] == 'finished' and _value(r, metric) is None for r in rs),
        'mean': float(np.mean(values)) if values else None,
        'std': float(np.std(values)) if values else None,
        'values': values,
        'means': {k: float(np.mean([r['metrics'][k] for r in done])) for k in common},
        'best_workdir': best['workdir'] if best else None})
  def order(s: dict[str, Any]) -> tuple[int, int, float]:
    if s['mean'] is None:
      return (2, 0, 0.0)
    incomplete = s['diverged'] + s['errors'] + s['no_value'] + s['pending'] > 0
    return (int(incomplete), 0, -s['mean'] if mode == 'max' else s['mean'])
  settings.sort(key=order)   # stable: grid order among ties
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

  replace('sweep.json', text(json.dumps(sweep_store.finite(summary), indent=1)))
  replace('sweep.md', text(sweep_report.markdown(summary)))
  replace('sweep.csv', lambda path: sweep_report.write_csv(summary, path))
  replace('sweep.png', lambda path: plots.sweep(
      summary['settings'], summary['metric'], path,
      title=f"{dataset}: {summary['metric']} on {summary['split']}",
      missing=[sweep_report.missing(s) for s in summary['settings']]))


def _note(config: ml_collections.ConfigDict) -> tuple[str, str | None]:
  """(what the settings are ranked on, a warning when that is the test split)."""
  folds = int(config.cross_validation.folds)
  if folds > 0:
    return f'{folds}-fold cross-validation of {config.data.train_split}', None
  split = config.data.eval_split
  if 'test' not in split:
    return split, None
  return split, (f"The settings are ranked on data.eval_split='{split}', so the best one's score "
                 'is biased upward by the choice. Rank on a validation split instead (e.g. '
                 "data.train_split='train[:90%]', data.eval_split='train[90%:]') and evaluate the "
                 'chosen run once on the test split (--mode=evaluate '
                 '--config.evaluate.split=test).')


def _preflight(config: ml_collections.ConfigDict, todo: list[Trial]) -> None:
  """What every trial shares, checked before the first trains: the checkpoint trials are scored
  at, and each dataset the trials read (a missing one fails every trial otherwise)."""
  spec = str(config.evaluate.checkpoint).strip().lower()
  if spec not in ('best', 'latest') and not spec.isdigit():
    raise UserError(f"config.evaluate.checkpoint='{config.evaluate.checkpoint}' must be 'best', "
                    "'latest' or a step number (the checkpoint each trial is scored at).")
  from imgcls_jax.data import reader
  seen = set()
  for t in todo:
    key = repr(sorted(t.config_json['data'].items()))
    if key not in seen:
      seen.add(key)
      try:
        reader.describe(t.config.data)
      except UserError as e:
        raise UserError(f'The sweep setting {t.setting}: {e}') from None


def sweep(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains every trial of ``config.sweep`` (resuming, skipping finished ones); returns the
  summary, or ``{'interrupted_in_trial': name, ...}`` after a SIGTERM / SIGINT."""
  if jax.process_count() > 1:
    raise UserError('A sweep runs in a single process; launch it without config.distributed '
                    '(or spread it over processes with config.sweep.shard).')
  workdir = os.path.abspath(workdir)
  metric, mode = ranking(config)
  mine, shards = shard(config.sweep.shard)
  todo = sweep_grid.trials(config)
  clashes = [c for c in (sweep_store.conflict(os.path.join(workdir, t.name), t.config_json)
                         for t in todo) if c]
  if clashes:
    raise UserError(f'{len(clashes)} trial directories of this sweep cannot be resumed: '
                    f'{clashes[0]}; delete them to train them again, or use a new --workdir.')
  _preflight(config, todo)
  os.makedirs(workdir, exist_ok=True)
  split, note = _note(config)
  if note:
    logging.warning('%s', note)
  logging.info('Sweep of %d trials (%d settings) in %s.', len(todo),
               len({t.setting for t in todo}), workdir)
  t0 = time.perf_counter()
  rows: list[dict[str, Any] | None] = []
  with preemption.StopWatcher() as stop:
    for i, t in enumerate(todo):
      directory = os.path.join(workdir, t.name)
      saved = sweep_store.done(directory, t.config_json)
      if saved is not None:
        logging.info('Trial %d/%d %s: %s in an earlier run; not trained again.', i + 1,
                     len(todo), t.name, saved['status'])
        rows.append(rescored(t, directory, saved))
        continue
      if i % shards != mine:   # another process's trial: read once the loop is done
        rows.append(None)
        continue
      if stop.requested(0):   # a signal between two trials
        print(f'Stopped by {stop.signal_name} before trial {t.name}. To resume, '
              f'{preemption.resume_hint(workdir)}', flush=True)
        return {'interrupted_in_trial': t.name}
      with sweep_store.claim(directory) as claimed:
        if not claimed:
          logging.warning('Trial %s is being trained by another process; left to it.', t.name)
          rows.append(None)
          continue
        logging.info('Trial %d/%d: %s', i + 1, len(todo), t.name)
        row = run_trial(t, directory)
      if 'status' not in row:
        logging.warning('The sweep stopped in trial %s; run the same command again to resume.',
                        t.name)
        return {'interrupted_in_trial': t.name, **row}
      if row['status'] != 'finished':
        logging.warning('Trial %s %s: %s', t.name, row['status'], row['error'])
      rows.append(row)
  with sweep_store.summary_lock(workdir):   # others' results as they are now
    rows = [r if r is not None else _elsewhere(t, os.path.join(workdir, t.name))
            for r, t in zip(rows, todo)]
    done = [r for r in rows if r['status'] == 'finished']
    summary = {**summarize(rows, metric, mode), 'trials': rows, 'grid': config.sweep.grid,
               'samples': int(config.sweep.samples), 'seeds': int(config.sweep.seeds),
               'shard': config.sweep.shard, 'dataset': config.data.name, 'split': split,
               'workdir': workdir, 'note': note, 'wall_time_s': time.perf_counter() - t0}
    _write(workdir, summary, config.data.name)
  print('\n'.join(sweep_report.table_lines(summary)), flush=True)
  waiting = sum(r['status'] in ('pending', 'running') for r in rows)
  if waiting:
    print(f'{waiting} trial(s) not finished by the processes training them yet; once they are, '
          'run the command without config.sweep.shard for the whole summary (finished trials '
          'are not trained again).', flush=True)
  if not done and not waiting:
    first = rows[0]
    raise UserError(f"No trial of the sweep finished; the first {first['status']}: "
                    f"{first.get('error')} (all of them: {workdir}/sweep.md).")
  return summary
