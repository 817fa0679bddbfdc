"""Confidence intervals of the evaluation report's headline metrics (single-label; the tagging
report's are computed by ``intervals_multilabel`` and rendered here too).

- top-1 accuracy: the exact (Clopper-Pearson) interval of a binomial proportion
  (``scipy.stats.binomtest``);
- top-1 accuracy, macro F1 and balanced accuracy: a percentile bootstrap over the examples
  (``scipy.stats.bootstrap``). These metrics see an example only as its (true, predicted) pair,
  and the confusion matrix counts exactly those pairs, so resampling the pairs it holds is
  resampling the examples: no per-example record is needed, and the intervals come from the same
  summed statistics as the report. The statistic is vectorised: one ``bincount`` turns a batch of
  resamples into a batch of confusion matrices.

``paired_differences`` bootstraps the difference between two runs' metrics on the same examples
(``--mode=compare``), each example keeping its label and both predictions.

The intervals describe the uncertainty from the finite eval split (another sample of images from
the same distribution), not the run-to-run spread of training (seeds), which needs several runs.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from imgcls_jax.errors import UserError

def settings(evaluate: Any, min_resamples: int = 0, why: str = '') -> tuple[float, int]:
  """(level, resamples) from a ``config.evaluate`` section, or a UserError naming the key."""
  level = float(evaluate.get('confidence_level', 0.95))
  resamples = evaluate.get('bootstrap_resamples', 1000)
  if not 0 < level < 1:
    raise UserError(f'config.evaluate.confidence_level={level} must be between 0 and 1 '
                    '(e.g. 0.95).')
  if not isinstance(resamples, int) or resamples < min_resamples:
    raise UserError(f'{why}config.evaluate.bootstrap_resamples={resamples!r} must be a whole '
                    f'number >= {min_resamples}' + (' (0: only the exact top-1 interval).'
                                                    if min_resamples == 0 else ' (e.g. 1000).'))
  return level, resamples


MAX_CELLS = 4_000_000   # resample-batch x max(examples, K x K): the statistic's working set


def confusion_metrics(confusion_BxKxK: np.ndarray) -> np.ndarray:
  """``3 x B``: top-1 accuracy, macro F1 (over the classes present in labels or predictions, as
  scikit-learn's default) and balanced accuracy (mean recall over the classes in the labels)."""
  cm = confusion_BxKxK.astype(np.float64)
  tp = np.diagonal(cm, axis1=1, axis2=2)
  support, predicted = cm.sum(axis=2), cm.sum(axis=1)
  n = cm.sum(axis=(1, 2))
  f1 = np.divide(2 * tp, support + predicted, out=np.zeros_like(tp), where=support + predicted > 0)
  recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
  present, labelled = (support + predicted) > 0, support > 0
  return np.stack([tp.sum(1) / n, (f1 * present).sum(1) / present.sum(1),
                   (recall * labelled).sum(1) / labelled.sum(1)])


def clopper_pearson(successes: int, trials: int, level: float = 0.95) -> list[float]:
  """The exact (Clopper-Pearson) interval ``[low, high]`` of a proportion (``scipy.stats``)."""
  import scipy.stats  # here: ~1.6 s of imports every training run would otherwise pay at start-up
  ci = scipy.stats.binomtest(int(successes), int(trials)).proportion_ci(confidence_level=level,
                                                                        method='exact')
  return [float(ci.low), float(ci.high)]


def report_intervals(confusion_KxK: np.ndarray, *, level: float = 0.95, resamples: int = 1000,
                     seed: int = 0) -> dict[str, Any]:
  """The ``intervals`` entry of the report: ``[low, high]`` for each metric at ``level``."""
  import scipy.stats  # here: ~1.6 s of imports every training run would otherwise pay at start-up
  cm = np.asarray(confusion_KxK, np.int64)
  k, n = cm.shape[0], int(cm.sum())
  correct = int(np.trace(cm))
  out: dict[str, Any] = {'level': level, 'examples': n,
                         'accuracy_exact': clopper_pearson(correct, n, level)}
  if resamples <= 0 or n < 2:
    return out
  true_N, pred_N = np.divmod(np.repeat(np.arange(k * k), cm.ravel()), k)

  def statistic(t: np.ndarray, p: np.ndarray, axis: int = -1) -> np.ndarray:
    codes = np.moveaxis(t * k + p, axis, -1)
    batch_shape = codes.shape[:-1]
    codes = codes.reshape(-1, codes.shape[-1])
    b = len(codes)
    counts = np.bincount((codes + (np.arange(b) * k * k)[:, None]).ravel(), minlength=b * k * k)
    return confusion_metrics(counts.reshape(b, k, k)).reshape((3,) + batch_shape)

  res = scipy.stats.bootstrap((true_N, pred_N), statistic, paired=True, vectorized=True,
                              n_resamples=resamples, confidence_level=level, method='percentile',
                              batch=max(1, MAX_CELLS // max(n, k * k)),
                              rng=np.random.default_rng(seed))
  low, high = res.confidence_interval
  out.update({'method': f'percentile bootstrap over the examples, {resamples} resamples, '
                        f'seed {seed}',
              'resamples': resamples})
  for i, name in enumerate(('accuracy', 'f1_macro', 'balanced_accuracy')):
    out[name] = [float(low[i]), float(high[i])]
  return out


def _span(name: str, iv: Any) -> str:
  return f'{name} {100 * iv[0]:.2f}-{100 * iv[1]:.2f}%'


# The metrics a report's intervals may hold (single-label; multi-label: intervals_multilabel).
_BOOTSTRAPPED = (('accuracy', 'top-1 accuracy'), ('map', 'mAP'), ('f1_macro', 'macro F1'),
                 ('balanced_accuracy', 'balanced accuracy'), ('exact_match', 'exact match'))


def _exact(intervals: dict[str, Any]) -> tuple[str, list[float]]:
  """(label, interval) of the proportion with an exact interval: top-1 or exact match."""
  if 'exact_match_exact' in intervals:
    return 'exact match', intervals['exact_match_exact']
  return 'top-1 accuracy', intervals['accuracy_exact']


def headline(intervals: dict[str, Any]) -> str:
  """One line for the printed table."""
  label, iv = _exact(intervals)
  parts = [_span(label.replace(' accuracy', ''), iv) + ' (exact)']
  parts += [_span(label, intervals[key]) for key, label in _BOOTSTRAPPED
            if key in intervals and key not in ('accuracy', 'exact_match')]
  return f"{100 * intervals['level']:g}% intervals: " + ', '.join(parts)


def markdown(intervals: dict[str, Any]) -> list[str]:
  """The report.md section."""
  label, iv = _exact(intervals)
  rows = [(f'{label} (Clopper-Pearson, exact)', iv)]
  rows += [(label + ' (bootstrap)', intervals[key]) for key, label in _BOOTSTRAPPED
           if key in intervals]
  md = ['', '## Confidence intervals', '',
        f"{100 * intervals['level']:g}% intervals from the {intervals['examples']} evaluated "
        'examples' + (f" ({intervals['method']})" if 'method' in intervals else '') + '. They '
        'cover the sampling of the eval split, not the spread between training runs (seeds).', '',
        '| metric | low | high |', '|---|---|---|']
  return md + [f'| {label} | {100 * lo:.2f}% | {100 * hi:.2f}% |' for label, (lo, hi) in rows]


def paired_differences(true_N: np.ndarray, pred_a_N: np.ndarray, pred_b_N: np.ndarray,
                       num_classes: int, *, level: float = 0.95, resamples: int = 1000,
                       seed: int = 0) -> dict[str, list[float]]:
  """Percentile-bootstrap intervals of ``metric(B) - metric(A)`` for top-1 accuracy, macro F1 and
  balanced accuracy, resampling the examples (each keeps its label and both predictions)."""
  import scipy.stats
  k = num_classes

  def statistic(t: np.ndarray, a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    t, a, b = (np.moveaxis(x, axis, -1) for x in (t, a, b))
    batch_shape = t.shape[:-1]
    t, a, b = (x.reshape(-1, x.shape[-1]) for x in (t, a, b))
    offsets = (np.arange(len(t)) * k * k)[:, None]

    def metrics_of(p: np.ndarray) -> np.ndarray:
      counts = np.bincount((t * k + p + offsets).ravel(), minlength=len(t) * k * k)
      return confusion_metrics(counts.reshape(len(t), k, k))

    return (metrics_of(b) - metrics_of(a)).reshape((3,) + batch_shape)

  n = max(len(true_N), 1)
  res = scipy.stats.bootstrap((true_N, pred_a_N, pred_b_N), statistic, paired=True,
                              vectorized=True, n_resamples=resamples, confidence_level=level,
                              method='percentile', batch=max(1, MAX_CELLS // max(2 * n, k * k)),
                              rng=np.random.default_rng(seed))
  low, high = res.confidence_interval
  return {name: [float(low[i]), float(high[i])]
          for i, name in enumerate(('accuracy', 'f1_macro', 'balanced_accuracy'))}
