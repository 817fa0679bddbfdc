"""Out-of-distribution images (``--mode=evaluate --config.evaluate.ood_inputs=PATHS``): how well
the run's scores tell the evaluated split from images of none of its classes.

Two views of the same pass (``outcomes.ood_pass``; single-label; several processes each score
their part of the images, the figures are the whole set's):

* the top-1 probability's histogram (``selective``'s bins, the rule the run's abstention threshold
  uses): its ROC-AUC, and the share of the images still answered where 95% of the split is and at
  the run's own threshold (``summary``'s top level: the maximum-softmax-probability baseline,
  Hendrycks & Gimpel, 2017);
* per image, three scores of the same forward pass (test-time views and temperature included),
  each higher for images like the training classes (``SCORES``): the top-1 probability, the
  log-sum-exp of the logits (minus the energy score, Liu et al., 2020) and the largest logit
  (Hendrycks et al., 2022), each with its exact ROC-AUC and the share of the images at or above
  the score that keeps 95% of the split (the false-positive rate at 95% true positives, FPR95).
  Which one separates best depends on the model and the images: the report measures it.

The gate for prediction (``config.evaluate.unknown_keep``, fitted with the temperature on
``config.evaluate.temperature_split``, ``held_out_fits.fit_temperature``): the log-sum-exp of the
(tempered) logits that keeps that share of the held-out split (``fit_gate``); predict, serve and
export then mark an image below it ``unknown`` (``gate``), whatever its top-1 probability.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from imgcls_jax import roc, selective
from imgcls_jax.errors import UserError

# (key, what the report calls it); the keys of Outcomes.scores plus 'msp' (p_predicted).
SCORES = (('msp', 'top-1 probability'),
          ('logsumexp', 'log-sum-exp of the logits (energy)'),
          ('max_logit', 'largest logit'))
TPR = 0.95   # the share of the split kept by the threshold each score's FPR is read at


def auroc(split: np.ndarray, ood: np.ndarray) -> float:
  """The probability that a split image scores above an out-of-distribution one, ties half (the
  Mann-Whitney U statistic over both sets' ranks)."""
  import scipy.stats  # here, not at import: ~1.6 s that training's start-up does not need
  split, ood = np.asarray(split, np.float64), np.asarray(ood, np.float64)
  ranks = scipy.stats.rankdata(np.concatenate([split, ood]))
  n, m = len(split), len(ood)
  return float((ranks[:n].sum() - n * (n + 1) / 2) / (n * m))


def keeping(scores: np.ndarray, share: float) -> float:
  """The highest threshold at which at least ``share`` of ``scores`` are at or above it (the
  ``k``-th highest score, ``k / n >= share`` as sklearn's ``roc_curve`` compares)."""
  n = len(scores)
  k = int(np.flatnonzero(np.arange(1, n + 1) / n >= share)[0]) + 1
  return float(np.sort(np.asarray(scores))[::-1][k - 1])


def at_tpr(split: np.ndarray, ood: np.ndarray, tpr: float = TPR) -> dict[str, float]:
  """``keeping``'s threshold for ``tpr`` of the split, and the shares of the split and of the
  images at or above it there."""
  split, ood = np.asarray(split), np.asarray(ood)
  t = keeping(split, tpr)
  return {'threshold': t, 'answered_split': float(np.mean(split >= t)),
          'answered_ood': float(np.mean(ood >= t))}


def detectors(split_scores: Mapping[str, np.ndarray],
              ood_scores: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
  """Per score of ``SCORES`` both sets have: ROC-AUC and ``at_tpr``, in ``SCORES``' order."""
  return [{'score': key, 'name': name, 'auroc': auroc(split_scores[key], ood_scores[key]),
           'at_95': at_tpr(split_scores[key], ood_scores[key])}
          for key, name in SCORES if key in split_scores and key in ood_scores]


def summary(right: np.ndarray, wrong: np.ndarray, ood: np.ndarray,
            min_confidence: float | None = None,
            split_scores: Mapping[str, np.ndarray] | None = None,
            ood_scores: Mapping[str, np.ndarray] | None = None, *,
            gate_record: Mapping[str, Any] | None = None, tta: str = '') -> dict[str, Any]:
  """How the top-1 probability separates the evaluated split (``right`` + ``wrong``: its
  histograms) from the images (``ood``: theirs): ``auroc`` (``roc.auc`` of the histograms, ties
  within a bin half); ``at_95``: the share of them still answered at the strictest edge that
  answers 95% of the split; with the run's threshold, the share of each answered there. With
  per-image scores of both: ``detectors`` (``detectors``; under the test-time views ``tta``) and
  the ``best`` score's key, and with the run's gate (``gate_record``: ``fit_gate``'s), the share
  of each kept by it (``at_unknown_below``; of the ``gate`` scores: one view, as prediction
  scores)."""
  split_hist = np.asarray(right, np.int64) + np.asarray(wrong, np.int64)
  ood = np.asarray(ood, np.int64)
  bins = len(ood)
  kept, kept_ood = selective.tail(split_hist), selective.tail(ood)
  n, n_ood = int(kept[0]), int(kept_ood[0])
  j95 = int(np.flatnonzero(kept >= TPR * n - 1e-9)[-1])
  out: dict[str, Any] = {
      'examples': n_ood, 'auroc': float(roc.auc(split_hist[None], ood[None])[0]),
      'at_95': {'threshold': j95 / bins, 'answered_split': float(kept[j95]) / n,
                'answered_ood': float(kept_ood[j95]) / n_ood}}
  if min_confidence:
    j = selective.edge(min_confidence, bins)
    out['at_min_confidence'] = {'threshold': j / bins, 'answered_split': float(kept[j]) / n,
                                'answered_ood': float(kept_ood[j]) / n_ood}
  if split_scores is not None and ood_scores is not None:
    out['detectors'] = detectors(split_scores, ood_scores)
    out['tta'] = tta or 'none'
    if out['detectors']:
      out['best'] = max(out['detectors'], key=lambda d: d['auroc'])['score']
    if gate_record and 'gate' in split_scores and 'gate' in ood_scores:
      t = np.float32(gate_record['below'])
      out['at_unknown_below'] = {
          'threshold': float(t), 'keep': gate_record.get('keep'),
          'split': gate_record.get('split'),
          'answered_split': float(np.mean(np.asarray(split_scores['gate']) >= t)),
          'answered_ood': float(np.mean(np.asarray(ood_scores['gate']) >= t))}
  return out


def _pct(x: float) -> str:
  return f'{100 * x:.2f}%'


def lines(o: Mapping[str, Any]) -> list[str]:
  """The out-of-distribution section of report.md."""
  rows = [('top-1 probability keeping 95% of the split', o['at_95'], 3)]
  if 'at_min_confidence' in o:
    rows.append(("the run's abstention threshold (top-1 probability)", o['at_min_confidence'], 3))
  if 'at_unknown_below' in o:
    g = o['at_unknown_below']
    fitted = (f", fitted to keep {_pct(g['keep'])} of '{g['split']}'" if g.get('split') else '')
    rows.append((f"the run's unknown-input gate (log-sum-exp of the logits, one view as predict "
                 f'and serve score{fitted})', g, 4))
  md = ['', '## Out-of-distribution images', '',
        f"{o['examples']} images of none of the classes (config.evaluate.ood_inputs) against the "
        "split's images. By their top-1 probability, in the 1,000 bins of the abstention "
        f"threshold: ROC-AUC {o['auroc']:.4f} (1 = every one scored below every split image, "
        '0.5 = no separation).', '',
        '| kept at or above | split images kept | out-of-distribution images kept (lower is '
        'better) |', '|---|---|---|']
  md += [f"| {name}: {r['threshold']:.{digits}f} | {_pct(r['answered_split'])} | "
         f"{_pct(r['answered_ood'])} |" for name, r, digits in rows]
  if o.get('detectors'):
    views = ('' if o.get('tta', 'none') == 'none' else
             f" under the evaluation's test-time views ('{o['tta']}'; predict and serve score one "
             'view)')
    md += ['', f'Per image, by score (the higher, the more like the classes; exact ranks, no '
               f'bins){views}:', '',
           '| score | ROC-AUC | out-of-distribution images kept at the score that keeps 95% of '
           'the split (FPR95; lower is better) |', '|---|---|---|']
    md += [f"| {d['name']}{' (best ROC-AUC)' if d['score'] == o.get('best') else ''} | "
           f"{d['auroc']:.4f} | {_pct(d['at_95']['answered_ood'])} |" for d in o['detectors']]
  return md


def headline(o: Mapping[str, Any]) -> str:
  """The printed line of ``--mode=evaluate``."""
  line = (f"out-of-distribution: {o['examples']} images, ROC-AUC {o['auroc']:.4f}; "
          f"{o['at_95']['answered_ood']:.2%} of them answered where 95% of the split is")
  best = next((d for d in o.get('detectors', ()) if d['score'] == o.get('best')), None)
  if best is not None:
    line += (f"; best score per image: {best['name']}, ROC-AUC {best['auroc']:.4f}, FPR95 "
             f"{best['at_95']['answered_ood']:.2%}")
  if 'at_unknown_below' in o:
    g = o['at_unknown_below']
    line += (f"; the run's unknown-input gate keeps {g['answered_split']:.2%} of the split and "
             f"{g['answered_ood']:.2%} of them")
  return line


def keep_target(evaluate: Any) -> float:
  """``config.evaluate.unknown_keep`` (0 = no gate), or a UserError naming a bad value."""
  value = (evaluate.get('unknown_keep', 0.0) if evaluate is not None else 0.0) or 0.0
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
    raise UserError(f'config.evaluate.unknown_keep={value!r} must be the share of the held-out '
                    'split to keep as known, in (0, 1), e.g. 0.99, or 0 for no unknown-input '
                    'gate.')
  return float(value)


def energy(logits_NxK: np.ndarray) -> np.ndarray:
  """The gate's score of each row of logits (float32 N): their log-sum-exp, computed in float64
  on the host, so the fit, predict and serve compute it alike."""
  z = np.asarray(logits_NxK, np.float64)
  m = z.max(axis=-1, keepdims=True)
  with np.errstate(invalid='ignore', over='ignore'):   # infinite logits: NaN, unknown
    return (m[..., 0] + np.log(np.exp(z - m).sum(axis=-1))).astype(np.float32)


def fit_gate(scores: np.ndarray, keep: float, split: str) -> dict[str, Any]:
  """The record of a threshold at which at least ``keep`` of ``split``'s ``scores`` (``energy``;
  NaN: never kept) are at or above it: ``below`` (an image scoring below it is unknown), the
  share ``kept`` there, and what it was fitted on. The threshold lies halfway (in float32)
  between the lowest kept score and the next one down, so that a held-out image rarely sits on it,
  where another device's rounding of a logit could move it across (it does when the two are
  adjacent float32 values, or no finite score lies below). A UserError where no finite threshold
  keeps ``keep`` (non-finite scores)."""
  scores = np.asarray(scores, np.float32)
  if not len(scores):
    raise UserError(f"No unknown-input gate can be fitted on the empty split '{split}'; give a "
                    'held-out split with examples (config.evaluate.temperature_split).')
  ranked = np.sort(np.where(np.isnan(scores), -np.inf, scores))[::-1]
  t = keeping(ranked, keep)
  k = int(np.searchsorted(-ranked, -t, side='right'))   # the images at or above t
  if k < len(ranked) and np.isfinite(ranked[k]):
    t = float(np.float32((np.float64(t) + np.float64(ranked[k])) / 2))
  kept = float(np.mean(scores >= np.float32(t)))
  if not np.isfinite(t) or kept < keep:
    bad = int((~np.isfinite(scores)).sum())
    raise UserError(f"No unknown-input gate keeps {keep:.2%} of '{split}': {bad} of its "
                    f'{len(scores)} scores are not finite (the logits are NaN or infinite); fix '
                    'the model (e.g. retrain with a lower learning rate), or lower '
                    'config.evaluate.unknown_keep.')
  return {'score': 'logsumexp', 'below': t, 'keep': float(keep), 'kept': kept, 'split': split,
          'examples': int(len(scores))}


def gate(logits_K: np.ndarray, below: float) -> dict[str, Any]:
  """One single-label answer's gate fields: ``unknown`` when its ``energy`` is below the run's
  threshold, the score, and the threshold."""
  score = energy(np.asarray(logits_K)[None])[0]
  return {'unknown': not bool(score >= np.float32(below)),   # NaN: unknown
          'logsumexp': float(score) if np.isfinite(score) else None,   # valid JSON
          'unknown_below': float(below)}
