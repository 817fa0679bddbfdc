"""Hyperparameter sweeps: the train command with ``--config.sweep.grid``.

  python -m imgcls_jax.main --config=configs/default.py --workdir=/tmp/sweep \\
      --config.sweep.grid="{'optim.learning_rate': [0.4, 0.1, 0.025], 'label_smoothing': [0, 0.1]}" \\
      --config.sweep.seeds=3

Every combination of the grid's values (or, with ``sweep.samples=N``, N distinct settings drawn at
random, where a key may also be a range such as ``{'log_uniform': [1e-4, 1e-1]}``), times
``sweep.seeds`` seeds (``seed``, ``seed + 1``, ...), is a trial: the config with those keys set
(``imgcls_jax/grid.py``; every trial's config is checked before the first one trains),
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
import os
import re
import time
from typing import Any

import jax
import ml_collections

from imgcls_jax import atomic, metrics, plots, preemption, run_directory
from imgcls_jax.errors import UserError
from imgcls_jax.sweep import grid, halving, rank, report, store, trial


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


def _write(workdir: str, summary: dict[str, Any], dataset: str) -> None:
  """sweep.json / .md / .csv / .png, each replaced whole (shards may finish together)."""
  def replace(name: str, content: Any) -> None:
    atomic.write_atomic(os.path.join(workdir, name), content, unique=True)

  replace('sweep.json', json.dumps(metrics.json_safe(summary), indent=1))
  replace('sweep.md', report.markdown(summary))
  replace('sweep.csv', lambda path: report.write_csv(summary, path))
  replace('sweep.png', lambda path: plots.sweep(
      [{**s, 'note': report.stopped(s).replace(' of the run', '')} for s in summary['settings']],
      summary['metric'], path,
      title=f"{dataset}: {summary['metric']} on {summary['split']}",
      missing=[report.missing(s) for s in summary['settings']]))


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


def _preflight(config: ml_collections.ConfigDict, todo: list[grid.Trial]) -> None:
  """What every trial shares, checked before the first trains (or a rerun skips finished ones):
  the checkpoint trials are scored at, each dataset the trials read (a missing one fails every
  trial otherwise), and the evaluate.* keys training reads with it (tta, the held-out splits a
  temperature or thresholds are fitted on), as a plain run checks them."""
  spec = str(config.evaluate.checkpoint).strip().lower()
  if spec not in ('best', 'latest') and not spec.isdigit():
    raise UserError(f"config.evaluate.checkpoint='{config.evaluate.checkpoint}' must be 'best', "
                    "'latest' or a step number (the checkpoint each trial is scored at).")
  from imgcls_jax import held_out
  from imgcls_jax.data import info as info_lib, reader
  seen = set()
  for t in todo:
    key = repr((sorted(t.config_json['data'].items()), sorted(t.config_json['evaluate'].items())))
    if key not in seen:
      seen.add(key)
      try:
        info = reader.describe(t.config.data)
        info_lib.check_flips(t.config.data, t.config.evaluate.tta, mirror_safe=info.mirror_safe)
        held_out.check_fit_splits(t.config, info)
      except UserError as e:
        raise UserError(f'The sweep setting {t.setting}: {e}') from None


def _train_rung(todo: list[tuple[int, grid.Trial]], total: int, workdir: str,
                pause_at: float | None, stop: preemption.StopWatcher, shards: tuple[int, int],
                rows: dict[str, dict[str, Any] | None]) -> dict[str, Any] | None:
  """Trains each ``(index, trial)`` of ``todo`` (of ``total``) that is this process's
  (``shards``), to the end or until ``pause_at`` of its run (a rung of successive halving),
  skipping those done in an earlier run; puts each row into ``rows`` (None: another process's).
  Returns what a SIGTERM / SIGINT interrupted, else None."""
  mine, count = shards
  upto = f' (to {report.share(pause_at)} of its run)' if pause_at is not None else ''
  for i, t in todo:
    directory = os.path.join(workdir, t.name)
    saved = store.done(directory, t.config_json) if pause_at is None else None
    row = (trial.rescored(t, directory, saved) if saved is not None
           else trial.at_rung(t, directory, pause_at) if pause_at is not None else None)
    if row is not None:
      logging.info('Trial %d/%d %s%s: %s in an earlier run; not trained again.', i + 1, total,
                   t.name, upto, row['status'])
      rows[t.name] = row
      continue
    if i % count != mine:   # another process's trial: read once the loop is done
      rows[t.name] = None
      continue
    if stop.requested(0):   # a signal between two trials
      print(f'Stopped by {stop.signal_name} before trial {t.name}. To resume, '
            f'{preemption.resume_hint(workdir)}', flush=True)
      return {'interrupted_in_trial': t.name}
    with store.claim(directory) as claimed:
      if not claimed:
        logging.warning('Trial %s is being trained by another process; left to it.', t.name)
        rows[t.name] = None
        continue
      logging.info('Trial %d/%d: %s%s', i + 1, total, t.name, upto)
      row = trial.run_trial(t, directory, pause_at)
    if 'status' not in row:
      logging.warning('The sweep stopped in trial %s; run the same command again to resume.',
                      t.name)
      return {'interrupted_in_trial': t.name, **row}
    if row['status'] not in ('finished', 'paused'):
      logging.warning('Trial %s %s: %s', t.name, row['status'], row['error'])
    rows[t.name] = row
  return None


def _halve(rows: dict[str, dict[str, Any] | None], alive: list[str], fraction: float,
           metric: str, mode: str, eta: int) -> list[str]:
  """The settings of ``alive`` that go on after the rung ``fraction``; the others' rows are marked
  'stopped' there."""
  held = [name for name, r in rows.items() if r is None]
  if held:   # (two copies of one halving command)
    raise UserError(f'Trial {held[0]} is being trained by another process; successive halving '
                    'ranks every trial of a rung, so run one copy of the sweep at a time.')
  going, ranked = halving.promote([r for r in rows.values() if r['setting'] in alive],
                                  metric, mode, eta)
  logging.info('Rung at %s of the run: %d of %d settings go on:\n%s', report.share(fraction),
               len(going), len(alive), '\n'.join(report.rung_lines(ranked, going)))
  for name, r in rows.items():
    if r and r['setting'] in alive and r['setting'] not in going and r['status'] == 'paused':
      rows[name] = {**r, 'status': 'stopped'}
  return going


def sweep(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains every trial of ``config.sweep`` (resuming, skipping finished ones; with
  ``sweep.halving``, rung by rung); returns the summary, or ``{'interrupted_in_trial': name,
  ...}`` after a SIGTERM / SIGINT."""
  if jax.process_count() > 1:
    raise UserError('A sweep runs in a single process; launch it without config.distributed '
                    '(or spread it over processes with config.sweep.shard).')
  workdir = os.path.abspath(workdir)
  metric, mode = rank.ranking(config)
  shards = shard(config.sweep.shard)
  todo = grid.trials(config)
  settings = list(dict.fromkeys(t.setting for t in todo))
  rungs = halving.fractions(config, len(settings))
  if config.sweep.halving and len(rungs) == 1:
    logging.warning('config.sweep.halving=%d with %d setting(s): no rung before the end (halving '
                    'keeps the best 1/%d); every setting trains its whole run.',
                    config.sweep.halving, len(settings), config.sweep.halving)
  if store.holds_run(workdir):
    raise UserError(f'--workdir={workdir} holds a training run, not a sweep; give the sweep '
                    "another --workdir (a new or empty folder, or this sweep's own).")
  run_directory.check_writable_by('sweep', workdir)   # an export, a classical fit, ...
  _preflight(config, todo)
  clashes = [c for c in (store.conflict(os.path.join(workdir, t.name), t.config_json)
                         for t in todo) if c]
  if clashes:
    (why, fix), n = clashes[0], len(clashes)
    raise UserError(f"{n} trial director{'y' if n == 1 else 'ies'} of this sweep cannot be "
                    f'resumed: {why}; {fix}.')
  os.makedirs(workdir, exist_ok=True)
  split, note = _note(config)
  if note:
    logging.warning('%s', note)
  logging.info('Sweep of %d trials (%d settings) in %s%s.', len(todo), len(settings), workdir,
               f"; successive halving at {', '.join(report.share(f) for f in rungs)} of each run"
               if len(rungs) > 1 else '')
  t0 = time.perf_counter()
  found: dict[str, dict[str, Any] | None] = {}
  with preemption.StopWatcher() as stop:
    for k, fraction in enumerate(rungs):
      last = k == len(rungs) - 1
      stopped = _train_rung([(i, t) for i, t in enumerate(todo) if t.setting in settings],
                            len(todo), workdir, None if last else fraction, stop, shards, found)
      if stopped is not None:
        return stopped
      if not last:
        settings = _halve(found, settings, fraction, metric, mode, config.sweep.halving)
        if not settings:
          logging.warning('Successive halving stopped every setting at %s of the run: each has a '
                          'seed that diverged, failed or has no finite %s.',
                          report.share(fraction), metric)
          break
  with store.summary_lock(workdir):   # others' results as they are now
    rows = [trial.as_held(t, os.path.join(workdir, t.name), found[t.name]) if found.get(t.name)
            else trial.elsewhere(t, os.path.join(workdir, t.name)) for t in todo]
    done = [r for r in rows if r['status'] == 'finished']
    summary = {**rank.summarize(rows, metric, mode), 'trials': rows, 'grid': config.sweep.grid,
               'samples': int(config.sweep.samples), 'seeds': int(config.sweep.seeds),
               'shard': config.sweep.shard,
               'halving': int(config.sweep.halving) if len(rungs) > 1 else 0,
               'rungs': rungs, 'dataset': config.data.name, 'split': split,
               'workdir': workdir, 'note': note, 'wall_time_s': time.perf_counter() - t0}
    _write(workdir, summary, config.data.name)
  print('\n'.join(report.table_lines(summary)), flush=True)
  waiting = sum(r['status'] in ('pending', 'running') for r in rows)
  if waiting:
    print(f'{waiting} trial(s) not finished by the processes training them yet; once they are, '
          'run the command without config.sweep.shard for the whole summary (finished trials '
          'are not trained again).', flush=True)
  if not done and not waiting:
    first = next((r for r in rows if r.get('error')), rows[0])
    why = (f"the first {first['status']}: {first['error']}" if first.get('error') else
           'successive halving stopped every setting, each with a seed that has no finite '
           f'{metric}')
    raise UserError(f'No trial of the sweep finished; {why} (all of them: {workdir}/sweep.md).')
  return summary
