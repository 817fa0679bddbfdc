"""Confidence intervals of a multi-label (tagging) evaluation (``report_intervals``: the report's
``intervals``) and paired ones for two runs on the same examples (``paired_differences``:
``--mode=compare``): mAP, macro F1 at a run's own thresholds and exact match (the whole tag set
right).

A bootstrap resample is a vector of weights (each example's count in it), so every metric is
computed from weighted sums: average precision from cumulative sums over each class's scores,
sorted once for all resamples; the same numbers as scikit-learn's ``average_precision_score`` with
those counts as ``sample_weight`` (``weighted_average_precision``; tests check it). The percentile
intervals come from ``scipy.stats.bootstrap`` resampling the example indices, as
``intervals.paired_differences`` does for single-label runs.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np

from imgcls_jax import intervals
from imgcls_jax.intervals import MAX_CELLS

METRICS = ('map', 'f1_macro', 'exact_match')
MAX_WORK = 2_000_000_000   # resamples x examples x classes a bootstrap may take (~1 min here)


def too_much_work(examples: int, classes: int, resamples: int, runs: int = 1) -> str:
  """'' when a bootstrap of this size fits ``MAX_WORK``, else the sentence that says it is
  skipped and how to get it."""
  work = examples * classes * resamples * runs
  if work <= MAX_WORK:
    return ''
  return (f'The bootstrap intervals are skipped: {examples} examples x {classes} tags x '
          f'{resamples} resamples is more than {MAX_WORK:.0e} steps; lower '
          'config.evaluate.bootstrap_resamples or evaluate a slice of the split.')


class _Sorted:
  """One class's scores sorted once (descending), with the last index of each run of equal scores:
  average precision has one point per distinct score, as scikit-learn's curve."""

  def __init__(self, y_N: np.ndarray, s_N: np.ndarray):
    self.order = np.argsort(-np.asarray(s_N, np.float64), kind='stable').astype(np.int32)
    s = np.asarray(s_N)[self.order]
    self.y = np.asarray(y_N, bool)[self.order]
    self.ends = np.flatnonzero(np.r_[s[1:] != s[:-1], True])

  def ap(self, w_RxN: np.ndarray) -> np.ndarray:
    """R average precisions (NaN where a resample holds no positive)."""
    w = w_RxN[:, self.order]
    tp = np.cumsum(np.where(self.y, w, 0.0), axis=1, dtype=np.float64)[:, self.ends]
    seen = np.cumsum(w, axis=1, dtype=np.float64)[:, self.ends]
    positives = tp[:, -1:]
    precision = np.divide(tp, seen, out=np.zeros_like(tp), where=seen > 0)
    recall = np.divide(tp, positives, out=np.zeros_like(tp), where=positives > 0)
    ap = np.sum(np.diff(recall, axis=1, prepend=0.0) * precision, axis=1)
    return np.where(positives[:, 0] > 0, ap, np.nan)


def weighted_average_precision(y_N: Any, s_N: Any, w_RxN: Any) -> np.ndarray:
  """Average precision of scores ``s_N`` for binary labels ``y_N`` under each row of weights
  ``w_RxN`` (scikit-learn's ``average_precision_score(y, s, sample_weight=w)``; NaN for a row
  with no positive weight)."""
  return _Sorted(np.asarray(y_N), np.asarray(s_N)).ap(np.atleast_2d(np.asarray(w_RxN, np.float64)))


class _Run:
  """One run's scores on the split, prepared for any number of weightings."""

  def __init__(self, labels_NxK: np.ndarray, probs_NxK: np.ndarray, thresholds_K: np.ndarray):
    y = np.asarray(labels_NxK, bool)
    pred = np.asarray(probs_NxK, np.float32) >= np.asarray(thresholds_K, np.float32)  # as served
    self.sorted = [_Sorted(y[:, k], probs_NxK[:, k]) for k in range(y.shape[1])]
    # float32 0/1 (exact: weighted counts stay below 2**24 for splits under 16M examples)
    self.tp, self.fp = (pred & y).astype(np.float32), (pred & ~y).astype(np.float32)
    self.fn = (~pred & y).astype(np.float32)
    self.exact = np.all(pred == y, axis=1).astype(np.float32)

  def metrics(self, w_RxN: np.ndarray) -> np.ndarray:
    """3 x R: mAP (over the classes with positives, as the report), macro F1 (over every class,
    0 where undefined, as scikit-learn's ``zero_division=0``) and exact match."""
    aps = np.stack([s.ap(w_RxN) for s in self.sorted])                     # K x R
    has = ~np.isnan(aps)
    mean_ap = np.divide(np.where(has, aps, 0.0).sum(0), has.sum(0),
                        out=np.full(w_RxN.shape[0], np.nan), where=has.sum(0) > 0)
    w = w_RxN.astype(np.float32)
    tp, fp, fn = (np.asarray(w @ m, np.float64) for m in (self.tp, self.fp, self.fn))   # R x K
    f1 = np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros_like(tp), where=2 * tp + fp + fn > 0)
    return np.stack([mean_ap, f1.mean(1), np.asarray(w @ self.exact, np.float64) / w_RxN.sum(1)])


def point_metrics(labels_NxK: Any, probs_NxK: Any, thresholds_K: Any) -> dict[str, float]:
  """``METRICS`` of one run on every example once."""
  run = _Run(labels_NxK, np.asarray(probs_NxK), thresholds_K)
  m = run.metrics(np.ones((1, len(run.exact))))[:, 0]
  return {name: float(m[i]) for i, name in enumerate(METRICS)}


def report_intervals(exact_right: int, examples: int, outcomes: Any = None, *,
                     level: float = 0.95, resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
  """The multi-label report's ``intervals``: exact match's exact (Clopper-Pearson) interval from
  the summed counts, and with ``outcomes`` (an ``outcomes.TagOutcomes``: every example's tags
  and probabilities) percentile-bootstrap intervals of ``METRICS`` over the examples."""
  out: dict[str, Any] = {'level': level, 'examples': int(examples),
                         'exact_match_exact': intervals.clopper_pearson(exact_right, examples,
                                                                        level)}
  if outcomes is None or resamples <= 0 or examples < 2:
    return out
  import scipy.stats
  skipped = too_much_work(int(examples), outcomes.probs.shape[1], resamples)
  if skipped:
    logging.warning(skipped)
    return out
  run = _Run(outcomes.labels, np.asarray(outcomes.probs), outcomes.thresholds)
  n = len(run.exact)

  def statistic(idx: np.ndarray, axis: int = -1) -> np.ndarray:
    idx = np.moveaxis(idx, axis, -1)
    batch_shape = idx.shape[:-1]
    return run.metrics(_weights(idx.reshape(-1, n))).reshape((len(METRICS),) + batch_shape)

  res = scipy.stats.bootstrap((np.arange(n),), statistic, vectorized=True,
                              n_resamples=resamples, confidence_level=level, method='percentile',
                              batch=max(1, MAX_CELLS // (2 * max(n, 1))),
                              rng=np.random.default_rng(seed))
  low, high = res.confidence_interval
  out.update({'method': f'percentile bootstrap over the examples, {resamples} resamples, '
                        f'seed {seed}', 'resamples': resamples})
  out.update({name: [float(low[i]), float(high[i])] for i, name in enumerate(METRICS)})
  return out


def _weights(idx_RxN: np.ndarray) -> np.ndarray:
  """Each resample's count of every example (R x N, float32: exact below 2**24)."""
  r, n = idx_RxN.shape
  counts = np.bincount((idx_RxN + (np.arange(r) * n)[:, None]).ravel(), minlength=r * n)
  return counts.reshape(r, n).astype(np.float32)


def paired_differences(labels_NxK: Any, probs_a: Any, thresholds_a: Any, probs_b: Any,
                       thresholds_b: Any, *, level: float = 0.95, resamples: int = 1000,
                       seed: int = 0) -> dict[str, list[float]]:
  """Percentile-bootstrap intervals of ``metric(B) - metric(A)`` for ``METRICS``, resampling the
  examples (each keeps its tags and both runs' probabilities)."""
  import scipy.stats
  a = _Run(labels_NxK, np.asarray(probs_a), thresholds_a)
  b = _Run(labels_NxK, np.asarray(probs_b), thresholds_b)
  n = len(a.exact)

  def statistic(idx: np.ndarray, axis: int = -1) -> np.ndarray:
    idx = np.moveaxis(idx, axis, -1)
    batch_shape = idx.shape[:-1]
    w = _weights(idx.reshape(-1, n))
    return (b.metrics(w) - a.metrics(w)).reshape((len(METRICS),) + batch_shape)

  res = scipy.stats.bootstrap((np.arange(n),), statistic, vectorized=True,
                              n_resamples=resamples, confidence_level=level, method='percentile',
                              batch=max(1, MAX_CELLS // (4 * max(n, 1))),
                              rng=np.random.default_rng(seed))
  low, high = res.confidence_interval
  return {name: [float(low[i]), float(high[i])] for i, name in enumerate(METRICS)}
