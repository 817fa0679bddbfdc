"""A sweep's summary as text: the printed ranking, ``sweep.md`` and ``sweep.csv``."""
from __future__ import annotations

import csv
import json
import os
from typing import Any


def _fmt(metric: str, value: float | None) -> str:
  if value is None:
    return '-'
  return f'{100 * value:.2f}%' if metric.startswith('accuracy') else f'{value:.4f}'


def missing(setting: dict[str, Any]) -> str:
  """'1 diverged, 2 pending' for a setting's seeds without a result ('' when none)."""
  return ', '.join(f'{setting.get(k, 0)} {name}' for k, name in (
      ('diverged', 'diverged'), ('errors', 'failed'), ('no_value', 'without a finite value'),
      ('pending', 'pending')) if setting.get(k, 0))


def table_lines(summary: dict[str, Any]) -> list[str]:
  """The printed ranking."""
  m = summary['metric']
  lines = [f"Sweep of {len(summary['settings'])} settings x {summary['seeds']} seed(s) on "
           f"{summary['dataset']}, ranked by {m} on {summary['split']} ({summary['mode']}; mean "
           '+- std over seeds):', f"  rank  {m + ' (n)':<24}  setting"]
  for i, s in enumerate(summary['settings']):
    if s['mean'] is None:
      lines.append(f"  {'-':>4}  {missing(s) or 'no result':<24}  {s['setting']}")
      continue
    spread = f" +- {_fmt(m, s['std'])}" if s['finished'] > 1 else ''
    score = f"{_fmt(m, s['mean'])}{spread} ({s['finished']})"
    also = f'  [{missing(s)}]' if missing(s) else ''
    lines.append(f'  {i + 1:>4}  {score:<24}  {s["setting"]}{also}')
  best = summary['best']
  if best:
    lines.append(f"Best: {best['setting']}; its best trial: {best['best_workdir']}")
  lines.append(f"Summary: {os.path.join(summary['workdir'], 'sweep.md')} (+ sweep.json, "
               f"sweep.csv, sweep.png); {summary['wall_time_s']:.0f} s")
  return lines


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
        f'or failed ranks below the complete ones. Grid: `{summary["grid"]}`.', '']
  if summary.get('note'):
    md += [f"**Note.** {summary['note']}", '']
  md += [f'| rank | setting | {m} | std | finished | ' + ' | '.join(keys) + ' |',
         '|---' * (5 + len(keys)) + '|']
  for i, s in enumerate(summary['settings']):
    rank = str(i + 1) if s['mean'] is not None else '-'
    extra = ' | '.join(f"{s['means'][k]:.4f}" if k in s['means'] else '-' for k in keys)
    std = _fmt(m, s['std']) if s['finished'] > 1 else '-'
    md.append(f"| {rank} | `{s['setting']}` | {_fmt(m, s['mean'])} | {std} | "
              f"{s['finished']}/{s['trials']}{' (' + missing(s) + ')' if missing(s) else ''} | "
              f'{extra} |')
  md += ['', '## Trials', '', '| trial | status | seed | checkpoint | ' + m + ' | wall (s) |',
         '|---|---|---|---|---|---|']
  for r in summary['trials']:
    value = r.get('metrics', {}).get(m) if r['status'] == 'finished' else None
    status = r['status'] + (f": {r['error'][:120]}" if r.get('error') else '')
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
    w.writerow(['trial', 'status', 'seed', *grid_keys, *metric_keys, 'checkpoint_step', 'wall_s',
                'workdir', 'error'])
    for r in summary['trials']:
      w.writerow([r['trial'], r['status'], r['seed'],
                  *[_cell(r['overrides'].get(k, '')) for k in grid_keys],
                  *[r.get('metrics', {}).get(k, '') for k in metric_keys],
                  r.get('checkpoint_step', ''), f"{r['wall_s']:.2f}", r['workdir'], r.get('error', '')])
