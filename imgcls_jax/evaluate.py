"""``--mode=evaluate``: restore a checkpoint, evaluate a split exactly once, write the report.

  python -m imgcls_jax.main --config=configs/default.py --workdir=DIR --mode=evaluate \\
      [--config.evaluate.checkpoint=best|latest|STEP] [--config.evaluate.split=test] \\
      [--config.evaluate.tta=flip]

Writes to ``config.evaluate.output_dir`` (default: the workdir) ``report.json``, ``report.md``,
``confusion_matrix.csv``, ``confusion_matrix.png``, ``reliability.png`` and, from the run's
``metrics.jsonl``, ``training_curves.png``; prints a short table. ``--mode=curves`` draws only the
training curves (fine while the run is still going).
"""
from __future__ import annotations

import functools
import json
import logging
import os
from typing import Any

import jax
import ml_collections

from imgcls_jax import checkpoint, metrics, plots, report, sharding, steps
from imgcls_jax import state as state_lib
from imgcls_jax import train
from imgcls_jax.data import pipeline
from imgcls_jax.errors import UserError

REPORT_FILES = ('report.json', 'report.md', 'confusion_matrix.csv', 'confusion_matrix.png',
                'reliability.png')
CURVES_FILE = 'training_curves.png'


def _checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, 'checkpoints')


def check_has_checkpoint(workdir: str) -> None:
  """Raises UserError (one line) unless ``workdir`` holds at least one checkpoint."""
  ckpt_dir = _checkpoint_dir(workdir)
  has = os.path.isdir(ckpt_dir) and any(n.isdigit() for n in os.listdir(ckpt_dir))
  if has:
    return
  folds = sorted(n for n in os.listdir(workdir) if n.startswith('fold_')) if os.path.isdir(
      workdir) else []
  hint = (f' This is a cross-validation run: evaluate one fold, e.g. '
          f'--workdir={os.path.join(workdir, folds[0])}.' if folds else
          ' Train first (--mode=train) or point --workdir at a run directory.')
  raise UserError(f'No checkpoint in {ckpt_dir}.{hint}')


def choose_step(ckpt: checkpoint.Checkpointer, spec: str, metrics_path: str) -> tuple[int, str]:
  """(step, how it was chosen) for ``config.evaluate.checkpoint``: 'best', 'latest' or a step.

  'best' is the checkpoint the Checkpointer ranks best (``config.checkpoint.best_metric``); for a
  run saved without evaluation metrics, the kept checkpoint with the highest eval top-1 in
  ``metrics.jsonl`` (ties: the later step); failing both, the latest.
  """
  available = sorted(ckpt.all_steps())
  spec = str(spec).strip().lower()
  if spec == 'latest':
    return available[-1], 'latest'
  if spec == 'best':
    best = ckpt.best_step()
    if best is not None:
      return best, f'best by eval {ckpt.best_metric} ({ckpt.best_mode})'
    records = metrics.read_jsonl(metrics_path) if os.path.exists(metrics_path) else []
    acc = {int(r['step']): float(r['accuracy']) for r in records
           if r.get('split') == 'eval' and r.get('accuracy') is not None}
    scored = [(acc[s], s) for s in available if s in acc]
    if scored:
      best_acc, best = max(scored)
      return best, f'best (eval top-1 {best_acc:.4f} in metrics.jsonl)'
    logging.warning('No kept checkpoint has an eval record in %s; using the latest.', metrics_path)
    return available[-1], 'latest (no evaluated checkpoint to pick the best from)'
  if spec.isdigit():
    step = int(spec)
    if step not in available:
      raise UserError(f"Checkpoint step {step} is not in {ckpt.directory}; kept steps: "
                      f"{', '.join(map(str, available))}.")
    return step, f'step {step}'
  raise UserError(f"config.evaluate.checkpoint='{spec}' must be 'best', 'latest' or a step "
                  'number.')


def sum_stats(step_fn: Any, state: Any, data: pipeline.EvalData,
              mesh: jax.sharding.Mesh) -> dict[str, Any]:
  """``step_fn`` summed over every batch of ``data`` (each example exactly once), on the host."""
  totals = None
  for batch in sharding.device_prefetch(data.batches(), sharding.batch_sharding(mesh)):
    totals = report.add(totals, step_fn(state, batch))
  if totals is None:
    raise UserError(f"The split '{data.split}' is empty; evaluate a split with examples.")
  return report.stats_to_numpy(totals)


def _check_options(config: ml_collections.ConfigDict, tta: str, num_bins: int) -> None:
  pipeline.check_tta(config.data, tta)
  if num_bins < 1:
    raise UserError(f'config.evaluate.calibration_bins={num_bins} must be at least 1.')


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, *, split: str,
                        checkpoint_spec: str = 'latest', tta: str = '',
                        output_dir: str | None = None, title: str | None = None,
                        print_table: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
  """Evaluates one checkpoint of ``workdir`` on ``split``; writes the report files.

  Returns (report, summed statistics).
  """
  workdir = os.path.abspath(workdir)
  check_has_checkpoint(workdir)
  num_bins = int(config.evaluate.calibration_bins)
  _check_options(config, tta, num_bins)
  s = train.setup(config)
  pidx, pcount = jax.process_index(), jax.process_count()
  split_size = None
  if '@' not in split:
    try:
      split_size = int(pipeline.builder(config.data).info.splits[split].num_examples)
    except (KeyError, ValueError, TypeError):
      split_size = None
  data = pipeline.EvalData(config.data, split, local_batch_size=s.local_eval_batch_size,
                           process_index=pidx, process_count=pcount, split_size=split_size)
  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  with checkpoint.Checkpointer.from_config(workdir, config) as ckpt:
    step, chosen = choose_step(ckpt, checkpoint_spec, metrics_path)
    target, state_sh = state_lib.abstract_state(s.model_fn, s.tx, s.config.seed, s.mesh)
    state, meta = ckpt.restore(target, step)
  step_fn = jax.jit(functools.partial(steps.eval_step, model_def=s.model_def, cfg=s.step_cfg, tta=tta,
                                      num_bins=num_bins),
                    in_shardings=(state_sh, sharding.batch_sharding(s.mesh)),
                    out_shardings=sharding.replicated(s.mesh))
  stats = sum_stats(step_fn, state, data, s.mesh)
  class_names = meta.get('class_names') or list(s.info.class_names)
  rep = report.summarize(stats, class_names, top_confused=int(config.evaluate.top_confused))
  rep['context'] = {'dataset': s.info.name, 'split': split, 'checkpoint_step': step,
                    'checkpoint': chosen, 'tta': tta or 'none', 'model': config.model.name,
                    'workdir': workdir}
  out_dir = os.path.abspath(output_dir or workdir)
  if pidx == 0:
    title = title or f"Evaluation of {config.model.name} on {s.info.name} '{split}'"
    write_report(rep, out_dir, title, metrics_path)
    if print_table:
      print('\n'.join(table_lines(rep, title, out_dir)), flush=True)
  return rep, stats


def write_report(rep: dict[str, Any], out_dir: str, title: str, metrics_path: str | None) -> None:
  """report.json / .md, confusion CSV + PNG, reliability PNG, and training curves when available."""
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, 'report.json'), 'w') as f:
    json.dump(rep, f, indent=1)
  with open(os.path.join(out_dir, 'report.md'), 'w') as f:
    f.write(report.to_markdown(rep, title, rep.get('context', {})))
  with open(os.path.join(out_dir, 'confusion_matrix.csv'), 'w') as f:
    f.write(report.confusion_csv(rep))
  plots.confusion_matrix(rep['confusion_matrix'], rep['class_names'],
                         os.path.join(out_dir, 'confusion_matrix.png'))
  plots.reliability_diagram(rep['calibration_bins'], rep['ece'],
                            os.path.join(out_dir, 'reliability.png'))
  if metrics_path and os.path.exists(metrics_path):
    plots.training_curves(metrics.read_jsonl(metrics_path), os.path.join(out_dir, CURVES_FILE))
  else:
    logging.info('No metrics.jsonl next to the checkpoints: no training-curve plot.')


def table_lines(rep: dict[str, Any], title: str, out_dir: str) -> list[str]:
  """The short printed summary."""
  ctx = rep.get('context', {})
  lines = [f"{title} (checkpoint {ctx.get('checkpoint_step')}: {ctx.get('checkpoint')}, TTA "
           f"{ctx.get('tta', 'none')})"]
  lines += ['  ' + line for line in report.headline(rep)]
  lines += ['  ' + line for line in report.class_table(rep, max_rows=20)]
  lines += ['  ' + line for line in report.confused_lines(rep)]
  lines.append(f'Report: {os.path.join(out_dir, "report.md")} (+ report.json, '
               'confusion_matrix.csv/.png, reliability.png, training_curves.png)')
  return lines


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """The ``evaluate`` mode: ``config.evaluate`` picks checkpoint, split, TTA and output dir."""
  e = config.evaluate
  split = e.split or config.data.eval_split
  rep, _ = evaluate_checkpoint(config, workdir, split=split, checkpoint_spec=e.checkpoint,
                               tta=e.tta or '', output_dir=e.output_dir or None)
  return rep


def curves(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The ``curves`` mode: ``training_curves.png`` from the run's metrics.jsonl (running or not)."""
  workdir = os.path.abspath(workdir)
  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  records = metrics.read_jsonl(metrics_path) if os.path.exists(metrics_path) else []
  if not records:
    raise UserError(f'No metrics in {metrics_path}; point --workdir at a run that has logged '
                    'training metrics.')
  out_dir = os.path.abspath(config.evaluate.output_dir or workdir)
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, CURVES_FILE)
  plots.training_curves(records, path, title=f'Training curves: {os.path.basename(workdir)}')
  print(f'Training curves ({len(records)} records): {path}', flush=True)
  return path
