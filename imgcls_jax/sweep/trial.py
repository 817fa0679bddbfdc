"""One sweep trial: trained (or k-folded, or trained up to a rung of successive halving) as a
plain run in its directory, and scored as the model that directory serves; its row."""
from __future__ import annotations

import logging
import os
import time
from typing import Any

import ml_collections

from imgcls_jax import checkpoint, cross_validation, metrics, restored_split, train
from imgcls_jax.errors import UserError, first_line
from imgcls_jax.sweep import grid, halving, report, store

Trial = grid.Trial


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
    step, how = restored_split.choose_step(ckpt, config.evaluate.checkpoint, path)
    saved = ckpt.metrics(step)
  if step == latest:
    return step, how, final
  records = [r for r in metrics.read_jsonl(path) if r.get('split') == 'eval'
             and int(r.get('step', -1)) == step] if os.path.exists(path) else []
  if not records and not saved:   # (a step named by number that was never evaluated)
    return step, f'{how}, not evaluated', {}
  chosen = _scalars(records[-1] if records else saved)
  return step, how, {k: v for k, v in chosen.items() if k in final}


def _train(config: ml_collections.ConfigDict, directory: str,
           pause_at: float | None = None) -> dict[str, Any]:
  if config.cross_validation.folds > 0:   # (halving refuses folds: halving.check)
    summary = cross_validation.cross_validate(config, directory)
    return summary if 'interrupted_in_fold' in summary else summary['mean']
  return train.train_and_evaluate(config, directory, pause_at=pause_at)


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
  store.write(directory, {**saved, 'config': trial.config_json, 'row': row})
  return row


def _row(trial: Trial, directory: str) -> dict[str, Any]:
  return {'trial': trial.name, 'setting': trial.setting, 'overrides': trial.overrides,
          'seed': trial.seed, 'workdir': directory}


def _same(trial: Trial, saved: dict[str, Any] | None) -> bool:
  return saved is not None and not store.differences(saved.get('config') or {}, trial.config_json)


def run_trial(trial: Trial, directory: str, pause_at: float | None = None) -> dict[str, Any]:
  """Trains one trial, to the end or (successive halving) until ``pause_at`` of its run; its row
  (status 'finished' or 'paused' with metrics, 'diverged' or 'error'), or the training's own
  result when it was interrupted (SIGTERM / SIGINT). A paused trial's row is also kept as that
  rung's (``at_rung``), and the next call resumes it."""
  row = _row(trial, directory)
  saved = store.read(directory)
  rungs = dict(saved.get('rungs') or {}) if _same(trial, saved) else {}
  before = max((float(r.get('wall_s', 0.0)) for r in rungs.values()), default=0.0)
  store.write(directory, {'config': trial.config_json, 'status': 'started', 'rungs': rungs})
  start = time.perf_counter()
  try:
    result = dict(_train(trial.config, directory, pause_at))
    if 'interrupted_at_step' in result or 'interrupted_in_fold' in result:
      return result
    paused, total = result.pop('paused_at_step', None), result.pop('total_steps', None)
    if paused is None:
      row.update(status='finished', budget=1.0)
      _score(trial, directory, row, _scalars(result))
    else:   # scored by the rung's evaluation: the model at that step, whatever it serves later
      row.update(status='paused', budget=int(paused) / int(total), paused_at_step=int(paused),
                 total_steps=int(total), checkpoint_step=int(paused),
                 checkpoint=f'step {paused} (the rung)', metrics=_scalars(result))
      if row['budget'] > pause_at + 1 / int(total):
        logging.warning('Trial %s was trained to step %d of %d before, past this rung (%.3g of '
                        'the run; an earlier sweep with other halving settings): it is compared '
                        'where it is.', trial.name, paused, total, pause_at)
  except train.TrainingDiverged as e:
    row.update(status='diverged', error=str(e))
  except UserError as e:
    row.update(status='error', error=str(e))
  except Exception as e:  # e.g. out of memory for this setting: the others still run
    logging.exception('Trial %s failed:', trial.name)
    row.update(status='error', error=first_line(e, limit=300))
  row['wall_s'] = before + time.perf_counter() - start
  if pause_at is not None and row['status'] != 'error':   # (an error is tried again)
    rungs[halving.key(pause_at)] = row
  store.write(directory, {'config': trial.config_json, 'status': row['status'], 'row': row,
                          'rungs': rungs})
  return row


def at_rung(trial: Trial, directory: str, pause_at: float) -> dict[str, Any] | None:
  """The trial's row at the rung ``pause_at`` of successive halving (scored by the rung's own
  evaluation), when an earlier call trained it there (or it finished or diverged before: that
  row); None when it must train."""
  saved = store.read(directory)
  if not _same(trial, saved):
    return None
  row = (saved.get('rungs') or {}).get(halving.key(pause_at))
  if row is None and saved.get('status') in ('finished', 'diverged'):
    row = saved['row']
  return {**row, 'workdir': directory} if row else None


def as_held(trial: Trial, directory: str, row: dict[str, Any]) -> dict[str, Any]:
  """``row``, or where successive halving stopped the trial at a rung but its directory holds a
  run trained further since (by the sweep without halving, or with other halving settings), what
  the directory holds: its finished (scored at the checkpoint it serves) or diverged row, or the
  later rung's."""
  if row['status'] != 'stopped':
    return row
  saved = store.read(directory)
  if not _same(trial, saved) or not saved.get('row'):
    return row
  held = saved['row']
  if saved.get('status') in ('finished', 'diverged'):
    held = rescored(trial, directory, saved)
  elif saved.get('status') == 'paused' and float(held.get('budget', 0)) > float(row['budget']):
    held = {**held, 'status': 'stopped', 'workdir': directory}
  else:
    return row
  logging.info('Trial %s: successive halving stops it at %s of the run, but its directory holds '
               'it trained further before (%s); the summary ranks what the directory holds.',
               trial.name, report.share(row['budget']), held['status'] if held['status'] !=
               'stopped' else f"paused at {report.share(held['budget'])} of the run")
  return held


def elsewhere(trial: Trial, directory: str) -> dict[str, Any]:
  """The row of a trial this process does not train: 'running' while another process holds it,
  else its saved result (an error too), else 'pending'."""
  row = {**_row(trial, directory), 'wall_s': 0.0, 'status': 'running'}
  if store.busy(directory):
    return row
  saved = store.read(directory)
  if saved is not None and saved.get('status') in ('finished', 'diverged', 'error') and _same(
      trial, saved):
    return {**saved['row'], 'workdir': directory}
  return {**row, 'status': 'pending'}
