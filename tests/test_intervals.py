"""The report's confidence intervals (imgcls_jax/intervals.py) against an independent bootstrap of
the examples scored by scikit-learn, and the Clopper-Pearson interval against its defining
binomial tail equations."""
import json
import os
import warnings

import numpy as np
import pytest
import scipy.stats
from sklearn import metrics as skm

from imgcls_jax import evaluate, intervals, train
from imgcls_jax.errors import UserError

# A 4-class split with a rare class (3: 2 examples, both missed, never predicted): macro F1 and
# balanced accuracy sit far from top-1, and class 3 drops out of ~1 resample in 7; scikit-learn
# then averages over the 3 classes left instead of counting class 3's zero: so must the bootstrap.
CONFUSION = np.array([[240, 20, 10, 0],
                      [15, 150, 10, 0],
                      [5, 12, 120, 0],
                      [1, 1, 0, 0]])


def _pairs(cm):
  k = len(cm)
  return np.divmod(np.repeat(np.arange(k * k), cm.ravel()), k)


def _sklearn_scores(t, p):
  with warnings.catch_warnings():   # a resample without class 3 that still predicts it
    warnings.filterwarnings('ignore', 'y_pred contains classes not in y_true')
    return (skm.accuracy_score(t, p), skm.f1_score(t, p, average='macro', zero_division=0),
            skm.balanced_accuracy_score(t, p))


def test_point_metrics_equal_sklearn_on_the_pairs_the_confusion_matrix_counts():
  t, p = _pairs(CONFUSION)
  ours = intervals.confusion_metrics(CONFUSION[None])[:, 0]
  np.testing.assert_allclose(ours, _sklearn_scores(t, p), rtol=1e-12)
  assert ours[0] - ours[1] > 0.1   # the metrics differ: a mix-up of them would show


def test_bootstrap_intervals_match_a_per_example_bootstrap_with_sklearn():
  t, p = _pairs(CONFUSION)
  got = intervals.report_intervals(CONFUSION, level=0.9, resamples=4000, seed=1)
  rng = np.random.default_rng(123)
  draws = np.array([_sklearn_scores(t[i], p[i])
                    for i in (rng.integers(0, len(t), len(t)) for _ in range(4000))])
  want = np.percentile(draws, [5, 95], axis=0).T
  for i, name in enumerate(('accuracy', 'f1_macro', 'balanced_accuracy')):
    # Monte Carlo error of a 5% / 95% quantile of 4000 draws: ~0.1 of the metric's bootstrap
    # standard deviation (0.01-0.05 here); the two bootstraps use different random draws.
    np.testing.assert_allclose(got[name], want[i], atol=0.4 * draws[:, i].std(), err_msg=name)
    assert got[name][0] < _sklearn_scores(t, p)[i] < got[name][1]
  assert got['level'] == 0.9 and got['examples'] == CONFUSION.sum()


@pytest.mark.parametrize('correct,n', [(431, 450), (450, 450), (0, 20), (7, 10)])
def test_exact_interval_solves_the_binomial_tail_equations(correct, n):
  cm = np.array([[correct, 0], [n - correct, 0]]) if correct < n else np.array([[n, 0], [0, 0]])
  lo, hi = intervals.report_intervals(cm, level=0.95, resamples=0)['accuracy_exact']
  alpha = 0.05
  if correct > 0:   # P(X >= k | lo) = alpha / 2
    assert scipy.stats.binom.sf(correct - 1, n, lo) == pytest.approx(alpha / 2, rel=1e-6)
  else:
    assert lo == 0.0
  if correct < n:   # P(X <= k | hi) = alpha / 2
    assert scipy.stats.binom.cdf(correct, n, hi) == pytest.approx(alpha / 2, rel=1e-6)
  else:
    assert hi == 1.0


def test_evaluate_mode_writes_the_intervals(digits_config, tmp_path):
  digits_config.num_train_steps = 30
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(digits_config, workdir)
  cfg = digits_config.copy_and_resolve_references()
  cfg.evaluate.checkpoint = 'latest'
  cfg.evaluate.output_dir = str(tmp_path / 'out')
  rep = evaluate.evaluate(cfg, workdir)
  saved = json.load(open(tmp_path / 'out' / 'report.json'))
  assert saved['intervals'] == rep['intervals']
  iv = rep['intervals']
  assert iv['examples'] == 450 and iv['resamples'] == 1000
  t, p = _pairs(np.asarray(rep['confusion_matrix']))
  for name, value in zip(('accuracy', 'f1_macro', 'balanced_accuracy'), _sklearn_scores(t, p)):
    assert iv[name][0] <= value <= iv[name][1], name
  assert iv['accuracy_exact'][0] <= rep['accuracy'] <= iv['accuracy_exact'][1]
  md = open(tmp_path / 'out' / 'report.md').read()
  assert '## Confidence intervals' in md and 'macro F1 (bootstrap)' in md
  for key, value, match in (('confidence_level', 95, 'between 0 and 1'),
                            ('bootstrap_resamples', -1, 'whole number')):
    bad = cfg.copy_and_resolve_references()
    bad.evaluate[key] = value
    with pytest.raises(UserError, match=match):
      evaluate.evaluate(bad, workdir)
  assert os.path.exists(tmp_path / 'out' / 'report.json')
