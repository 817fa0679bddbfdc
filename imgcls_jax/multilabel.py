"""Multi-label (tagging) evaluation from additive score histograms (exact-once evaluation).

The multi-hot counterpart of ``roc.py``. Per class k, ``sums`` counts the evaluated (example,
class) pairs whose sigmoid probability falls in each of ``bins`` equal-width bins of [0, 1],
separately for positive and negative pairs, plus the per-example counts that histograms cannot
give (exact matches of the whole tag set). Everything adds across batches, devices and processes;
no per-example scores are kept. The host functions derive from the summed counts:

* average precision per class and its mean (mAP): exactly
  ``sklearn.metrics.average_precision_score`` of the scores replaced by their bin; against the
  raw scores the difference comes only from pairs whose scores share a bin;
* ROC-AUC (``roc.auc``). AP and ROC-AUC (and the PR curves) read a second pair of histograms,
  ``ml_rank_pos`` / ``ml_rank_neg``, in ``roc.score_bin``'s finer bins: in the equal-width ones
  the many near-zero scores of a confident tagger tie with each other and with missed tags;
* precision / recall / F1 (per class, micro, macro; ``zero_division=0`` as sklearn) and Hamming
  loss at any per-class thresholds, and the per-class thresholds that maximise F1;
* the calibration of the tag probabilities (``calibration``: ECE pooled over the (example, tag)
  pairs and per class, from their own equal-width bins with float32 probability sums).

Thresholds are bin edges ``t = j / bins`` (others are snapped to the nearest edge). Bin ``b`` of a
probability ``p`` is the number of edges ``float32(j / bins)``, 0 < j < bins, with ``p >=`` edge:
``floor(p * bins)`` corrected by one where float32 rounding of the product crosses an edge (with
1000 bins it does at 22 edges, e.g. j = 17). So a host threshold ``j / bins``, which counts the
bins ``>= j``, means exactly ``p >= float32(j / bins)`` on the device, where the exact-match
counts use it; a threshold of 1 means "never positive" on both sides.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from imgcls_jax import reliability, roc
from imgcls_jax.errors import UserError

DEFAULT_BINS = roc.DEFAULT_BINS
STAT_KEYS = ('ml_pos', 'ml_neg', 'ml_exact_05', 'ml_exact_thr', 'ml_count')
_PR_CLASSES = 50   # classes whose precision-recall curves the report keeps (lowest AP first)


def _edge_index_device(thresholds_K: jax.Array, bins: int) -> jax.Array:
  return jnp.clip(jnp.round(thresholds_K.astype(jnp.float32) * bins), 0, bins).astype(jnp.int32)


def sums(probs_BxK: jax.Array, targets_BxK: jax.Array, mask_B: jax.Array,
         thresholds_K: jax.Array | None = None, bins: int = DEFAULT_BINS,
         calibration_bins: int = 0) -> dict[str, jax.Array]:
  """Masked additive counts of one (padded) batch; jit-friendly.

  ``targets_BxK`` is multi-hot (positive where > 0.5). ``ml_pos`` / ``ml_neg`` (int32 K x bins):
  positive / negative pairs by the bin of their probability; ``ml_exact_05`` / ``ml_exact_thr``:
  examples whose predicted tag set (``p >= threshold``) at 0.5 / at ``thresholds_K`` (default
  0.5) equals the true set; ``ml_count``: masked examples. With ``calibration_bins``, per class
  and equal-width confidence bin (binned as ``report.eval_sums`` bins the top-1 probability):
  ``ml_cal_count`` pairs, ``ml_cal_conf`` (float32) the sum of their probabilities and
  ``ml_cal_pos`` the positives among them, for the reliability of the tag probabilities.
  """
  k = probs_BxK.shape[-1]
  bin_BxK = roc.bin_index(probs_BxK, bins)
  w_B = mask_B.astype(jnp.int32)
  true_BxK = targets_BxK > 0.5
  pos_BxK = true_BxK.astype(jnp.int32) * w_B[:, None]
  neg_BxK = (~true_BxK).astype(jnp.int32) * w_B[:, None]
  cls_BxK = jnp.broadcast_to(jnp.arange(k), bin_BxK.shape)
  zero = jnp.zeros((k, bins), jnp.int32)
  if thresholds_K is None:
    thresholds_K = jnp.full((k,), 0.5, jnp.float32)
  j_K = _edge_index_device(jnp.asarray(thresholds_K), bins)
  j05 = _edge_index_device(jnp.float32(0.5), bins)
  exact05_B = jnp.all((bin_BxK >= j05) == true_BxK, axis=-1)
  exact_B = jnp.all((bin_BxK >= j_K[None, :]) == true_BxK, axis=-1)
  rank_BxK = roc.score_bin(probs_BxK)   # the finer bins that rank the scores (AP, ROC-AUC)
  zero_r = jnp.zeros((k, roc.ROC_BINS), jnp.int32)
  out = {'ml_pos': zero.at[cls_BxK, bin_BxK].add(pos_BxK),
         'ml_neg': zero.at[cls_BxK, bin_BxK].add(neg_BxK),
         'ml_rank_pos': zero_r.at[cls_BxK, rank_BxK].add(pos_BxK),
         'ml_rank_neg': zero_r.at[cls_BxK, rank_BxK].add(neg_BxK),
         'ml_exact_05': jnp.sum(exact05_B.astype(jnp.int32) * w_B),
         'ml_exact_thr': jnp.sum(exact_B.astype(jnp.int32) * w_B),
         'ml_count': jnp.sum(w_B)}
  if calibration_bins:
    p = probs_BxK.astype(jnp.float32)
    cal_BxK = reliability.bin_index(p, calibration_bins)
    zero_c = jnp.zeros((k, calibration_bins), jnp.int32)
    w_BxK = jnp.broadcast_to(w_B[:, None], p.shape)
    out.update({'ml_cal_count': zero_c.at[cls_BxK, cal_BxK].add(w_BxK),
                'ml_cal_conf': zero_c.astype(jnp.float32).at[cls_BxK, cal_BxK].add(
                    p * w_BxK.astype(jnp.float32)),
                'ml_cal_pos': zero_c.at[cls_BxK, cal_BxK].add(pos_BxK)})
  return out


# ----------------------------------------------------------------------------- host side (numpy)

def _hist(pos_KxB: np.ndarray, neg_KxB: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  pos = np.asarray(pos_KxB, np.float64)
  neg = np.asarray(neg_KxB, np.float64)
  if pos.ndim != 2 or pos.shape != neg.shape:
    raise ValueError(f'pos {pos.shape} and neg {neg.shape} must be equal K x bins histograms')
  return pos, neg


def edge_index(thresholds_K: Any, num_classes: int, bins: int) -> np.ndarray:
  """The nearest bin edge ``j`` (0 .. bins) of each threshold (a scalar applies to every class)."""
  t = np.asarray(thresholds_K, np.float64)
  t = np.full(num_classes, t) if t.ndim == 0 else t
  if t.shape != (num_classes,):
    raise UserError(f'{t.size} thresholds were given for {num_classes} classes; give one '
                    'threshold per class (in class order).')
  if not np.all((t >= 0) & (t <= 1)):
    raise UserError('Multi-label thresholds must lie in [0, 1]; fix the thresholds given.')
  return roc.nearest_edge(t, bins)


def _div(a: Any, b: Any) -> np.ndarray:
  """a / b, 0 where b == 0 (sklearn's zero_division=0)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.divide(a, b, out=np.zeros(np.broadcast(a, b).shape), where=b != 0)


def average_precision(pos_KxB: np.ndarray, neg_KxB: np.ndarray) -> np.ndarray:
  """Average precision per class (NaN where a class has no positives): the mean, over positives,
  of the precision at the threshold of their bin (sklearn's step-wise AP, ties by bin)."""
  pos, neg = _hist(pos_KxB, neg_KxB)
  pos, neg = pos[:, ::-1], neg[:, ::-1]                     # highest bin first
  tp, fp = np.cumsum(pos, axis=1), np.cumsum(neg, axis=1)
  total = pos.sum(axis=1)
  ap = np.sum(pos * _div(tp, tp + fp), axis=1)
  return np.where(total > 0, ap / np.where(total > 0, total, 1), np.nan)


def mean_average_precision(pos_KxB: np.ndarray, neg_KxB: np.ndarray) -> float:
  """mAP: the mean AP over the classes that have positives (NaN if none has)."""
  ap = average_precision(pos_KxB, neg_KxB)
  return float(np.nanmean(ap)) if not np.isnan(ap).all() else float('nan')


def at_thresholds(pos_KxB: np.ndarray, neg_KxB: np.ndarray, thresholds_K: Any) -> dict[str, Any]:
  """Counts and metrics with class k predicted where its bin >= ``j_k`` (``thresholds_K`` snapped
  to bin edges ``j_k / bins``): per-class ``tp/fp/fn/support/precision/recall/f1`` arrays, their
  micro and macro averages (macro over all K classes), and the Hamming loss (FP + FN) / (N K)."""
  pos, neg = _hist(pos_KxB, neg_KxB)
  k, bins = pos.shape
  j = edge_index(thresholds_K, k, bins)
  tp = roc.at_or_above(pos)[np.arange(k), j]
  fp = roc.at_or_above(neg)[np.arange(k), j]
  n = float(pos[0].sum() + neg[0].sum()) if k else 0.0
  return {'thresholds': j / bins, **_of_counts(tp, fp, pos.sum(axis=1), n)}


def pooled_at_thresholds(parts: Sequence[tuple[Any, Any, Any]]) -> dict[str, Any]:
  """``at_thresholds`` of parts (e.g. the folds of a cross-validation) that each decide at their
  own thresholds: ``(pos_KxB, neg_KxB, thresholds_K)`` each, its counts summed over the parts."""
  got = [at_thresholds(pos, neg, t) for pos, neg, t in parts]
  return _of_counts(*(sum(g[key] for g in got) for key in ('tp', 'fp', 'support', 'num_examples')))


def _of_counts(tp: np.ndarray, fp: np.ndarray, support: np.ndarray, n: float) -> dict[str, Any]:
  k = len(tp)
  fn = support - tp
  precision, recall, f1 = _div(tp, tp + fp), _div(tp, support), _div(2 * tp, 2 * tp + fp + fn)
  stp, sfp, sfn = tp.sum(), fp.sum(), fn.sum()
  return {
      'tp': tp, 'fp': fp, 'fn': fn, 'support': support,
      'precision': precision, 'recall': recall, 'f1': f1,
      'precision_micro': float(_div(stp, stp + sfp)), 'recall_micro': float(_div(stp, stp + sfn)),
      'f1_micro': float(_div(2 * stp, 2 * stp + sfp + sfn)),
      'precision_macro': float(precision.mean()), 'recall_macro': float(recall.mean()),
      'f1_macro': float(f1.mean()),
      'hamming_loss': float(_div(sfp + sfn, n * k)), 'num_examples': int(n),
  }


def f1_by_threshold(pos_KxB: np.ndarray, neg_KxB: np.ndarray) -> np.ndarray:
  """K x (bins + 1): F1 of class k with threshold ``j / bins`` in column j (0 without positives)."""
  pos, neg = _hist(pos_KxB, neg_KxB)
  tp, fp = roc.at_or_above(pos), roc.at_or_above(neg)
  return _div(2 * tp, tp + fp + pos.sum(axis=1, keepdims=True))   # 2TP / (2TP + FP + FN)


def choose_thresholds(pos_KxB: np.ndarray, neg_KxB: np.ndarray) -> np.ndarray:
  """Per class, the bin edge ``j / bins`` with the highest F1 on these counts (e.g. a validation
  split); ties go to the edge closest to 0.5 (then the lower one); without positives, 0.5."""
  pos, _ = _hist(pos_KxB, neg_KxB)
  bins = pos.shape[1]
  f1 = f1_by_threshold(pos_KxB, neg_KxB)        # equal rationals divide to equal floats: exact ties
  j = np.arange(bins + 1)
  out = np.full(len(f1), 0.5)
  for c in range(len(f1)):
    if pos[c].sum() == 0:
      continue
    best = j[f1[c] == f1[c].max()]
    out[c] = best[np.lexsort((best, np.abs(2 * best - bins)))[0]] / bins
  return out


def pr_curves(pos_KxB: np.ndarray, neg_KxB: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(precision, recall), each K x (bins + 1), from the highest threshold (nothing predicted:
  precision 1, recall 0) down to the lowest (everything predicted). Sum the histograms over
  classes (``pos.sum(0, keepdims=True)``) for the micro-averaged curve."""
  pos, neg = _hist(pos_KxB, neg_KxB)
  tp = np.concatenate([np.zeros((len(pos), 1)), np.cumsum(pos[:, ::-1], axis=1)], axis=1)
  fp = np.concatenate([np.zeros((len(neg), 1)), np.cumsum(neg[:, ::-1], axis=1)], axis=1)
  precision = np.where(tp + fp > 0, _div(tp, tp + fp), 1.0)
  return precision, _div(tp, tp[:, -1:])


def calibration(s: Mapping[str, Any]) -> dict[str, Any] | None:
  """The reliability of the tag probabilities from ``ml_cal_*`` (None without them): ``ece``
  pooled over every (example, tag) pair, ``ece_classwise`` (the mean of the per-class ECEs,
  ``ece_per_class``) and the pooled bins (lower, upper, count, confidence: the mean probability,
  fraction_positive: the share of those pairs whose tag is labelled)."""
  if 'ml_cal_count' not in s:
    return None
  count = np.asarray(s['ml_cal_count'], np.float64)
  conf = np.asarray(s['ml_cal_conf'], np.float64)
  pos = np.asarray(s['ml_cal_pos'], np.float64)
  per_example = count.sum(axis=1)                     # every class sees every example
  gap = np.abs(pos - conf).sum(axis=1)
  per_class = np.where(per_example > 0, gap / np.where(per_example > 0, per_example, 1), np.nan)
  ece, rows = reliability.table(count.sum(0), conf.sum(0), pos.sum(0), 'fraction_positive')
  return {'ece': _num(ece),
          'ece_classwise': _num(np.nanmean(per_class)) if not np.isnan(per_class).all() else None,
          'ece_per_class': per_class, 'bins': rows}


# ----------------------------------------------------------------------------- the report

def _num(x: Any) -> float | None:
  x = float(x)
  return None if np.isnan(x) else x


def summary(m: Mapping[str, Any], exact: float | None) -> dict[str, Any]:
  """The averages of ``at_thresholds`` and the exact-match rate, as a report gives them."""
  return {'precision_micro': m['precision_micro'], 'recall_micro': m['recall_micro'],
          'f1_micro': m['f1_micro'], 'precision_macro': m['precision_macro'],
          'recall_macro': m['recall_macro'], 'f1_macro': m['f1_macro'],
          'exact_match': exact, 'hamming_loss': m['hamming_loss']}


def _curve(precision: np.ndarray, recall: np.ndarray) -> dict[str, list[float]]:
  """The points where a curve turns, rounded to 6 decimals."""
  pts = np.stack([precision, recall], 1)
  keep = np.ones(len(pts), bool)
  keep[1:] = np.any(np.diff(pts, axis=0) != 0, axis=1)
  return {'precision': [round(float(x), 6) for x in pts[keep, 0]],
          'recall': [round(float(x), 6) for x in pts[keep, 1]]}


def report(sums: Mapping[str, Any], class_names: Sequence[str],
           thresholds: Any = None) -> dict[str, Any]:
  """The multi-label report (JSON-ready; None for undefined values) from summed ``sums``.

  ``thresholds`` (per class, default 0.5) must be those the device used for ``ml_exact_thr``.
  """
  s = {k: np.asarray(v) for k, v in sums.items()}
  pos, neg = _hist(s['ml_pos'], s['ml_neg'])
  k, bins = pos.shape
  names = [str(c) for c in class_names]
  if len(names) != k:
    raise UserError(f'{len(names)} class names were given for {k} classes; give one name per '
                    'class of the model.')
  thresholds = 0.5 if thresholds is None else thresholds
  count = int(s['ml_count'])
  # The ranking figures from the ROC bins (roc.score_bin), the thresholded ones from the
  # threshold bins: the many near-zero scores of a confident tagger tie in one threshold bin.
  rpos, rneg = (_hist(s['ml_rank_pos'], s['ml_rank_neg']) if 'ml_rank_pos' in s else (pos, neg))
  ap = average_precision(rpos, rneg)
  aucs = roc.auc(rpos, rneg)
  half, tuned = at_thresholds(pos, neg, 0.5), at_thresholds(pos, neg, thresholds)
  micro_ap = average_precision(rpos.sum(0, keepdims=True), rneg.sum(0, keepdims=True))[0]
  cal = calibration(s)
  rows = []
  for i in range(k):
    rows.append({'class': names[i], 'support': int(half['support'][i]),
                 'average_precision': _num(ap[i]), 'roc_auc': _num(aucs[i]),
                 'threshold': float(tuned['thresholds'][i]),
                 'at_0.5': {m: float(half[m][i]) for m in ('precision', 'recall', 'f1')},
                 'at_thresholds': {m: float(tuned[m][i]) for m in ('precision', 'recall', 'f1')},
                 **({'ece': _num(cal['ece_per_class'][i])} if cal else {})})
  precision, recall = pr_curves(rpos, rneg)
  order = [int(i) for i in np.argsort(np.where(np.isnan(ap), np.inf, ap), kind='stable')
           if not np.isnan(ap[i])][:_PR_CLASSES]
  mp, mr = pr_curves(rpos.sum(0, keepdims=True), rneg.sum(0, keepdims=True))
  return {
      'num_examples': count, 'num_classes': k, 'class_names': names,
      'mean_average_precision': _num(mean_average_precision(rpos, rneg)),
      'average_precision_micro': _num(micro_ap),
      'roc_auc_macro': None if np.isnan(aucs).all() else float(np.nanmean(aucs)),
      'at_0.5': summary(half, float(s['ml_exact_05']) / count if count else None),
      'at_thresholds': summary(tuned, float(s['ml_exact_thr']) / count if count else None),
      'thresholds': [float(t) for t in tuned['thresholds']],
      'per_class': rows,
      'pr_curves': [{'class': names[i], 'ap': float(ap[i]), **_curve(precision[i], recall[i])}
                    for i in sorted(order)],
      'pr_curve_micro': ({'ap': float(micro_ap), **_curve(mp[0], mr[0])}
                         if not np.isnan(micro_ap) else None),
      **({'ece': cal['ece'], 'ece_classwise': cal['ece_classwise'],
          'calibration_bins': cal['bins']} if cal else {}),
  }
