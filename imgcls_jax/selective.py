"""Selective prediction: answering only when the top-1 probability reaches a threshold, and
abstaining otherwise (the classifier says "not sure" instead of guessing).

``sums`` counts the evaluated examples by the bin of their top-1 probability (the served one:
after the run's temperature), separately for right and wrong top-1 answers: two additive
histograms of ``bins`` equal-width bins of [0, 1] (``sel_right`` / ``sel_wrong``), summed like the
rest of ``report.eval_sums`` across batches, devices and processes. Thresholds are the bin edges
``t = j / bins``, with ``roc.bin_index``'s rule: an example is answered when ``p >=
float32(j / bins)``, exactly as ``answered`` decides on the host and the histograms count on the
device. From the histograms, exactly at those edges:

* ``summary``: the accuracy among the answered examples at a given coverage (the share answered),
  and the highest coverage at a given accuracy (the risk-coverage trade-off), plus the run's own
  threshold's coverage and accuracy when it has one;
* ``fit``: the lowest threshold at which the answers on a held-out split are at least a target
  accuracy right with confidence: the low end of the exact binomial (Clopper-Pearson) interval
  of their accuracy reaches it (``config.evaluate.abstain_accuracy``; fitted with the
  temperature on ``config.evaluate.temperature_split``, ``held_out_fits.fit_temperature``); predict,
  serve and export then mark every answer below it as abstained.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from imgcls_jax import intervals, roc
from imgcls_jax.errors import UserError

BINS = roc.DEFAULT_BINS
COVERAGES = (0.99, 0.95, 0.9, 0.8, 0.5)        # the report's accuracy-at-coverage rows
ACCURACIES = (0.95, 0.98, 0.99, 0.995, 0.999)  # its coverage-at-accuracy rows


def abstain_target(evaluate: Any) -> float:
  """``config.evaluate.abstain_accuracy`` (0 = none), or a UserError naming a bad value."""
  value = (evaluate.get('abstain_accuracy', 0.0) if evaluate is not None else 0.0) or 0.0
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
    raise UserError(f'config.evaluate.abstain_accuracy={value!r} must be a target accuracy in '
                    '(0, 1], e.g. 0.99, or 0 for no abstention threshold.')
  return float(value)


def sums(probs_BxK: jax.Array, labels_B: jax.Array, mask_B: jax.Array,
         bins: int = BINS) -> dict[str, jax.Array]:
  """``sel_right`` / ``sel_wrong`` (int32, bins): masked counts of right / wrong top-1 answers by
  the bin of their top-1 probability."""
  bin_B = roc.bin_index(jnp.max(probs_BxK, axis=-1), bins)
  right_B = (jnp.argmax(probs_BxK, axis=-1) == labels_B.astype(jnp.int32))
  w = mask_B.astype(jnp.int32)
  zero = jnp.zeros((bins,), jnp.int32)
  return {'sel_right': zero.at[bin_B].add(right_B * w),
          'sel_wrong': zero.at[bin_B].add((1 - right_B.astype(jnp.int32)) * w)}


def answered(p_top1: Any, min_confidence: float) -> np.ndarray:
  """Whether each top-1 probability reaches the threshold (float32, as the device compares)."""
  return np.asarray(p_top1, np.float32) >= np.float32(min_confidence)


def tail(counts: np.ndarray) -> np.ndarray:
  """Length bins + 1: column j = the count in bins >= j (answered at threshold j / bins)."""
  return roc.at_or_above(np.asarray(counts, np.int64)[None])[0]


def _kept(right: np.ndarray, wrong: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(answered, answered right), each of length bins + 1: column j = threshold j / bins."""
  right = np.asarray(right, np.int64)
  return tail(right + np.asarray(wrong, np.int64)), tail(right)


def _row(kept: np.ndarray, hit: np.ndarray, j: int, n: int, bins: int) -> dict[str, Any]:
  return {'threshold': j / bins, 'coverage': float(kept[j]) / n, 'answered': int(kept[j]),
          'accuracy': float(hit[j]) / kept[j] if kept[j] else None}


def _lowest_reaching(kept: np.ndarray, hit: np.ndarray, accuracy: float) -> int | None:
  """The lowest edge whose answered examples (at least one) are at least ``accuracy`` right."""
  ok = np.flatnonzero((kept > 0) & (hit >= accuracy * kept - 1e-9))
  return int(ok[0]) if len(ok) else None


def summary(right: np.ndarray, wrong: np.ndarray,
            min_confidence: float | None = None) -> dict[str, Any]:
  """The risk-coverage rows of the report (see the module docstring); ``min_confidence``: the
  run's own threshold (None: it has none)."""
  bins = len(right)
  kept, hit = _kept(right, wrong)
  n = int(kept[0])
  if n == 0:
    raise ValueError('No examples were evaluated (count is 0).')
  at_coverage = []
  for c in COVERAGES:   # the highest threshold that still answers at least c of the examples
    j = int(np.flatnonzero(kept >= c * n - 1e-9)[-1])
    at_coverage.append({'coverage_target': c, **_row(kept, hit, j, n, bins)})
  at_accuracy = []
  for a in ACCURACIES:
    j = _lowest_reaching(kept, hit, a)
    at_accuracy.append({'accuracy_target': a, **(_row(kept, hit, j, n, bins) if j is not None
                                                  else {'threshold': None, 'coverage': 0.0,
                                                        'answered': 0, 'accuracy': None})})
  turns = np.flatnonzero(np.diff(kept[::-1], prepend=-1) != 0)   # from the highest edge down
  edges = (bins - turns)[kept[bins - turns] > 0]                 # where the answered set grows
  out: dict[str, Any] = {'bins': bins, 'accuracy_at_coverage': at_coverage,
                         'coverage_at_accuracy': at_accuracy,
                         'curve': {'threshold': [float(j / bins) for j in edges],
                                   'coverage': [round(float(kept[j]) / n, 6) for j in edges],
                                   'accuracy': [round(float(hit[j] / kept[j]), 6)
                                                for j in edges]}}
  if min_confidence:
    j = edge(min_confidence, bins)
    out['at_min_confidence'] = _row(kept, hit, j, n, bins)
  return out


def edge(min_confidence: float, bins: int = BINS) -> int:
  """The bin edge ``j`` of a threshold (thresholds are fitted on edges; others are rounded)."""
  return int(roc.nearest_edge(min_confidence, bins))


def _lower_bounds(kept: np.ndarray, hit: np.ndarray, level: float) -> np.ndarray:
  """Per edge, the low end of the exact (Clopper-Pearson) ``level`` interval of the answers'
  accuracy (-1 where nothing is answered)."""
  import scipy.stats  # here: not at import (start-up time of every run)
  kept, hit = np.asarray(kept, np.float64), np.asarray(hit, np.float64)
  with np.errstate(invalid='ignore', divide='ignore'):
    lo = scipy.stats.beta.ppf((1 - level) / 2, hit, kept - hit + 1)
  return np.where(kept > 0, np.where(hit > 0, np.nan_to_num(lo), 0.0), -1.0)


def fit(right: np.ndarray, wrong: np.ndarray, target: float, split: str,
        confidence_level: float = 0.95) -> dict[str, Any] | None:
  """The record ``min_confidence`` of the lowest threshold at which the answers on the held-out
  ``split`` are at least ``target`` right with confidence: the low end of their accuracy's exact
  ``confidence_level`` interval reaches it (so a few lucky answers promise nothing). None where
  no threshold does."""
  bins = len(right)
  kept, hit = _kept(right, wrong)
  ok = np.flatnonzero(_lower_bounds(kept, hit, confidence_level) >= target - 1e-12)
  if not len(ok):
    return None
  j = int(ok[0])
  return {'min_confidence': j / bins, 'target_accuracy': float(target), 'split': split,
          'examples': int(kept[0]), 'answered': int(kept[j]), 'coverage': float(kept[j]) / kept[0],
          'accuracy': float(hit[j]) / kept[j],
          'accuracy_interval': intervals.clopper_pearson(int(hit[j]), int(kept[j]),
                                                         confidence_level),
          'confidence_level': float(confidence_level)}


def best_possible(right: np.ndarray, wrong: np.ndarray, confidence_level: float = 0.95) -> str:
  """Why no threshold reached a target: the best the split can promise."""
  kept, hit = _kept(right, wrong)
  lo = _lower_bounds(kept, hit, confidence_level)
  if not (kept > 0).any():
    return 'the split has no examples'
  j = int(np.argmax(lo))
  return (f'at best, its {int(kept[j])} answers with a top-1 probability >= {j / len(right):.3f} '
          f'are {float(hit[j]) / kept[j]:.2%} right, {lo[j]:.2%} at the low end of the exact '
          f'{confidence_level:.0%} interval')


def _pct(x: float | None) -> str:
  return '-' if x is None else f'{100 * x:.2f}%'


def markdown(sel: Mapping[str, Any], tta: str = 'none') -> list[str]:
  """The report's "Selective prediction" section (``tta``: the evaluation's test-time views)."""
  views = ('' if tta in ('', 'none', None) else
           f" These rows are of the test-time-augmented probabilities (TTA '{tta}'); predict and "
           'serve answer without TTA, as the run\'s threshold was fitted.')
  md = ['', '## Selective prediction (abstaining below a confidence threshold)', '',
        'Answering only when the top-1 probability reaches a threshold; the rest are abstained '
        f"on (thresholds on {sel['bins']} equal-width bins).{views}", '',
        '| target | threshold | coverage (answered) | accuracy of the answers |',
        '|---|---|---|---|']
  for r in sel['accuracy_at_coverage']:
    md.append(f"| coverage >= {_pct(r['coverage_target'])} | {r['threshold']:.3f} | "
              f"{_pct(r['coverage'])} ({r['answered']}) | {_pct(r['accuracy'])} |")
  for r in sel['coverage_at_accuracy']:
    t = '-' if r['threshold'] is None else f"{r['threshold']:.3f}"
    md.append(f"| accuracy >= {_pct(r['accuracy_target'])} | {t} | "
              f"{_pct(r['coverage'])} ({r['answered']}) | {_pct(r['accuracy'])} |")
  if 'at_min_confidence' in sel:
    r = sel['at_min_confidence']
    md.append(f"| the run's threshold | {r['threshold']:.3f} | {_pct(r['coverage'])} "
              f"({r['answered']}) | {_pct(r['accuracy'])} |")
  return md


def headline(sel: Mapping[str, Any]) -> str:
  """One line for the evaluate mode's output."""
  if 'at_min_confidence' in sel:
    r = sel['at_min_confidence']
    return (f"abstaining below {r['threshold']:.3f}: {_pct(r['coverage'])} answered, "
            f"{_pct(r['accuracy'])} of them right")
  r = next((r for r in sel['accuracy_at_coverage'] if r['coverage_target'] == 0.9), None)
  return ('' if r is None else f"answering the 90% most confident: {_pct(r['accuracy'])} right "
          f"(top-1 probability >= {r['threshold']:.3f})")
