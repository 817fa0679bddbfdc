"""The single-label ROC-AUC of a confident model against scikit-learn on the raw scores.

Equal-width probability bins put most negatives of a confident classifier (p < 0.001) into one
bin, where they tie with each other and with any positive scored as low: the report's macro AUC
read 0.965 against sklearn's 0.980 on a Fashion-MNIST classifier. ``roc.score_bin`` bins on
``1000 p + 50 logit(p)``; the report's AUC may then differ from sklearn's on the raw scores only by
the pairs that share a bin.
"""
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics as skm

from imgcls_jax import roc


def _confident_scores(seed: int, n: int = 3000, k: int = 4) -> tuple[np.ndarray, np.ndarray]:
  """Softmax probabilities of a confident, sometimes wrong, classifier (float32, n x k)."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, k, n)
  logits = rng.normal(0, 4, (n, k))
  logits[np.arange(n), labels] += rng.normal(14, 6, n)    # mostly right, by wide margins
  wrong = rng.random(n) < 0.1                             # and one in ten confidently wrong
  logits[wrong, labels[wrong]] -= 20
  logits -= logits.max(axis=1, keepdims=True)
  probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
  return probs.astype(np.float32), labels


def _report_auc(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
  s = roc.sums(jnp.asarray(probs), jnp.asarray(labels), jnp.ones(len(labels), bool))
  return roc.auc(np.asarray(s['roc_pos']), np.asarray(s['roc_neg']))


@pytest.mark.parametrize('seed', [0, 1])
def test_auc_of_a_confident_model_matches_sklearn_on_the_raw_scores(seed):
  probs, labels = _confident_scores(seed)
  got = _report_auc(probs, labels)
  bins = np.asarray(roc.score_bin(jnp.asarray(probs)))
  for c in range(probs.shape[1]):
    raw = skm.roc_auc_score(labels == c, probs[:, c])
    pos, neg = bins[labels == c, c], bins[labels != c, c]
    shared = np.mean(pos[:, None] == neg[None, :])       # the pairs the bins may get wrong
    assert abs(got[c] - raw) <= shared / 2 + 1e-12
    assert abs(got[c] - raw) < 1e-3
    # Exactly sklearn's AUC of the binned scores (ties count half in both).
    assert got[c] == pytest.approx(skm.roc_auc_score(labels == c, bins[:, c]), abs=1e-12)
    # The old equal-width probability bins, on the same scores: far off (the test can fail).
    old = np.minimum(np.floor(probs[:, c] * 1000), 999)
    assert abs(skm.roc_auc_score(labels == c, old) - raw) > 5e-3


def test_the_bins_keep_the_order_of_the_scores_over_the_whole_float32_range():
  p = np.sort(np.concatenate([
      [0.0, 1e-45, 1e-30, 1e-20, 1e-12, 1e-6, 1e-3, 0.5, 1 - 1e-3, 1 - 1e-6, 1.0],
      np.random.default_rng(0).random(20000)]).astype(np.float32))
  b = np.asarray(roc.score_bin(jnp.asarray(p)))
  assert b[0] == 0 and b[-1] == roc.ROC_BINS - 1
  assert np.all(np.diff(b) >= 0)
  # The formula, in float64: floor(1000 p + 50 (clip(logit p, -46, 18) + 46)); float32 on the
  # device may put a score within rounding of an edge into the neighbouring bin, no further.
  p64 = p.astype(np.float64)
  with np.errstate(divide='ignore'):
    logit = np.clip(np.log(p64) - np.log1p(-p64), -46, 18)
  want = np.clip(np.floor(1000 * p64 + 50 * (logit + 46)), 0, roc.ROC_BINS - 1)
  assert np.abs(b - want).max() <= 1 and np.mean(b == want) > 0.999
  # At most 0.001 wide in probability and 0.02 in log-odds: distinct enough scores differ.
  q = np.float32([0.30, 0.3011, 1e-9, 1.021e-9, 1 - 1e-5, 1 - 0.979e-5])
  bq = np.asarray(roc.score_bin(jnp.asarray(q)))
  assert bq[0] < bq[1] and bq[2] < bq[3] and bq[4] < bq[5]


def test_curves_end_at_the_corners_and_rise():
  probs, labels = _confident_scores(3, n=500, k=3)
  s = roc.sums(jnp.asarray(probs), jnp.asarray(labels), jnp.ones(len(labels), bool))
  fpr, tpr = roc.curves(np.asarray(s['roc_pos']), np.asarray(s['roc_neg']))
  assert fpr.shape == (3, roc.ROC_BINS + 1)
  np.testing.assert_array_equal(fpr[:, [0, -1]], [[0, 1]] * 3)
  np.testing.assert_array_equal(tpr[:, [0, -1]], [[0, 1]] * 3)
  assert np.all(np.diff(fpr, axis=1) >= 0) and np.all(np.diff(tpr, axis=1) >= 0)
