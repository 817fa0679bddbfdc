"""--mode=compare (imgcls_jax/compare.py): two digits runs against scikit-learn's metrics of their
own predictions, McNemar's exact p-value from the binomial distribution, and the paired bootstrap
against an independent one scored by scikit-learn."""
import json
import sys
import warnings

import numpy as np
import pytest
import scipy.stats
from sklearn import metrics as skm

from imgcls_jax import compare, inference, intervals, train
from imgcls_jax.data import digits
from imgcls_jax.errors import UserError
from tests.conftest import REPO


def _config(tfds_dir, seed, steps):
  sys.path.insert(0, REPO)
  from configs import default
  c = default.get_config()
  c.data.data_dir = tfds_dir
  c.seed = seed
  c.model.widths = (8, 16)
  c.batch_size = 64
  c.eval_batch_size = 64        # 450 test images: 7 full batches + 2, padding exercised
  c.num_train_steps = steps
  c.eval_every_steps = steps
  c.checkpoint_every_steps = steps
  c.progress_bar = False
  c.tensorboard = False
  return c


@pytest.fixture(scope='module')
def two_runs(tmp_path_factory, tfds_dir):
  """A short run (A) and a longer one with another seed (B): different, both far from perfect."""
  runs = []
  for seed, steps in ((0, 12), (1, 40)):
    workdir = str(tmp_path_factory.mktemp(f'run_{seed}'))
    train.train_and_evaluate(_config(tfds_dir, seed, steps), workdir)
    runs.append(workdir)
  return runs


def _sklearn(labels, pred):
  with warnings.catch_warnings():   # a resample can lack a class that is still predicted
    warnings.filterwarnings('ignore', 'y_pred contains classes not in y_true')
    return (skm.accuracy_score(labels, pred), skm.f1_score(labels, pred, average='macro'),
            skm.balanced_accuracy_score(labels, pred))


def test_compare_equals_sklearn_and_the_binomial_distribution(two_runs, tmp_path):
  a, b = two_runs
  result = compare.compare(None, a, overrides={'compare.workdir': b,
                                               'evaluate.checkpoint': 'latest',
                                               'evaluate.output_dir': str(tmp_path)})
  assert json.load(open(tmp_path / 'compare.json')) == result
  assert 'McNemar' in (tmp_path / 'compare.md').read_text()
  # Independently: each run's classifier on scikit-learn's own test arrays.
  images, labels = digits.load_arrays('test')
  preds = [inference.classifier(inference.load(w)).predict_arrays(images)['probabilities']
           .argmax(1) for w in (a, b)]
  for tag, pred in zip('AB', preds):
    want = _sklearn(labels, pred)
    got = [result['runs'][tag][n] for n in ('accuracy', 'f1_macro', 'balanced_accuracy')]
    np.testing.assert_allclose(got, want, rtol=1e-12, err_msg=tag)
  hit_a, hit_b = preds[0] == labels, preds[1] == labels
  only_a, only_b = int(np.sum(hit_a & ~hit_b)), int(np.sum(~hit_a & hit_b))
  assert result['table'] == {'both_right': int(np.sum(hit_a & hit_b)), 'only_a_right': only_a,
                             'only_b_right': only_b, 'both_wrong': int(np.sum(~hit_a & ~hit_b))}
  assert only_a + only_b > 10, 'the runs should differ for the test to mean something'
  # McNemar's exact test: twice the smaller binomial tail of the discordant pairs, at most 1.
  m = only_a + only_b
  p = min(1.0, 2 * scipy.stats.binom.cdf(min(only_a, only_b), m, 0.5))
  assert result['mcnemar_exact_p'] == pytest.approx(p, rel=1e-9)
  d = result['difference_b_minus_a']['accuracy']
  assert d['value'] == pytest.approx((only_b - only_a) / len(labels))
  assert d['interval'][0] <= d['value'] <= d['interval'][1]


def test_paired_bootstrap_matches_a_per_example_one_scored_by_sklearn():
  rng = np.random.default_rng(5)
  n, k = 800, 5
  t = rng.integers(0, k, n)
  a = np.where(rng.random(n) < 0.7, t, rng.integers(0, k, n))
  b = np.where(rng.random(n) < 0.8, t, rng.integers(0, k, n))
  got = intervals.paired_differences(t, a, b, k, level=0.9, resamples=3000, seed=2)
  draws = []
  for _ in range(3000):
    i = rng.integers(0, n, n)
    draws.append(np.subtract(_sklearn(t[i], b[i]), _sklearn(t[i], a[i])))
  draws = np.array(draws)
  want = np.percentile(draws, [5, 95], axis=0).T
  for j, name in enumerate(('accuracy', 'f1_macro', 'balanced_accuracy')):
    np.testing.assert_allclose(got[name], want[j], atol=0.4 * draws[:, j].std(), err_msg=name)
  # Paired, not two independent samples: the interval is narrower than an unpaired one would be.
  unpaired_sd = np.hypot(*(np.std([_sklearn(t[i], p[i])[0] for i in
                                   (rng.integers(0, n, n) for _ in range(300))]) for p in (a, b)))
  assert got['accuracy'][1] - got['accuracy'][0] < 2 * 1.645 * unpaired_sd


def test_bad_comparisons_are_one_line(two_runs, tmp_path):
  a, b = two_runs
  with pytest.raises(UserError, match='needs the second run'):
    compare.compare(None, a, overrides={})
  with pytest.raises(UserError, match='is --workdir itself'):
    compare.compare(None, a, overrides={'compare.workdir': a})
  with pytest.raises(UserError, match='compare.workdir=.*holds no checkpoint'):
    compare.compare(None, a, overrides={'compare.workdir': str(tmp_path / 'nothing')})
  # A run on the same classes whose test split holds other examples (an arrays file of digits'
  # test images in reverse order): paired by position they do not match.
  images, labels = digits.load_arrays('test')
  train_images, train_labels = digits.load_arrays('train')
  path = tmp_path / 'reversed.npz'
  np.savez(path, train_images=train_images, train_labels=train_labels,
           test_images=images[::-1], test_labels=labels[::-1])
  c = _config(None, 0, 2)
  c.data.name = f'arrays:{path}'
  c.data.train_preprocess = ''
  other = str(tmp_path / 'reversed_run')
  train.train_and_evaluate(c, other)
  with pytest.raises(UserError, match='do not read the same examples'):
    compare.compare(None, a, overrides={'compare.workdir': other,
                                        'evaluate.checkpoint': 'latest'})


def test_a_split_either_run_trained_on_is_said_so(two_runs, tmp_path, caplog):
  """Comparing on training examples favours the run that learnt them (it was scored as if they
  were new): each run's count of them is recorded, warned of and noted in compare.md."""
  import logging
  a, b = two_runs
  with caplog.at_level(logging.WARNING):
    result = compare.compare(None, a, overrides={'compare.workdir': b,
                                                 'evaluate.split': 'train[:100]',
                                                 'evaluate.output_dir': str(tmp_path)})
  assert [result['runs'][t]['trained_on_split'] for t in 'AB'] == [100, 100]
  for tag in 'AB':
    assert f"Run {tag} trained on 100 examples of split 'train[:100]'" in caplog.text
    assert f'Note: {tag} trained on 100 of these examples' in (tmp_path / 'compare.md').read_text()
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    result = compare.compare(None, a, overrides={'compare.workdir': b,
                                                 'evaluate.output_dir': str(tmp_path)})
  assert [result['runs'][t]['trained_on_split'] for t in 'AB'] == [0, 0]
  assert 'trained on' not in caplog.text
