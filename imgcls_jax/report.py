"""The evaluation report: additive statistics on the device, every metric derived from them on the host.

``eval_sums`` turns a batch of logits into masked *sums* (loss, top-1 / top-5 hits, the confusion
matrix, calibration-bin sums). Sums add across batches, devices and processes, so a split of any
size is reduced on the device and only ``K x K + 3 x bins`` numbers reach the host; padded rows
(``mask`` False) add nothing. ``summarize`` derives the report from the summed statistics:

* top-1, top-5 (reported when there are more than 5 classes), mean cross-entropy loss;
* per-class precision, recall, F1 and support, and their macro and support-weighted averages (as
  ``sklearn.metrics.precision_recall_fscore_support(..., zero_division=0)``: the averages run over
  the classes that occur in the labels or the predictions, ``macro_avg_classes`` of them, each
  flagged ``in_macro_avg`` in ``per_class``);
* the confusion matrix (rows: true class, columns: predicted class) and the most confused pairs;
* expected calibration error of the top-1 confidence over equal-width bins (sklearn's
  ``calibration_curve`` binning: bin ``b`` holds confidences in ``(b/n, (b+1)/n]``, the first also 0);
* for rare classes (medical imaging): balanced accuracy (mean per-class recall), per-class
  sensitivity and specificity, the confusion matrix normalised by true class, and one-vs-rest
  ROC-AUC per class and macro-averaged (``roc.py``: from score histograms, no per-example scores).

No TensorFlow, no plotting here (``plots.py`` draws the report; ``report_text.py`` writes it as
text).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from imgcls_jax import configlib, reliability, report_multilabel, roc, selective

DEFAULT_CALIBRATION_BINS = 15
TOP5_MIN_CLASSES = 5   # top-5 accuracy is reported only with more classes than this (else 1)
STAT_KEYS = ('loss', 'correct', 'correct_top5', 'count', 'confusion', 'bin_count',
             'bin_confidence', 'bin_correct')
OPTIONAL_STAT_KEYS = ('roc_pos', 'roc_neg', 'sel_right', 'sel_wrong')   # absent from
                                                   # statistics summed elsewhere


def eval_sums(logits_BxK: jax.Array, labels_B: jax.Array, mask_B: jax.Array,
                num_bins: int = DEFAULT_CALIBRATION_BINS) -> dict[str, jax.Array]:
  """Masked sums over one (padded) batch; jit-friendly, no host work.

  ``logits_BxK`` may be any log-probabilities up to a per-row constant (e.g. averaged TTA
  log-probabilities). Counts are int32 (exact); loss and confidence sums are float32.
  """
  num_classes = logits_BxK.shape[-1]
  log_probs = jax.nn.log_softmax(logits_BxK.astype(jnp.float32), axis=-1)
  labels = labels_B.astype(jnp.int32)
  w_int = mask_B.astype(jnp.int32)
  w = mask_B.astype(jnp.float32)
  loss_B = -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
  pred_B = jnp.argmax(log_probs, axis=-1).astype(jnp.int32)
  hit_B = (pred_B == labels)
  k = min(5, num_classes)
  hit5_B = jnp.any(jax.lax.top_k(log_probs, k)[1] == labels[:, None], axis=-1)
  conf_B = jnp.exp(jnp.max(log_probs, axis=-1))
  bin_B = reliability.bin_index(conf_B, num_bins)
  return {
      'loss': jnp.sum(loss_B * w),
      'correct': jnp.sum(hit_B * w_int),
      'correct_top5': jnp.sum(hit5_B * w_int),
      'count': jnp.sum(w_int),
      'confusion': jnp.zeros((num_classes, num_classes), jnp.int32).at[labels, pred_B].add(w_int),
      'bin_count': jnp.zeros((num_bins,), jnp.int32).at[bin_B].add(w_int),
      'bin_confidence': jnp.zeros((num_bins,), jnp.float32).at[bin_B].add(conf_B * w),
      'bin_correct': jnp.zeros((num_bins,), jnp.int32).at[bin_B].add(hit_B * w_int),
      **roc.sums(jnp.exp(log_probs), labels, mask_B),
      **selective.sums(jnp.exp(log_probs), labels, mask_B),
  }


_HOST_ROWS = 1024   # sums_of_scores pads its rows to a multiple of this: one program per bucket
_jit_eval_sums = jax.jit(eval_sums, static_argnames='num_bins')


def sums_of_scores(scores_NxK: np.ndarray, labels_N: np.ndarray,
                   num_bins: int = DEFAULT_CALIBRATION_BINS) -> dict[str, np.ndarray]:
  """``eval_sums`` of class scores held on the host (a classical model's, a k-NN's), as
  ``stats_to_numpy`` gives them: one compiled program, its rows padded with masked-out rows to a
  multiple of 1,024, so that every fold and split of a size bucket runs the same program (run
  eagerly, each of ``eval_sums``' ~80 ops compiled on its own: ~4 s per call on 2 cores)."""
  num_bins = configlib.calibration_bins(num_bins)
  scores_NxK, labels_N = np.asarray(scores_NxK, np.float32), np.asarray(labels_N)
  n, k = scores_NxK.shape
  rows = -(-max(n, 1) // _HOST_ROWS) * _HOST_ROWS
  scores = np.zeros((rows, k), np.float32)
  scores[:n] = scores_NxK
  labels = np.zeros((rows,), np.int32)
  labels[:n] = labels_N
  mask = np.arange(rows) < n
  return stats_to_numpy(_jit_eval_sums(scores, labels, mask, num_bins=num_bins))


def add(a: Mapping[str, Any] | None, b: Mapping[str, Any]) -> dict[str, Any]:
  """``a + b`` key by key (``a`` may be None: the first batch)."""
  if a is None:
    return dict(b)
  return {k: a[k] + b[k] for k in b}


def stats_to_numpy(stats: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Fetched statistics as float64 / int64 numpy arrays (sums of several runs stay exact)."""
  out = {}
  for k in stats:
    v = np.asarray(jax.device_get(stats[k]))
    out[k] = v.astype(np.int64) if np.issubdtype(v.dtype, np.integer) else v.astype(np.float64)
  return out


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
  num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
  return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def per_class(confusion_KxK: np.ndarray) -> dict[str, np.ndarray]:
  """precision, recall, f1, support (each length K) from a confusion matrix (zero_division=0)."""
  cm = np.asarray(confusion_KxK, np.int64)
  tp = np.diag(cm).astype(np.float64)
  support = cm.sum(axis=1)
  predicted = cm.sum(axis=0)
  precision = _safe_div(tp, predicted)
  recall = _safe_div(tp, support)
  f1 = _safe_div(2 * tp, support + predicted)  # == 2PR / (P + R), and 0 where undefined
  return {'precision': precision, 'recall': recall, 'f1': f1, 'support': support}


def averaged_classes(confusion_KxK: np.ndarray) -> np.ndarray:
  """Which classes (bool K) the macro averages run over: those with an example or a prediction
  (sklearn's default label set; ``labels=`` these indices gives the same averages). A class with
  neither has no precision, recall or F1 to average."""
  cm = np.asarray(confusion_KxK)
  return (cm.sum(axis=1) + cm.sum(axis=0)) > 0


def averages(confusion_KxK: np.ndarray) -> dict[str, dict[str, float]]:
  """Macro and support-weighted precision / recall / F1 over ``averaged_classes``: the classes
  seen in labels or predictions (sklearn's default label set)."""
  pc = per_class(confusion_KxK)
  present = averaged_classes(confusion_KxK)
  support = pc['support'].astype(np.float64)
  out: dict[str, dict[str, float]] = {'macro': {}, 'weighted': {}}
  for name in ('precision', 'recall', 'f1'):
    values = pc[name]
    out['macro'][name] = float(values[present].mean()) if present.any() else 0.0
    out['weighted'][name] = (float(np.sum(values * support) / support.sum())
                             if support.sum() > 0 else 0.0)
  return out


def calibration(stats: Mapping[str, np.ndarray]) -> tuple[float, list[dict[str, float]]]:
  """(expected calibration error, per-bin rows: lower, upper, count, confidence, accuracy)."""
  return reliability.table(stats['bin_count'], stats['bin_confidence'], stats['bin_correct'])


def most_confused(confusion_KxK: np.ndarray, class_names: Sequence[str],
                  top: int = 10) -> list[dict[str, Any]]:
  """The ``top`` largest off-diagonal cells: true class, predicted class, count, share of the true
  class's examples. Ties go to the lower (true, predicted) index."""
  cm = np.asarray(confusion_KxK, np.int64)
  off = cm.copy()
  np.fill_diagonal(off, 0)
  flat = np.argsort(-off.ravel(), kind='stable')[:max(top, 0)]
  support = cm.sum(axis=1)
  pairs = []
  for idx in flat:
    t, p = divmod(int(idx), cm.shape[1])
    if off[t, p] == 0:
      break
    pairs.append({'true': class_names[t], 'predicted': class_names[p], 'true_index': t,
                  'predicted_index': p, 'count': int(off[t, p]),
                  'rate': float(off[t, p] / support[t])})
  return pairs


def summarize(stats: Mapping[str, Any], class_names: Sequence[str],
              top_confused: int = 10, thresholds: Sequence[float] | None = None,
              min_confidence: float | None = None) -> dict[str, Any]:
  """The full report (JSON-ready) from summed ``eval_sums`` (multi-label statistics:
  ``report_multilabel.summarize`` at ``thresholds``). ``min_confidence``: the run's abstention
  threshold (``selective.py``), reported with the risk-coverage rows."""
  s = stats_to_numpy(stats)
  if 'ml_pos' in s:
    return report_multilabel.summarize(s, class_names, thresholds)
  cm = s['confusion']
  num_classes = cm.shape[0]
  names = [str(c) for c in class_names]
  if len(names) != num_classes:
    names = [str(i) for i in range(num_classes)]
  n = int(s['count'])
  if n == 0:
    raise ValueError('No examples were evaluated (count is 0).')
  pc = per_class(cm)
  avg = averages(cm)
  ece, bins = calibration(s)
  report: dict[str, Any] = {
      'num_examples': n,
      'num_classes': num_classes,
      'accuracy': float(s['correct']) / n,
      'loss': float(s['loss']) / n,
  }
  if num_classes > TOP5_MIN_CLASSES:
    report['accuracy_top5'] = float(s['correct_top5']) / n
  specificity = _safe_div(n - cm.sum(axis=0) - cm.sum(axis=1) + np.diag(cm),
                          n - cm.sum(axis=1))          # TN / (TN + FP) per class
  present = pc['support'] > 0
  averaged = averaged_classes(cm)
  aucs = (roc.auc(s['roc_pos'], s['roc_neg']) if 'roc_pos' in s
          else np.full(num_classes, np.nan))
  report.update({
      # Mean recall over the classes present in the labels (sklearn's balanced_accuracy_score).
      'balanced_accuracy': float(pc['recall'][present].mean()),
      'macro_avg': avg['macro'],
      'weighted_avg': avg['weighted'],
      'macro_avg_classes': int(averaged.sum()),   # of num_classes: those per_class flags
      'ece': ece,
      'per_class': [{'class': names[i], 'precision': float(pc['precision'][i]),
                     'recall': float(pc['recall'][i]), 'f1': float(pc['f1'][i]),
                     'support': int(pc['support'][i]), 'sensitivity': float(pc['recall'][i]),
                     'specificity': float(specificity[i]),
                     'roc_auc': None if np.isnan(aucs[i]) else float(aucs[i]),
                     # False: no example and no prediction, so no figure above is defined
                     # (they read 0) and the macro averages leave the class out
                     'in_macro_avg': bool(averaged[i])}
                    for i in range(num_classes)],
      'most_confused': most_confused(cm, names, top_confused),
      'calibration_bins': bins,
      'class_names': names,
      'confusion_matrix': cm.tolist(),
      'confusion_matrix_normalized': _safe_div(cm, cm.sum(axis=1, keepdims=True)).tolist(),
  })
  if not np.isnan(aucs).all():
    report['roc_auc_macro'] = float(np.nanmean(aucs))
    report['roc_curves'] = _roc_curves(s, aucs, names)
  if 'sel_right' in s:
    report['selective'] = selective.summary(s['sel_right'], s['sel_wrong'], min_confidence)
  return report


_ROC_CLASSES = 10   # classes whose curves the report keeps (the lowest ROC-AUC first)


def _roc_curves(s: Mapping[str, np.ndarray], aucs: np.ndarray,
                names: Sequence[str]) -> list[dict[str, Any]]:
  """One-vs-rest ROC curves of up to ``_ROC_CLASSES`` classes (lowest AUC first), as the points
  where the curve turns."""
  fpr, tpr = roc.curves(s['roc_pos'], s['roc_neg'])
  order = [int(i) for i in np.argsort(np.where(np.isnan(aucs), np.inf, aucs), kind='stable')
           if not np.isnan(aucs[i])][:_ROC_CLASSES]
  out = []
  for i in sorted(order):
    pts = np.stack([fpr[i], tpr[i]], 1)
    keep = np.ones(len(pts), bool)
    keep[1:] = np.any(np.diff(pts, axis=0) != 0, axis=1)
    out.append({'class': names[i], 'auc': float(aucs[i]),
                'fpr': [round(float(x), 6) for x in pts[keep, 0]],
                'tpr': [round(float(x), 6) for x in pts[keep, 1]]})
  return out


SCALAR_KEYS = ('accuracy', 'accuracy_top5', 'loss', 'ece', 'balanced_accuracy', 'roc_auc_macro',
               'precision_macro', 'recall_macro', 'f1_macro', 'precision_weighted',
               'recall_weighted', 'f1_weighted')


def eval_metric_names(multilabel: bool) -> tuple[str, ...]:
  """The names ``training_eval_metrics`` gives each evaluation during training (what
  ``config.checkpoint.best_metric`` may name)."""
  return (report_multilabel.SCALAR_KEYS if multilabel else SCALAR_KEYS) + ('count',)


def scalars(report: Mapping[str, Any]) -> dict[str, float]:
  """The report's headline numbers as flat scalars (for metrics.jsonl, TensorBoard, CV means)."""
  if report.get('task') == 'multilabel':
    return report_multilabel.scalars(report)
  out = {k: float(report[k]) for k in ('accuracy', 'accuracy_top5', 'loss', 'ece',
                                       'balanced_accuracy', 'roc_auc_macro') if k in report}
  for avg in ('macro', 'weighted'):
    for name, value in report[f'{avg}_avg'].items():
      out[f'{name}_{avg}'] = float(value)
  return out


def training_eval_metrics(stats: Mapping[str, Any],
                          thresholds: Sequence[float] | None = None) -> dict[str, Any]:
  """What the training loop logs at each evaluation: the report's scalars plus ``count``.

  ``accuracy_top5`` is always present here (1.0 when there are 5 classes or fewer), as the loop
  prints it. Multi-label statistics give ``report_multilabel.training_metrics`` instead (at the
  per-class ``thresholds`` the eval step used; None = 0.5).
  """
  s = stats_to_numpy(stats)
  if 'ml_pos' in s:
    return report_multilabel.training_metrics(s, thresholds)
  n = int(s['count'])
  if n == 0:
    return {'loss': float('nan'), 'accuracy': float('nan'), 'accuracy_top5': float('nan'),
            'count': 0}
  rep = summarize(s, [str(i) for i in range(s['confusion'].shape[0])], top_confused=0)
  out: dict[str, Any] = scalars(rep)
  out['accuracy_top5'] = float(s['correct_top5']) / n
  out['count'] = n
  return out
