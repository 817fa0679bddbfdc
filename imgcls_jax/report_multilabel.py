"""The multi-label (tagging) evaluation report: what ``report.py`` is for single-label runs.

The numbers come from ``multilabel.report`` (per-class score histograms summed on the device:
mAP, per-class AP, ROC-AUC, precision / recall / F1 micro and macro, exact-match ratio and Hamming
loss at 0.5 and at the run's per-class thresholds, the tag probabilities' calibration); this
module adds the loss and renders the report as the training loop's line, scalars for
``metrics.jsonl``, ``report.md`` and the printed table. No plotting here (``plots.pr_curves`` and
``plots.reliability_diagram`` draw).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from imgcls_jax import intervals, label_issues, multilabel


def summarize(s: Mapping[str, np.ndarray], class_names: Sequence[str],
              thresholds: Sequence[float] | None = None) -> dict[str, Any]:
  """The full multi-label report (JSON-ready) from summed statistics (numpy)."""
  k = s['ml_pos'].shape[0]
  names = [str(c) for c in class_names]
  if len(names) != k:
    names = [str(i) for i in range(k)]
  n = int(s['ml_count'])
  if n == 0:
    raise ValueError('No examples were evaluated (count is 0).')
  rep = multilabel.report(s, names, thresholds)
  rep['task'] = 'multilabel'
  rep['loss'] = float(s['loss']) / n
  rep['thresholds_source'] = 'given' if thresholds is not None else '0.5 for every class'
  return rep


def at_fold_thresholds(rep: dict[str, Any], parts: Sequence[tuple[Any, Any, Any]]) -> None:
  """Makes a pooled report of folds that each decided at their own thresholds say so: its
  'at thresholds' figures count each fold's tags at that fold's thresholds (``parts``: each fold's
  ``(ml_pos, ml_neg, thresholds)``), as its exact match already does; each tag's threshold is
  the folds' mean."""
  m = multilabel.pooled_at_thresholds(parts)
  rep['at_thresholds'] = multilabel.summary(m, rep['at_thresholds']['exact_match'])
  mean = np.mean([np.asarray(t, np.float64) for _, _, t in parts], axis=0)
  for i, row in enumerate(rep['per_class']):
    row['at_thresholds'] = {key: float(m[key][i]) for key in ('precision', 'recall', 'f1')}
    row['threshold'] = float(mean[i])
  rep['thresholds'] = [float(t) for t in mean]
  rep['fold_thresholds'] = [[float(x) for x in t] for _, _, t in parts]
  rep['thresholds_source'] = "each fold's own (the mean per tag shown)"


def training_metrics(s: Mapping[str, np.ndarray],
                     thresholds: Sequence[float] | None = None) -> dict[str, Any]:
  """What the training loop logs per evaluation: mAP, F1, exact match (= ``accuracy``: sklearn's
  subset accuracy), Hamming loss, ROC-AUC, loss, ``count``."""
  n = int(s['ml_count'])
  if n == 0:
    return {'loss': float('nan'), 'map': float('nan'), 'accuracy': float('nan'), 'count': 0}
  rep = summarize(s, [str(i) for i in range(s['ml_pos'].shape[0])], thresholds)
  return {**scalars(rep), 'count': n}


SCALAR_KEYS = ('loss', 'map', 'roc_auc_macro', 'accuracy', 'exact_match_05', 'hamming_loss',
               'ece', 'ece_classwise') + tuple(
    f'{name}_{avg}{at}' for name in ('precision', 'recall', 'f1') for avg in ('micro', 'macro')
    for at in ('', '_05'))


def scalars(rep: Mapping[str, Any]) -> dict[str, float]:
  """The headline numbers as flat scalars (for metrics.jsonl, TensorBoard, CV means)."""
  def num(x: Any) -> float:
    return float('nan') if x is None else float(x)
  half, tuned = rep['at_0.5'], rep['at_thresholds']
  out = {'loss': float(rep['loss']), 'map': num(rep['mean_average_precision']),
         'roc_auc_macro': num(rep['roc_auc_macro']),
         'accuracy': num(tuned['exact_match']),          # exact match at the thresholds
         'exact_match_05': num(half['exact_match']),
         'hamming_loss': num(tuned['hamming_loss'])}
  for key in ('ece', 'ece_classwise'):   # the tag probabilities' calibration
    if key in rep:
      out[key] = num(rep[key])
  for name in ('precision', 'recall', 'f1'):
    for avg in ('micro', 'macro'):
      out[f'{name}_{avg}'] = num(tuned[f'{name}_{avg}'])
      out[f'{name}_{avg}_05'] = num(half[f'{name}_{avg}'])
  return out


def final_line(m: Mapping[str, Any]) -> str:
  """The training loop's closing summary of a multi-label run's last evaluation."""
  return (f'({m["count"]} examples): mAP {m["map"]:.4f}, F1 macro {m["f1_macro"]:.4f} / micro '
          f'{m["f1_micro"]:.4f}, exact match {m["accuracy"]:.2%}, loss {m["loss"]:.4f}')


def eval_line(m: Mapping[str, Any]) -> str:
  """One evaluation of a multi-label run, as the training loop prints it."""
  return (f'eval loss {m["loss"]:.4f}, mAP {m["map"]:.4f}, F1 macro {m["f1_macro"]:.4f} / '
          f'micro {m["f1_micro"]:.4f}, exact match {m["accuracy"]:.2%} on {m["count"]} examples')


def _f(x: Any, pct: bool = False) -> str:
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return '-'
  return f'{100 * x:.2f}%' if pct else f'{x:.4f}'


def headline(rep: Mapping[str, Any]) -> list[str]:
  """Three lines: mAP / ROC-AUC / loss, and the averages at 0.5 and at the thresholds."""
  ece = f", ECE {_f(rep['ece'])}" if 'ece' in rep else ''
  lines = [f"mAP {_f(rep['mean_average_precision'])}, micro AP "
           f"{_f(rep['average_precision_micro'])}, ROC-AUC (macro) {_f(rep['roc_auc_macro'])}, "
           f"loss {rep['loss']:.4f}{ece} ({rep['num_examples']} examples, "
           f"{rep['num_classes']} tags)"]
  for label, key in (('at 0.5', 'at_0.5'), ('at thresholds', 'at_thresholds')):
    a = rep[key]
    lines.append(f"{label:<14} F1 micro {_f(a['f1_micro'])} macro {_f(a['f1_macro'])}  "
                 f"precision micro {_f(a['precision_micro'])}  recall micro "
                 f"{_f(a['recall_micro'])}  exact match {_f(a['exact_match'], True)}  Hamming "
                 f"{_f(a['hamming_loss'])}")
  if 'intervals' in rep:
    lines.append(intervals.headline(rep['intervals']))
  return lines


def class_table(rep: Mapping[str, Any], max_rows: int | None = None) -> list[str]:
  """Per-tag rows (with ``max_rows``: the lowest AP first)."""
  rows = list(rep['per_class'])
  title = 'tag'
  if max_rows is not None and len(rows) > max_rows:
    rows = sorted(rows, key=lambda r: (r['average_precision'] or 0.0, r['class']))[:max_rows]
    title = f'tag ({max_rows} lowest AP of {len(rep["per_class"])})'
  width = max([len(title)] + [len(r['class']) for r in rows])
  out = [f'{title:<{width}}      AP  threshold  precision  recall      F1  support']
  for r in rows:
    t = r['at_thresholds']
    out.append(f"{r['class']:<{width}}  {_f(r['average_precision']):>6}  {r['threshold']:9.3f}  "
               f"{t['precision']:9.4f}  {t['recall']:6.4f}  {t['f1']:6.4f}  {r['support']:7d}")
  return out


def to_markdown(rep: Mapping[str, Any], title: str, context: Mapping[str, Any]) -> str:
  """The readable ``report.md`` of a multi-label evaluation."""
  md = [f'# {title}', '']
  md += [f'- {k}: {v}' for k, v in context.items()]
  md += ['', '## Summary', '', '| metric | value |', '|---|---|',
         f"| mAP (mean per-tag average precision) | {_f(rep['mean_average_precision'])} |",
         f"| micro-averaged AP | {_f(rep['average_precision_micro'])} |",
         f"| ROC-AUC (macro over tags) | {_f(rep['roc_auc_macro'])} |",
         f"| loss (binary cross-entropy per tag) | {rep['loss']:.4f} |",
         f"| examples | {rep['num_examples']} |", '',
         f"Thresholds: {rep.get('thresholds_source', '')}.", '',
         '| decision rule | F1 micro | F1 macro | precision micro | recall micro | precision macro '
         '| recall macro | exact match | Hamming loss |', '|---|---|---|---|---|---|---|---|---|']
  for label, key in (('0.5 for every tag', 'at_0.5'), ('per-tag thresholds', 'at_thresholds')):
    a = rep[key]
    md.append(f"| {label} | {_f(a['f1_micro'])} | {_f(a['f1_macro'])} | "
              f"{_f(a['precision_micro'])} | {_f(a['recall_micro'])} | "
              f"{_f(a['precision_macro'])} | {_f(a['recall_macro'])} | "
              f"{_f(a['exact_match'], True)} | {_f(a['hamming_loss'])} |")
  cal = 'calibration_bins' in rep
  md += ['', '## Per tag', '', '| tag | AP | ROC-AUC | threshold | precision | recall | F1 | '
         'F1 at 0.5 | support |' + (' ECE |' if cal else ''),
         '|---|---|---|---|---|---|---|---|---|' + ('---|' if cal else '')]
  for r in rep['per_class']:
    t, h = r['at_thresholds'], r['at_0.5']
    md.append(f"| {r['class']} | {_f(r['average_precision'])} | {_f(r['roc_auc'])} | "
              f"{r['threshold']:.3f} | {t['precision']:.4f} | {t['recall']:.4f} | {t['f1']:.4f} | "
              f"{h['f1']:.4f} | {r['support']} |" + (f" {_f(r.get('ece'))} |" if cal else ''))
  if 'intervals' in rep:
    md += intervals.markdown(rep['intervals'])
  if cal:
    md += ['', '## Calibration of the tag probabilities', '',
           f"Expected calibration error over every (example, tag) pair: {_f(rep['ece'])}; the "
           f"mean of the per-tag ECEs: {_f(rep['ece_classwise'])} ({len(rep['calibration_bins'])} "
           'equal-width probability bins; reliability.png). A well calibrated tagger labels a '
           'tag in about a fraction p of the pairs it scores p.', '',
           '| probability | pairs | mean probability | fraction labelled |', '|---|---|---|---|']
    md += [f"| {b['lower']:.2f}-{b['upper']:.2f} | {b['count']} | {_f(b['confidence'])} | "
           f"{_f(b['fraction_positive'])} |" for b in rep['calibration_bins']]
  if 'label_issues' in rep:
    md += label_issues.markdown(rep['label_issues'])
  return '\n'.join(md) + '\n'
