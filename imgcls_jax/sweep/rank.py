"""A sweep's ranking: the metric and direction (``config.sweep.metric`` / ``mode``) and the
settings ordered by it (mean +- std over seeds)."""
from __future__ import annotations

import math
from typing import Any

import ml_collections
import numpy as np

from imgcls_jax import report
from imgcls_jax.errors import UserError

LOWER_IS_BETTER = ('loss', 'ece', 'ece_classwise', 'hamming_loss')


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


def complete(setting: dict[str, Any]) -> bool:
  """Whether a setting of ``summarize`` has a finite result for every seed."""
  return setting['mean'] is not None and not (
      setting['diverged'] + setting['errors'] + setting['no_value'] + setting['pending'])


def value(row: dict[str, Any], metric: str) -> float | None:
  """A trial row's finite ``metric`` (finished, or paused / stopped at a rung), else None."""
  v = (row.get('metrics', {}).get(metric) if row['status'] in ('finished', 'paused', 'stopped')
       else None)
  return v if v is not None and math.isfinite(v) else None


def summarize(rows: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any]:
  """The settings ranked by ``metric``: those with a result for every seed by their mean (with
  successive halving, those that trained further first: 'budget', the share of the run), then
  those with a diverged, failed, non-finite or unfinished seed, then those without a result; best
  first."""
  by_setting: dict[str, list[dict[str, Any]]] = {}
  for r in rows:
    by_setting.setdefault(r['setting'], []).append(r)
  settings = []
  for setting, rs in by_setting.items():
    done = [r for r in rs if value(r, metric) is not None]
    values = [value(r, metric) for r in done]
    common = [k for k in (done[0]['metrics'] if done else {})
              if all(k in r['metrics'] for r in done)]
    best = done[int(np.argmax(values) if mode == 'max' else np.argmin(values))] if done else None
    count = lambda status: sum(r['status'] == status for r in rs)
    settings.append({
        'setting': setting, 'overrides': rs[0]['overrides'], 'trials': len(rs),
        'finished': len(done), 'diverged': count('diverged'), 'errors': count('error'),
        'pending': count('pending') + count('running'), 'stopped': count('stopped'),
        'budget': min((float(r.get('budget', 1.0)) for r in done), default=1.0),
        'no_value': sum(r['status'] in ('finished', 'paused', 'stopped')
                        and value(r, metric) is None for r in rs),
        'mean': float(np.mean(values)) if values else None,
        'std': float(np.std(values)) if values else None,
        'values': values,
        'means': {k: float(np.mean([r['metrics'][k] for r in done])) for k in common},
        'best_workdir': best['workdir'] if best else None})
  def order(s: dict[str, Any]) -> tuple[int, float, float]:
    if s['mean'] is None:
      return (2, 0.0, 0.0)
    return (int(not complete(s)), -s['budget'], -s['mean'] if mode == 'max' else s['mean'])
  settings.sort(key=order)   # stable: grid order among ties
  return {'metric': metric, 'mode': mode, 'settings': settings,
          'best': settings[0] if settings and settings[0]['mean'] is not None else None}
