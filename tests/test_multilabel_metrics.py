"""Multi-label metrics from additive score histograms (multilabel.py) against sklearn and brute
force numpy, and the precision-recall figure (plots.pr_curves)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sklearn.metrics as skm

from imgcls_jax import multilabel, plots, roc
from imgcls_jax.errors import UserError

K, N, BINS = 7, 500, 1000
EDGES = (np.arange(BINS + 1) / BINS).astype(np.float32)   # float32(j / bins): what `p >= t` uses
NO_POSITIVES = 3                                          # a class no example carries

_sums = jax.jit(multilabel.sums)


def _data(seed: int, n: int = N) -> tuple[np.ndarray, np.ndarray]:
  """(float32 sigmoid probabilities, 0/1 multi-hot targets), scores correlated with the targets;
  class 3 has no positives, class 6 few."""
  rng = np.random.default_rng(seed)
  rate = np.array([0.5, 0.3, 0.15, 0.0, 0.4, 0.25, 0.02])
  y = (rng.random((n, K)) < rate).astype(np.int32)
  logits = 1.2 * (2 * y - 1) * rng.uniform(0.2, 1.5, K) + rng.normal(0, 1.5, (n, K))
  probs = (1 / (1 + np.exp(-logits))).astype(np.float32)
  return probs, y


def _binned(probs: np.ndarray) -> np.ndarray:
  """The oracle bin of each probability: how many inner edges float32(j / bins) it reaches."""
  return np.searchsorted(EDGES[1:-1], probs, side='right')


def _stats(probs, y, thresholds=None, batch=None):
  """Summed device statistics as numpy; ``batch``: in padded batches whose padding is garbage."""
  thr = None if thresholds is None else jnp.asarray(thresholds, jnp.float32)
  if batch is None:
    out = _sums(jnp.asarray(probs), jnp.asarray(y), jnp.ones(len(y), bool), thr)
    return {k: np.asarray(v) for k, v in out.items()}
  rng = np.random.default_rng(123)
  total = None
  for lo in range(0, len(y), batch):
    p, t = probs[lo:lo + batch], y[lo:lo + batch]
    pad = batch - len(t)
    mask = np.r_[np.ones(len(t), bool), np.zeros(pad, bool)]
    p = np.concatenate([p, rng.random((pad, K), np.float32)])       # garbage in masked rows
    t = np.concatenate([t, rng.integers(0, 2, (pad, K), np.int32)])
    out = _sums(jnp.asarray(p), jnp.asarray(t), jnp.asarray(mask), thr)
    out = {k: np.asarray(v, np.int64) for k, v in out.items()}
    total = out if total is None else {k: total[k] + out[k] for k in out}
  return total


def _oracle_hist(probs, y):
  pos, neg = np.zeros((K, BINS), np.int64), np.zeros((K, BINS), np.int64)
  b = _binned(probs)
  for k in range(K):
    np.add.at(pos[k], b[y[:, k] == 1, k], 1)
    np.add.at(neg[k], b[y[:, k] == 0, k], 1)
  return pos, neg


def _tie_bound(y_k, binned_k):
  """The largest change of AP that reordering the examples inside their bins can make: per bin,
  the binned contribution against the positives-first and positives-last orders."""
  total, above, above_pos = 0.0, 0, 0
  for b in np.unique(binned_k)[::-1]:
    m, q = int((binned_k == b).sum()), int(y_k[binned_k == b].sum())
    if q:
      u = np.arange(1, q + 1)
      tied = q * (above_pos + q) / (above + m)
      first = np.sum((above_pos + u) / (above + u))
      last = np.sum((above_pos + u) / (above + m - q + u))
      total += max(first - tied, tied - last)
    above, above_pos = above + m, above_pos + q
  return total / y_k.sum()


@pytest.mark.parametrize('seed', [0, 1, 2, 3, 4])
def test_average_precision_and_roc_auc_equal_sklearn(seed):
  probs, y = _data(seed)
  s = _stats(probs, y)
  pos, neg = _oracle_hist(probs, y)
  np.testing.assert_array_equal(s['ml_pos'], pos)
  np.testing.assert_array_equal(s['ml_neg'], neg)
  binned = _binned(probs)
  ap = multilabel.average_precision(s['ml_pos'], s['ml_neg'])
  assert np.isnan(ap[NO_POSITIVES])
  present = [k for k in range(K) if k != NO_POSITIVES]
  for k in present:
    assert ap[k] == pytest.approx(skm.average_precision_score(y[:, k], binned[:, k]), abs=1e-12)
    # Raw scores: AP differs only by the order of scores that share a bin, by at most the most
    # any order of them could change it (typically ~1e-3 here; up to ~5e-2 for a rare class).
    raw = skm.average_precision_score(y[:, k], probs[:, k])
    assert abs(ap[k] - raw) <= _tie_bound(y[:, k], binned[:, k]) + 1e-12
  assert multilabel.mean_average_precision(s['ml_pos'], s['ml_neg']) == pytest.approx(
      np.mean([skm.average_precision_score(y[:, k], binned[:, k]) for k in present]), abs=1e-12)
  # The report ranks by the finer ROC bins (roc.score_bin): exactly sklearn on those.
  rep = multilabel.report(s, [f'c{k}' for k in range(K)])
  ranked = np.asarray(roc.score_bin(jnp.asarray(probs)))
  assert rep['average_precision_micro'] == pytest.approx(
      skm.average_precision_score(y, ranked, average='micro'), abs=1e-12)
  aucs = [skm.roc_auc_score(y[:, k], ranked[:, k]) for k in present]
  for k, auc in zip(present, aucs):
    assert rep['per_class'][k]['roc_auc'] == pytest.approx(auc, abs=1e-12)
    assert rep['per_class'][k]['average_precision'] == pytest.approx(
        skm.average_precision_score(y[:, k], ranked[:, k]), abs=1e-12)
    raw = skm.average_precision_score(y[:, k], probs[:, k])
    assert abs(rep['per_class'][k]['average_precision'] - raw) <= _tie_bound(
        y[:, k], ranked[:, k]) + 1e-12
  assert rep['per_class'][NO_POSITIVES]['roc_auc'] is None
  assert rep['per_class'][NO_POSITIVES]['average_precision'] is None
  assert rep['roc_auc_macro'] == pytest.approx(np.mean(aucs), abs=1e-12)
  assert rep['mean_average_precision'] == pytest.approx(np.mean(
      [skm.average_precision_score(y[:, k], ranked[:, k]) for k in present]), abs=1e-12)


def test_a_confident_taggers_ranking_figures_match_sklearn_on_the_raw_scores():
  """Sigmoid scores of a confident tagger: most negatives below 0.001 tie in the lowest
  threshold bin, with each other and with missed tags; the report's AP and ROC-AUC (from the
  finer ROC bins) stay within 1e-3 of sklearn's on the raw scores, where the threshold bins'
  were off by more."""
  rng = np.random.default_rng(5)
  n = 4000
  y = (rng.random((n, K)) < 0.3).astype(np.int32)
  logit = np.where(y == 1, rng.normal(9, 4, (n, K)), rng.normal(-10, 3, (n, K)))
  logit[rng.random((n, K)) < 0.05] -= 16                  # some missed tags, confidently
  probs = (1 / (1 + np.exp(-logit))).astype(np.float32)
  rep = multilabel.report(_stats(probs, y), [f'c{k}' for k in range(K)])
  old = multilabel.roc.auc(*_oracle_hist(probs, y))
  worst_old = 0.0
  for k in range(K):
    if not y[:, k].any():
      continue
    raw_auc = skm.roc_auc_score(y[:, k], probs[:, k])
    assert abs(rep['per_class'][k]['roc_auc'] - raw_auc) < 1e-3
    assert abs(rep['per_class'][k]['average_precision']
               - skm.average_precision_score(y[:, k], probs[:, k])) < 1e-3
    worst_old = max(worst_old, abs(old[k] - raw_auc))
  assert worst_old > 3e-3                                 # the old bins: the test can fail


def _check_at(probs, y, thresholds, s, exact_key):
  """Every thresholded number against sklearn on the predictions ``p >= float32(t)``."""
  pred = (probs >= np.asarray(thresholds, np.float32)).astype(np.int32)
  m = multilabel.at_thresholds(s['ml_pos'], s['ml_neg'], thresholds)
  for avg in ('micro', 'macro'):
    for name, fn in (('precision', skm.precision_score), ('recall', skm.recall_score),
                     ('f1', skm.f1_score)):
      assert m[f'{name}_{avg}'] == pytest.approx(fn(y, pred, average=avg, zero_division=0),
                                                 abs=1e-12), f'{name}_{avg}'
  for name, fn in (('precision', skm.precision_score), ('recall', skm.recall_score),
                   ('f1', skm.f1_score)):
    np.testing.assert_allclose(m[name], fn(y, pred, average=None, zero_division=0), atol=1e-12)
  np.testing.assert_array_equal(m['support'], y.sum(axis=0))
  assert m['hamming_loss'] == pytest.approx(skm.hamming_loss(y, pred), abs=1e-12)
  assert int(s['ml_count']) == len(y)
  assert int(s[exact_key]) / len(y) == pytest.approx(skm.accuracy_score(y, pred), abs=1e-12)


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_thresholded_metrics_equal_sklearn(seed):
  probs, y = _data(seed)
  rng = np.random.default_rng(seed + 100)
  thresholds = rng.integers(1, BINS, K) / BINS                   # arbitrary bin edges
  s = _stats(probs, y, thresholds)
  _check_at(probs, y, np.full(K, 0.5), s, 'ml_exact_05')
  _check_at(probs, y, thresholds, s, 'ml_exact_thr')
  # Other thresholds (including ones midway between edges) snap to the same nearest edge on the
  # device and on the host.
  other = np.r_[rng.random(K - 2), 0.0005, 0.4995]
  snapped = np.rint(other.astype(np.float32) * np.float32(BINS)).astype(np.float64) / BINS
  _check_at(probs, y, snapped, _stats(probs, y, other), 'ml_exact_thr')
  assert multilabel.at_thresholds(_oracle_hist(probs, y)[0], _oracle_hist(probs, y)[1],
                                  other)['thresholds'].tolist() == snapped.tolist()


def test_thresholds_at_bin_edges_mean_p_at_least_t_on_both_sides():
  """Probabilities exactly at every edge and a few float32 steps around it: the device bins, the
  device exact matches and the host F1 all follow ``p >= float32(j / bins)``, also at the edges
  where float32(p * bins) rounds across an integer (plain floor(p * bins) is off there)."""
  near = [EDGES[1:-1]]
  for direction in (0.0, 1.0):
    x = EDGES[1:-1]
    for _ in range(3):
      x = np.nextafter(x, np.float32(direction))
      near.append(x)
  values = np.concatenate(near).astype(np.float32)
  assert np.any((np.floor(values * np.float32(BINS)) >= 17) != (values >= EDGES[17]))
  rng = np.random.default_rng(7)
  n = 4096
  probs = rng.choice(values, (n, K)).astype(np.float32)
  y = (rng.random((n, K)) < 0.4).astype(np.int32)
  y[:, NO_POSITIVES] = 0
  np.testing.assert_array_equal(np.asarray(roc.bin_index(jnp.asarray(values))), _binned(values))
  # The single-label ROC histograms count each example once, in its score bin (roc.score_bin).
  labels = rng.integers(0, K, n)
  single = roc.sums(jnp.asarray(probs), jnp.asarray(labels), jnp.ones(n, bool))
  one_hot = np.eye(K, dtype=np.int32)[labels]
  b = np.asarray(roc.score_bin(jnp.asarray(probs)))
  for want, key in ((one_hot == 1, 'roc_pos'), (one_hot == 0, 'roc_neg')):
    hist = np.zeros((K, roc.ROC_BINS), np.int64)
    for k in range(K):
      np.add.at(hist[k], b[want[:, k], k], 1)
    np.testing.assert_array_equal(single[key], hist)
  for j in ([17, 34, 68, 79, 136, 251, 500], [1, 17, 999, 34, 500, 68, 79]):
    thresholds = np.array(j) / BINS
    s = _stats(probs, y, thresholds)
    np.testing.assert_array_equal(s['ml_pos'], _oracle_hist(probs, y)[0])
    _check_at(probs, y, thresholds, s, 'ml_exact_thr')
    _check_at(probs, y, np.full(K, 0.5), s, 'ml_exact_05')


def test_padded_batches_add_up_to_the_split():
  probs, y = _data(5, n=301)
  thresholds = np.array([0.3, 0.5, 0.42, 0.5, 0.617, 0.2, 0.05])
  s = _stats(probs, y, thresholds, batch=64)          # 5 batches, the last one 19 rows + garbage
  pos, neg = _oracle_hist(probs, y)
  np.testing.assert_array_equal(s['ml_pos'], pos)
  np.testing.assert_array_equal(s['ml_neg'], neg)
  _check_at(probs, y, np.full(K, 0.5), s, 'ml_exact_05')
  _check_at(probs, y, thresholds, s, 'ml_exact_thr')
  binned = _binned(probs)
  ap = multilabel.average_precision(s['ml_pos'], s['ml_neg'])
  assert ap[0] == pytest.approx(skm.average_precision_score(y[:, 0], binned[:, 0]), abs=1e-12)


def _brute_force_best_edge(probs_k, y_k):
  """The F1-best j (ties: closest to bins / 2, then lower) by predicting p >= float32(j / bins)."""
  pred = probs_k[None, :] >= EDGES[:, None]                 # (bins + 1) x N
  pred[BINS] = False                                        # threshold 1: never positive
  tp = (pred & (y_k == 1)).sum(1)
  fp = (pred & (y_k == 0)).sum(1)
  fn = (y_k == 1).sum() - tp
  f1 = np.array([0.0 if 2 * a + b + c == 0 else 2 * a / (2 * a + b + c)
                 for a, b, c in zip(tp, fp, fn)])
  best = [j for j in range(BINS + 1) if f1[j] == f1.max()]
  return min(best, key=lambda j: (abs(2 * j - BINS), j)), f1


@pytest.mark.parametrize('seed', [0, 4])
def test_chosen_thresholds_are_the_f1_best_bin_edges(seed):
  probs, y = _data(seed)
  s = _stats(probs, y)
  chosen = multilabel.choose_thresholds(s['ml_pos'], s['ml_neg'])
  assert chosen[NO_POSITIVES] == 0.5
  for k in range(K):
    if k == NO_POSITIVES:
      continue
    j, f1 = _brute_force_best_edge(probs[:, k], y[:, k])
    assert chosen[k] == j / BINS
    at_chosen = skm.f1_score(y[:, k], probs[:, k] >= np.float32(chosen[k]), zero_division=0)
    at_half = skm.f1_score(y[:, k], probs[:, k] >= 0.5, zero_division=0)
    assert at_chosen == pytest.approx(f1[j], abs=1e-12)
    assert at_chosen >= at_half


def test_chosen_threshold_ties_go_to_the_edge_closest_to_one_half():
  pos = np.zeros((2, 10), np.int64)
  neg = np.zeros((2, 10), np.int64)
  pos[0, 8], neg[0, 2] = 3, 5        # every edge 0.3 .. 0.8 separates perfectly: 0.5 is among them
  pos[1, 9], neg[1, 1] = 3, 5        # edges 0.2 .. 0.9: 0.5 again
  assert multilabel.choose_thresholds(pos, neg).tolist() == [0.5, 0.5]
  pos[1], neg[1] = 0, 0
  pos[1, 9], neg[1, 6] = 3, 5        # edges 0.7 .. 0.9 separate: the lowest, 0.7, is closest
  assert multilabel.choose_thresholds(pos, neg).tolist() == [0.5, 0.7]


def test_report_is_json_ready_and_its_curves_are_sklearns():
  probs, y = _data(2)
  thresholds = np.full(K, 0.37)
  s = _stats(probs, y, thresholds)
  names = ['T-shirt', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt']
  rep = multilabel.report(s, names, thresholds)
  json.dumps(rep, allow_nan=False)
  pred = (probs >= np.float32(0.37)).astype(np.int32)
  assert rep['at_thresholds']['exact_match'] == pytest.approx(skm.accuracy_score(y, pred))
  assert rep['at_thresholds']['hamming_loss'] == pytest.approx(skm.hamming_loss(y, pred))
  assert rep['at_thresholds']['f1_macro'] == pytest.approx(
      skm.f1_score(y, pred, average='macro', zero_division=0), abs=1e-12)
  assert rep['at_0.5']['f1_micro'] == pytest.approx(
      skm.f1_score(y, probs >= 0.5, average='micro', zero_division=0), abs=1e-12)
  assert rep['thresholds'] == [0.37] * K
  assert rep['per_class'][1]['at_thresholds']['recall'] == pytest.approx(
      skm.recall_score(y[:, 1], pred[:, 1]), abs=1e-12)
  binned = _binned(probs)
  ranked = np.asarray(roc.score_bin(jnp.asarray(probs)))
  assert rep['mean_average_precision'] == pytest.approx(np.mean(
      [skm.average_precision_score(y[:, k], ranked[:, k]) for k in range(K) if k != NO_POSITIVES]),
      abs=1e-12)
  # Full curves: sklearn's points at each distinct binned score b sit at column bins - b.
  precision, recall = multilabel.pr_curves(s['ml_pos'], s['ml_neg'])
  for k in (0, 6):
    p, r, thr = skm.precision_recall_curve(y[:, k], binned[:, k])
    np.testing.assert_allclose(precision[k, BINS - thr], p[:-1], atol=1e-12)
    np.testing.assert_allclose(recall[k, BINS - thr], r[:-1], atol=1e-12)
    assert precision[k, 0] == 1 and recall[k, 0] == 0 and recall[k, -1] == 1
  assert [c['class'] for c in rep['pr_curves']] == [n for i, n in enumerate(names)
                                                      if i != NO_POSITIVES]
  curve = rep['pr_curves'][0]   # the report's curves: at the finer ROC bins
  p, r, _ = skm.precision_recall_curve(y[:, 0], ranked[:, 0])
  assert curve['ap'] == pytest.approx(skm.average_precision_score(y[:, 0], ranked[:, 0]), abs=1e-12)
  assert set(zip(np.round(p, 6), np.round(r, 6))) <= set(zip(curve['precision'], curve['recall']))
  micro = rep['pr_curve_micro']
  p, r, _ = skm.precision_recall_curve(y.ravel(), ranked.ravel())
  assert set(zip(np.round(p, 6), np.round(r, 6))) <= set(zip(micro['precision'], micro['recall']))


def test_bad_thresholds_and_names_are_user_errors():
  probs, y = _data(0, n=40)
  s = _stats(probs, y)
  with pytest.raises(UserError, match='one threshold per class'):
    multilabel.at_thresholds(s['ml_pos'], s['ml_neg'], [0.5, 0.5])
  with pytest.raises(UserError, match=r'lie in \[0, 1\]'):
    multilabel.at_thresholds(s['ml_pos'], s['ml_neg'], np.full(K, 1.5))
  with pytest.raises(UserError, match='one name per class'):
    multilabel.report(s, ['a', 'b'])


@pytest.mark.parametrize('num_classes', [7, 30])
def test_pr_curves_png(tmp_path, num_classes):
  rng = np.random.default_rng(0)
  curves = []
  for i in range(num_classes):
    r = np.sort(rng.random(20))
    curves.append({'class': f'tag{i}', 'ap': 0.5, 'precision': list(1 - r / 2),
                   'recall': list(r)})
  micro = {'ap': 0.6, 'precision': [1.0, 0.8, 0.5], 'recall': [0.0, 0.5, 1.0]}
  path = tmp_path / 'pr.png'
  plots.pr_curves(curves, 0.5, str(path), micro=micro)
  data = path.read_bytes()
  assert data[:8] == b'\x89PNG\r\n\x1a\n' and len(data) > 5000
