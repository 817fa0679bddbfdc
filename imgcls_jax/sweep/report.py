"""A sweep's summary as text: the printed ranking, ``sweep.md`` and ``sweep.csv``."""
from __future__ import annotations

import csv
import json
import os
from typing import Any

from imgcls_jax.sweep import rank as rank_lib


def _fmt(metric: str, value: float | None) -> str:
  if value is None:
    return '-'
  return f'{100 * value:.2f}%' if metric.startswith('accuracy') else f'{value:.4f}'


def missing(setting: dict[str, Any]) -> str:
  """'1 diverged, 2 pending' for a setting's seeds without a result ('' when none)."""
  return ', '.join(f'{setting.get(k, 0)} {name}' for k, name in (
      ('diverged', 'diverged'), ('errors', 'failed'), ('no_value', 'without a finite value'),
      ('pending', 'pending')) if setting.get(k, 0))


def share(fraction: float) -> str:
  """A share of the run: '1/9' (or '0.25'; the whole run '1')."""
  if fraction == 1:
    return '1'
  inverse = 1 / fraction
  return (f'1/{round(inverse)}' if abs(inverse - round(inverse)) < 1e-6 else f'{fraction:.3g}')


def stopped(setting: dict[str, Any]) -> str:
  """'stopped at 1/9 of the run' for a setting successive halving stopped ('' otherwise)."""
  budget = setting.get('budget', 1.0)
  return f'stopped at {share(budget)} of the run' if budget < 1 else ''


def _notes(setting: dict[str, Any]) -> str:
  return '; '.join(x for x in (stopped(setting), missing(setting)) if x)


def table_lines(summary: dict[str, Any]) -> list[str]:
  """The printed ranking."""
  m = summary['metric']
  halving = (f"; successive halving by {summary['halving']} at "
             f"{', '.join(share(f) for f in summary['rungs'])} of the run"
             if summary.get('halving') else '')
  lines = [f"Sweep of {len(summary['settings'])} settings x {summary['seeds']} seed(s) on "
           f"{summary['dataset']}, ranked by {m} on {summary['split']} ({summary['mode']}; mean "
           f'+- std over seeds{halving}):', f"  rank  {m + ' (n)':<24}  setting"]
  for i, s in enumerate(summary['settings']):
    if s['mean'] is None:
      lines.append(f"  {'-':>4}  {missing(s) or 'no result':<24}  {s['setting']}")
      continue
    spread = f" +- {_fmt(m, s['std'])}" if s['finished'] > 1 else ''
    score = f"{_fmt(m, s['mean'])}{spread} ({s['finished']})"
    also = f'  [{_notes(s)}]' if _notes(s) else ''
    lines.append(f'  {i + 1:>4}  {score:<24}  {s["setting"]}{also}')
  best = summary['best']
  if best:
    lines.append(f"Best: {best['setting']}; its best trial: {best['best_workdir']}")
  lines.append(f"Summary: {os.path.join(summary['workdir'], 'sweep.md')} (+ sweep.json, "
               f"sweep.csv, sweep.png); {summary['wall_time_s']:.0f} s")
  return lines


def rung_lines(ranked: dict[str, Any], going: list[str]) -> list[str]:
  """The ranking at a rung of successive halving (``rank.summarize``'s), each setting marked."""
  m = ranked['metric']
  return [f"  {_fmt(m, s['mean']) if s['mean'] is not None else missing(s) or 'no result':<12}  "
          f"{'goes on' if s['setting'] in going else 'stops  '}  {s['setting']}"
          for s in ranked['settings']]


def markdown(summary: dict[str, Any]) -> str:
  """``sweep.md``."""
  m = summary['metric']
  keys = sorted({k for s in summary['settings'] for k in s['means']} - {m, 'count'})
  md = [f"# Sweep: {summary['dataset']}, ranked by {m} on {summary['split']}", '',
        f"{len(summary['settings'])} settings"
        + (' drawn at random from the grid' if summary.get('samples') else '')
        + f" x {summary['seeds']} seed(s); {summary['mode']} "
        f'{m}, mean +- std over the finished seeds (ddof=0); each trial scored at the checkpoint '
        'its directory serves (config.evaluate.checkpoint); a setting with a seed that diverged '
        f'or failed ranks below the complete ones. Grid: `{summary["grid"]}`.'
        + (f" Successive halving by {summary['halving']}: rungs at "
           f"{', '.join(share(f) for f in summary['rungs'])} of each run; a setting stopped at "
           'a rung ranks below those that went on, by its score there.'
           if summary.get('halving') else ''), '']
  if summary.get('note'):
    md += [f"**Note.** {summary['note']}", '']
  md += [f'| rank | setting | {m} | std | finished | ' + ' | '.join(keys) + ' |',
         '|---' * (5 + len(keys)) + '|']
  for i, s in enumerate(summary['settings']):
    rank = str(i + 1) if s['mean'] is not None else '-'
    extra = ' | '.join(f"{s['means'][k]:.4f}" if k in s['means'] else '-' for k in keys)
    std = _fmt(m, s['std']) if s['finished'] > 1 else '-'
    md.append(f"| {rank} | `{s['setting']}` | {_fmt(m, s['mean'])} | {std} | "
              f"{s['finished']}/{s['trials']}{' (' + _notes(s) + ')' if _notes(s) else ''} | "
              f'{extra} |')
  md += ['', '## Trials', '', '| trial | status | seed | checkpoint | ' + m + ' | wall (s) |',
         '|---|---|---|---|---|---|']
  for r in summary['trials']:
    value = rank_lib.value(r, m)
    status = (r['status'] + (f" at {share(r['budget'])}" if r['status'] == 'stopped' else '')
              + (f": {r['error'][:120]}" if r.get('error') else ''))
    md.append(f"| `{r['trial']}` | {status} | {r['seed']} | {r.get('checkpoint', '-')} | "
              f"{_fmt(m, value)} | "
              f"{r['wall_s']:.1f} |")
  return '\n'.join(md) + '\n'


def _cell(value: Any) -> Any:
  return json.dumps(value) if isinstance(value, (dict, list, tuple)) else value


def write_csv(summary: dict[str, Any], path: str) -> None:
  """``sweep.csv``: one row per trial, the grid's keys and every metric as columns."""
  grid_keys = list(summary['trials'][0]['overrides']) if summary['trials'] else []
  metric_keys = sorted({k for r in summary['trials'] for k in r.get('metrics', {})})
  with open(path, 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(['trial', 'status', 'seed', *grid_keys, *metric_keys, 'budget',
                'checkpoint_step', 'wall_s', 'workdir', 'error'])
    for r in summary['trials']:
      w.writerow([r['trial'], r['status'], r['seed'],
                  *[_cell(r['overrides'].get(k, '')) for k in grid_keys],
                  *[r.get('metrics', {}).get(k, '') for k in metric_keys], r.get('budget', ''),
                  r.get('checkpoint_step', ''), f"{r['wall_s']:.2f}", r['workdir'],
                  r.get('error', '')])
