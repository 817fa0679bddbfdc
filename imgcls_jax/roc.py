"""One-vs-rest ROC curves and ROC-AUC from additive score histograms (exact-once evaluation).

Per class k, ``sums`` counts the evaluated examples whose probability of k falls in each bin,
separately for positives (label k) and negatives. The counts add across batches, devices and
processes like the rest of ``report.eval_sums``, so no per-example scores are kept. ``auc`` is then
exactly ``sklearn.metrics.roc_auc_score`` of the scores replaced by their bin (pairs in one bin
count half, as sklearn counts ties); against the raw scores it differs only by pairs whose scores
share a bin.

The bins (``score_bin``) are equal steps of ``1000 p + 50 logit(p)``: at most 0.001 wide in
probability and 0.02 in log-odds. Equal-width probability bins alone (0.001) put most negatives
of a confident model into the lowest bin (p < 0.001), where they all tie with each other and with
any positive scored as low: a 10-class Fashion-MNIST classifier's macro AUC read 0.965 against
0.980 on its raw scores. ``bin_index`` (equal-width probability bins) stays the binning of the
thresholds that ``multilabel.py`` and ``selective.py`` choose.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_BINS = 1000
# The ROC bins: 1000 per unit of probability plus 50 per unit of log-odds over [-46, 18] (float32
# probabilities: exp(-46) ~ 1e-20; below 1, the log-odds reach ~16.6, and p = 1 counts as 18).
_PER_PROB, _PER_LOGIT, _LOGIT_LOW, _LOGIT_HIGH = 1000, 50, -46.0, 18.0
ROC_BINS = _PER_PROB + int(_PER_LOGIT * (_LOGIT_HIGH - _LOGIT_LOW))   # 4,200


def bin_index(probs: jax.Array, bins: int = DEFAULT_BINS) -> jax.Array:
  """The bin (int32, 0 .. bins - 1) of each probability: how many of the edges
  ``float32(j / bins)``, 0 < j < bins, it reaches. That is ``floor(p * bins)`` corrected by one
  where float32 rounding of the product crosses an edge (with 1000 bins it does at 22 edges, e.g.
  j = 17), so a threshold ``j / bins`` on the host means exactly ``p >= float32(j / bins)``."""
  p = probs.astype(jnp.float32)
  edges = jnp.asarray(np.arange(bins + 1) / bins, jnp.float32)    # float32(j / bins), j = 0..bins
  b = jnp.clip(jnp.floor(p * bins), 0, bins - 1).astype(jnp.int32)
  b = b - (p < edges[b]).astype(jnp.int32) + (p >= edges[b + 1]).astype(jnp.int32)
  return jnp.clip(b, 0, bins - 1)


def nearest_edge(thresholds: Any, bins: int = DEFAULT_BINS) -> np.ndarray:
  """The nearest bin edge ``j`` (0 .. bins) of each threshold in [0, 1], in float32 as on the
  device, so that host and device snap even a midway threshold to the same edge."""
  t = np.asarray(thresholds, np.float64).astype(np.float32)
  return np.clip(np.rint(t * np.float32(bins)), 0, bins).astype(np.int64)


def at_or_above(h_KxB: np.ndarray) -> np.ndarray:
  """K x (bins + 1): column j = the count in bins >= j (column ``bins`` is 0): what a threshold
  ``j / bins`` keeps."""
  h = np.asarray(h_KxB)
  tail = np.cumsum(h[:, ::-1], axis=1)[:, ::-1]
  return np.concatenate([tail, np.zeros((len(h), 1), tail.dtype)], axis=1)


def score_bin(probs: jax.Array) -> jax.Array:
  """The ROC bin (int32, 0 .. ROC_BINS - 1) of each probability: ``floor(1000 p + 50 (logit(p)
  + 46))``, the log-odds clipped to [-46, 18]. Non-decreasing in p (up to float32 rounding of
  the sum, ~5e-4 of a bin), so binned scores keep the order of the raw ones."""
  p = probs.astype(jnp.float32)
  logit = jnp.clip(jnp.log(p) - jnp.log1p(-p), _LOGIT_LOW, _LOGIT_HIGH)   # -inf / inf at 0 / 1
  x = _PER_PROB * jnp.clip(p, 0.0, 1.0) + _PER_LOGIT * (logit - _LOGIT_LOW)
  return jnp.clip(jnp.floor(x), 0, ROC_BINS - 1).astype(jnp.int32)


def sums(probs_BxK: jax.Array, labels_B: jax.Array, mask_B: jax.Array) -> dict[str, jax.Array]:
  """``roc_pos`` / ``roc_neg`` (int32 K x ROC_BINS): masked counts of positive / negative
  examples by the ROC bin (``score_bin``) of their class-k probability."""
  k = probs_BxK.shape[-1]
  bins = ROC_BINS
  bin_BxK = score_bin(probs_BxK)
  pos_BxK = jax.nn.one_hot(labels_B, k, dtype=jnp.int32) * mask_B.astype(jnp.int32)[:, None]
  neg_BxK = (1 - jax.nn.one_hot(labels_B, k, dtype=jnp.int32)) * mask_B.astype(jnp.int32)[:, None]
  cls_BxK = jnp.broadcast_to(jnp.arange(k), bin_BxK.shape)
  zero = jnp.zeros((k, bins), jnp.int32)
  return {'roc_pos': zero.at[cls_BxK, bin_BxK].add(pos_BxK),
          'roc_neg': zero.at[cls_BxK, bin_BxK].add(neg_BxK)}


def auc(pos_KxB: np.ndarray, neg_KxB: np.ndarray) -> np.ndarray:
  """ROC-AUC per class (NaN where a class has no positives or no negatives): the probability that
  a positive scores above a negative, ties counting half."""
  pos = np.asarray(pos_KxB, np.float64)
  neg = np.asarray(neg_KxB, np.float64)
  neg_below = np.cumsum(neg, axis=1) - neg          # negatives in strictly lower bins
  wins = np.sum(pos * (neg_below + 0.5 * neg), axis=1)
  pairs = pos.sum(axis=1) * neg.sum(axis=1)
  return np.where(pairs > 0, wins / np.where(pairs > 0, pairs, 1), np.nan)


def curves(pos_KxB: np.ndarray, neg_KxB: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(false-positive rates, true-positive rates), each K x (bins + 1), from the highest threshold
  (nothing positive: 0, 0) down to the lowest (everything positive: 1, 1)."""
  pos = np.asarray(pos_KxB, np.float64)[:, ::-1]
  neg = np.asarray(neg_KxB, np.float64)[:, ::-1]
  tp = np.concatenate([np.zeros((len(pos), 1)), np.cumsum(pos, axis=1)], axis=1)
  fp = np.concatenate([np.zeros((len(neg), 1)), np.cumsum(neg, axis=1)], axis=1)
  with np.errstate(invalid='ignore', divide='ignore'):
    tpr = tp / tp[:, -1:]
    fpr = fp / fp[:, -1:]
  return np.nan_to_num(fpr), np.nan_to_num(tpr)
