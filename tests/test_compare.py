"""--mode=compare (imgcls_jax/compare.py): two digits runs against scikit-learn's metrics of their
own predictions, McNemar's exact p-value from the binomial distribution, and the paired bootstrap
against an independent one scored by scikit-learn; a network against a classical fit, against the
fit's own evaluation."""
import json
import sys
import warnings

import numpy as np
import pytest
import scipy.stats
from sklearn import metrics as skm

from imgcls_jax import classical, classical_model, compare, inference, intervals, train
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
  cv = tmp_path / 'cv'   # a cross-validation's folder: its folds are the runs
  (cv / 'fold_0').mkdir(parents=True)
  with pytest.raises(UserError, match=r'This is a cross-validation run: use one fold, e.g. '
                     rf'--config.compare.workdir={cv}/fold_0.$'):
    compare.compare(None, a, overrides={'compare.workdir': str(cv)})
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


@pytest.fixture(scope='module')
def classical_fit(tmp_path_factory, tfds_dir):
  """The classical baseline (configs/digits_classical.py's features) on the runs' data."""
  from configs import digits_classical
  c = _config(tfds_dir, 0, 2)
  c.classical = digits_classical.get_config().classical
  c.classical.workers = 1
  workdir = str(tmp_path_factory.mktemp('classical_fit'))
  classical.classical(c, workdir)
  return workdir


def test_a_network_and_a_classical_fit_are_paired_on_the_same_images(two_runs, classical_fit,
                                                                    tmp_path):
  """Learned vs classical features, paired: the classical side's figures and per-example answers
  are those of the fit's own evaluation (its report.json's confusion matrix), the network's those
  of its classifier, and the table and McNemar's p follow from both."""
  import joblib
  from imgcls_jax import features
  a = two_runs[1]
  result = compare.compare(None, a, overrides={'compare.workdir': classical_fit,
                                               'evaluate.checkpoint': 'latest',
                                               'evaluate.output_dir': str(tmp_path)})
  fit_report = json.load(open(f'{classical_fit}/report.json'))
  images, labels = digits.load_arrays('test')
  assert result['split'] == fit_report['context']['split'] == 'test'
  assert result['examples'] == len(labels) == fit_report['num_examples']
  b = result['runs']['B']
  assert b['kind'] == 'classical' and b['model'].startswith('classical: ')
  assert b['checkpoint_step'] == 0 and result['runs']['A']['kind'] == 'network'
  assert b['trained_on_split'] == 0 and b['tta'] == 'none'
  assert b['accuracy'] == pytest.approx(fit_report['accuracy'], abs=1e-12)
  assert b['f1_macro'] == pytest.approx(fit_report['macro_avg']['f1'], abs=1e-9)
  assert b['balanced_accuracy'] == pytest.approx(fit_report['balanced_accuracy'], abs=1e-9)
  # Per example: the fitted model on scikit-learn's own test arrays, checked against the fit's
  # evaluation by its confusion matrix, then the pairs with the network's answers.
  run = json.load(open(f'{classical_fit}/{classical_model.META_FILE}'))['config']['classical']
  fitted = joblib.load(f'{classical_fit}/{classical_model.MODEL_FILE}')
  pred_b = fitted.predict(features.extract(images, features.spec_from_config(
      __import__('ml_collections').ConfigDict(run))))
  np.testing.assert_array_equal(skm.confusion_matrix(labels, pred_b, labels=range(10)),
                                np.asarray(fit_report['confusion_matrix']))
  pred_a = inference.classifier(inference.load(a)).predict_arrays(images)['probabilities'].argmax(1)
  np.testing.assert_allclose(result['runs']['A']['accuracy'], skm.accuracy_score(labels, pred_a),
                             rtol=1e-12)
  hit_a, hit_b = pred_a == labels, pred_b == labels
  only_a, only_b = int(np.sum(hit_a & ~hit_b)), int(np.sum(~hit_a & hit_b))
  assert result['table'] == {'both_right': int(np.sum(hit_a & hit_b)), 'only_a_right': only_a,
                             'only_b_right': only_b, 'both_wrong': int(np.sum(~hit_a & ~hit_b))}
  assert only_a + only_b > 0
  p = min(1.0, 2 * scipy.stats.binom.cdf(min(only_a, only_b), only_a + only_b, 0.5))
  assert result['mcnemar_exact_p'] == pytest.approx(p, rel=1e-9)
  assert 'classical: ' in (tmp_path / 'compare.md').read_text()
  # The classical fit as A, without a config: its own settings; the same pairs, mirrored.
  mirrored = compare.compare(None, classical_fit, overrides={'compare.workdir': a,
                                                             'evaluate.checkpoint': 'latest',
                                                             'evaluate.output_dir': str(tmp_path)})
  assert mirrored['table']['only_a_right'] == only_b and mirrored['table']['only_b_right'] == only_a
  assert mirrored['runs']['A']['accuracy'] == b['accuracy']


def test_a_best_checkpoint_picked_on_the_split_is_said_so(classical_fit, tfds_dir, tmp_path,
                                                          caplog):
  """A 'best' checkpoint picked among the run's evaluations of the compared split favours it:
  recorded, warned of and noted; with --config.evaluate.checkpoint=latest nothing was picked."""
  import logging
  c = _config(tfds_dir, 2, 20)
  c.eval_every_steps = 10
  c.checkpoint_every_steps = 10
  c.evaluate.checkpoint = 'best'
  run = str(tmp_path / 'two_evaluations')
  train.train_and_evaluate(c, run)
  with caplog.at_level(logging.WARNING):
    result = compare.compare(None, classical_fit, overrides={'compare.workdir': run,
                                                             'evaluate.output_dir': str(tmp_path)})
  assert result['runs']['B']['tuned_on_split'] == ['checkpoint']
  assert result['runs']['A']['tuned_on_split'] == []
  assert "Run B's 'best' checkpoint was chosen on split 'test'" in caplog.text
  assert "Note: B's 'best' checkpoint was chosen on this split" in (
      tmp_path / 'compare.md').read_text()
  result = compare.compare(None, classical_fit, overrides={'compare.workdir': run,
                                                           'evaluate.checkpoint': 'latest',
                                                           'evaluate.output_dir': str(tmp_path)})
  assert result['runs']['B']['tuned_on_split'] == []
