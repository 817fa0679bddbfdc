"""k-fold cross-validation: ``--config.cross_validation.folds=K`` on the normal train command.

The training split (``config.data.train_split``; e.g. ``'train+test'`` for all of a small dataset)
is cut into K stratified folds, deterministic for ``config.seed`` (``data/folds.py``). Fold ``i``
trains a fresh model on the other K-1 folds in ``<workdir>/fold_<i>`` (which resumes like any run)
and evaluates its last checkpoint on fold ``i``, writing the fold's full report there. The summary
(``cv_report.json``, ``cv_report.md``, printed) gives every fold, the mean +- std over folds of
every metric (std with ddof=0, as ``numpy.std`` of ``cross_val_score`` results), and the pooled
out-of-fold report: every example of the split predicted exactly once, by the model that did not
train on it. From those out-of-fold probabilities (``config.cross_validation.label_issues``) it
lists the examples whose label looks wrong (``label_issues.py``, cleanlab's confident learning;
for a tagging run, which tags look missing or extra) in ``cv_label_issues.csv``.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from imgcls_jax import (atomic, configlib, evaluation, label_issues, metrics, out_of_fold, plots,
                        preemption, report, report_files, report_multilabel, report_text, train)
from imgcls_jax import outcomes as outcomes_lib
from imgcls_jax.data import folds as folds_lib
from imgcls_jax.errors import UserError


def fold_config(config: ml_collections.ConfigDict, train_ids_file: str,
                eval_ids_file: str) -> ml_collections.ConfigDict:
  """The config of one fold: the split restricted to the fold's ids, cross-validation off."""
  c = copy.deepcopy(config)
  split = config.data.train_split
  c.data.train_split = folds_lib.subset_split(split, train_ids_file)
  c.data.eval_split = folds_lib.subset_split(split, eval_ids_file)
  c.cross_validation.folds = 0
  return c


def _mean_std(per_fold: list[dict[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
  keys = [k for k in per_fold[0] if all(k in f for f in per_fold)]
  mean = {k: float(np.mean([f[k] for f in per_fold])) for k in keys}
  std = {k: float(np.std([f[k] for f in per_fold])) for k in keys}
  return mean, std


def cross_validate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains and evaluates every fold (resuming finished or partial folds); returns the summary."""
  k = int(config.cross_validation.folds)
  if jax.process_count() > 1:
    raise UserError('Cross-validation runs in a single process; launch it without '
                    'config.distributed.')
  workdir = os.path.abspath(workdir)
  split = config.data.train_split
  if '@' in split:
    raise UserError(f"config.data.train_split='{split}' is already a subset; cross-validate a "
                    "plain split, e.g. 'train' or 'train+test'.")
  t0 = time.perf_counter()
  assignment = folds_lib.assign(config.data, split, k, config.seed)
  os.makedirs(workdir, exist_ok=True)
  logging.info('%d-fold cross-validation of %d examples of %s:%s (seed %d) in %s.', k,
               len(assignment.ids), config.data.name, split, config.seed, workdir)
  with preemption.StopWatcher() as stop:   # a notice after a fold's last step stops the next
    return _folds(config, workdir, k, split, assignment, t0, stop)


def _folds(config: ml_collections.ConfigDict, workdir: str, k: int, split: str,
           assignment: Any, t0: float, stop: preemption.StopWatcher) -> dict[str, Any]:
  per_fold, fold_rows, pooled, fold_thresholds = [], [], None, []
  class_names: list[str] = []
  oof = out_of_fold.OutOfFold(config, len(assignment.ids))
  for i in range(k):
    if stop.requested(0):
      print(f'Stopped by {stop.signal_name} before fold {i} ({i} of {k} folds done). To '
            f'resume, {preemption.resume_hint(workdir)}', flush=True)
      return {'interrupted_in_fold': i, 'interrupted_at_step': 0}
    fold_dir = os.path.join(workdir, f'fold_{i}')
    train_file, eval_file = (os.path.join(fold_dir, f) for f in configlib.FOLD_ID_FILES)
    train_ids, held_out = assignment.training(i), assignment.held_out(i)
    folds_lib.write_ids(train_file, train_ids)
    folds_lib.write_ids(eval_file, held_out)
    fc = fold_config(config, train_file, eval_file)
    logging.info('Fold %d/%d: training on %d examples, holding out %d.', i + 1, k,
                 len(train_ids), len(held_out))
    result = train.train_and_evaluate(fc, fold_dir)
    if 'interrupted_at_step' in result:  # SIGTERM / SIGINT: the fold saved a checkpoint
      logging.warning('Cross-validation stopped in fold %d at step %d; run the same command '
                      'again to resume.', i, result['interrupted_at_step'])
      return {'interrupted_in_fold': i, **result}
    ev = evaluation.evaluate_checkpoint(fold_dir, fc, split=fc.data.eval_split,
                                        checkpoint_spec='latest', tta=config.evaluate.tta or '',
                                        num_bins=int(config.evaluate.calibration_bins),
                                        keep_probs=oof.wanted)
    o = ev.outcomes
    if oof.wanted and (o is None or o.probs is None):   # (the split was too large to keep)
      oof.wanted = False
    if oof.wanted:
      oof.add(i, held_out, o.position,
              o.labels if isinstance(o, outcomes_lib.TagOutcomes) else o.label, o.probs,
              ev.trained.info)
    stats = ev.stats
    rep = ev.report(int(config.evaluate.top_confused))
    report_files.write(rep, fold_dir, f'Fold {i + 1}/{k} of {config.data.name}:{split}',
                       os.path.join(fold_dir, 'metrics.jsonl'))
    if rep['num_examples'] != len(held_out):
      raise UserError(f'Fold {i} evaluated {rep["num_examples"]} of its {len(held_out)} '
                      'examples: some images failed to decode (the warnings above name them); '
                      'fix or remove them and run the same command again.')
    class_names = rep['class_names']
    if rep.get('task') == 'multilabel':   # each fold decides at its own thresholds
      fold_thresholds.append((stats['ml_pos'], stats['ml_neg'], rep['thresholds']))
    pooled = report.add(pooled, stats)
    scal = report.scalars(rep)
    per_fold.append(scal)
    fold_rows.append({'fold': i, 'workdir': fold_dir, 'train_examples': len(train_ids),
                      'eval_examples': len(held_out),
                      'checkpoint_step': rep['context']['checkpoint_step'], **scal})
  mean, std = _mean_std(per_fold)
  pooled_report = report.summarize(pooled, class_names,
                                   top_confused=int(config.evaluate.top_confused))
  if fold_thresholds:
    report_multilabel.at_fold_thresholds(pooled_report, fold_thresholds)
  summary = {'folds': k, 'seed': int(config.seed), 'dataset': config.data.name, 'split': split,
             'num_examples': len(assignment.ids), 'per_fold': fold_rows, 'mean': mean,
             'std': std, 'pooled_out_of_fold': pooled_report}
  label_issues.remove_stale(workdir)
  issues = oof.finish(class_names, workdir)
  if issues is not None:
    summary['label_issues'] = issues
  summary['wall_time_s'] = time.perf_counter() - t0
  atomic.write_atomic(os.path.join(workdir, 'cv_report.json'),
                      json.dumps(metrics.json_safe(summary), indent=1))
  atomic.write_atomic(os.path.join(workdir, 'cv_report.md'), markdown(summary))
  def plot(name: str, draw: Any) -> None:   # each picture whole or not at all
    atomic.write_atomic(os.path.join(workdir, name), draw)
  if pooled_report.get('task') == 'multilabel':  # each fold's exact matches at its thresholds
    plot('cv_pr_curves.png', lambda path: plots.pr_curves(
        pooled_report['pr_curves'], pooled_report['mean_average_precision'] or 0.0, path,
        micro=pooled_report.get('pr_curve_micro'),
        title='Pooled out-of-fold precision-recall curves'))
    if pooled_report.get('calibration_bins'):
      plot('cv_reliability.png', lambda path: plots.reliability_diagram(
          pooled_report['calibration_bins'], pooled_report['ece'], path,
          title='Pooled out-of-fold reliability of the tag probabilities', tags=True))
  else:
    plot('cv_confusion_matrix.png', lambda path: plots.confusion_matrix(
        pooled_report['confusion_matrix'], pooled_report['class_names'], path,
        title='Pooled out-of-fold confusion matrix'))
    plot('cv_reliability.png', lambda path: plots.reliability_diagram(
        pooled_report['calibration_bins'], pooled_report['ece'], path,
        title='Pooled out-of-fold reliability'))
  print('\n'.join(table_lines(summary, workdir)), flush=True)
  return summary


_SHOWN = (('map', 'mAP'), ('accuracy', 'top-1'), ('accuracy_top5', 'top-5'), ('loss', 'loss'),
          ('f1_macro', 'macro F1'), ('f1_micro', 'micro F1'), ('f1_weighted', 'weighted F1'),
          ('ece', 'ECE'))


def _fmt(key: str, value: float) -> str:
  return f'{100 * value:.2f}%' if key.startswith('accuracy') else f'{value:.4f}'


def table_lines(summary: dict[str, Any], workdir: str) -> list[str]:
  """The printed summary: one row per fold, then mean +- std."""
  shown = [(k, 'exact match' if k == 'accuracy' and 'map' in summary['mean'] else n)
           for k, n in _SHOWN if k in summary['mean']]
  lines = [f"{summary['folds']}-fold cross-validation of {summary['dataset']}:{summary['split']} "
           f"({summary['num_examples']} examples, seed {summary['seed']})",
           '  fold  ' + ''.join(f'{n:>13}' for _, n in shown)]
  for row in summary['per_fold']:
    lines.append(f"  {row['fold']:>4}  " + ''.join(f'{_fmt(k, row[k]):>13}' for k, _ in shown))
  lines.append('  mean  ' + ''.join(f'{_fmt(k, summary["mean"][k]):>13}' for k, _ in shown))
  lines.append('  +-std ' + ''.join(f'{_fmt(k, summary["std"][k]):>13}' for k, _ in shown))
  p = summary['pooled_out_of_fold']
  if p.get('task') == 'multilabel':
    lines.append(f"  pooled out-of-fold: {report_text.headline(p)[0]}")
  else:
    lines.append(f"  pooled out-of-fold: top-1 {100 * p['accuracy']:.2f}%, macro F1 "
                 f"{p['macro_avg']['f1']:.4f}, ECE {p['ece']:.4f} over {p['num_examples']} "
                 'examples')
  if 'label_issues' in summary:
    lines.append('  ' + label_issues.line(summary['label_issues'], workdir))
  lines.append(f"Summary: {os.path.join(workdir, 'cv_report.md')} (+ cv_report.json, "
               f"fold_*/report.md); {summary['wall_time_s']:.0f} s")
  return lines


def markdown(summary: dict[str, Any]) -> str:
  """``cv_report.md``."""
  keys = list(summary['mean'])
  md = [f"# {summary['folds']}-fold cross-validation: {summary['dataset']}:{summary['split']}", '',
        f"{summary['num_examples']} examples, stratified folds shuffled with seed "
        f"{summary['seed']}; each fold trained from scratch on the other folds and evaluated on its "
        'own (last checkpoint). std is over folds (ddof=0).', '',
        '| metric | mean | std |', '|---|---|---|']
  md += [f"| {k} | {summary['mean'][k]:.4f} | {summary['std'][k]:.4f} |" for k in keys]
  md += ['', '## Folds', '', '| fold | train | held out | step | ' + ' | '.join(keys) + ' |',
         '|---' * (4 + len(keys)) + '|']
  for r in summary['per_fold']:
    md.append(f"| {r['fold']} | {r['train_examples']} | {r['eval_examples']} | "
              f"{r['checkpoint_step']} | " + ' | '.join(f'{r[k]:.4f}' for k in keys) + ' |')
  p = summary['pooled_out_of_fold']
  md += ['', '## Pooled out-of-fold predictions', '',
         *[f'- {line}' for line in report_text.headline(p)], '']
  if 'fold_thresholds' in p:
    md += ["'at thresholds' counts each fold's tags at that fold's own thresholds.", '']
  md += ['Per-fold reports: `fold_<i>/report.md`.']
  if 'label_issues' in summary:
    md += label_issues.markdown(summary['label_issues'])
  return '\n'.join(md) + '\n'
