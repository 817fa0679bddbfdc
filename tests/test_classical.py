"""--mode=classical: scikit-image features + a scikit-learn linear classifier, evaluated with the
CNN's report files, on a tfds dataset and an image folder, and cross-validated on the CNN's
folds."""
import json
import os
import subprocess
import sys

import joblib
import numpy as np
import pytest
import scipy.stats
from PIL import Image
from sklearn import metrics

from imgcls_jax import classical, classical_model, cross_validation, features, report_files
from imgcls_jax.data import digits
from imgcls_jax.data import folds as folds_lib
from imgcls_jax.errors import UserError
from tests.conftest import REPO, subprocess_env


def digits_folder(root: str, classes=(0, 1, 7), per_class=(20, 6), bad_file=True) -> str:
  """root/{train,test}/<digit>/*.png from sklearn's digits (plus an unreadable file)."""
  for split, (x, y), n in (('train', digits.load_arrays('train'), per_class[0]),
                           ('test', digits.load_arrays('test'), per_class[1])):
    for c in classes:
      os.makedirs(os.path.join(root, split, str(c)), exist_ok=True)
      for j, i in enumerate(np.flatnonzero(y == c)[:n]):
        Image.fromarray(x[i, :, :, 0]).save(os.path.join(root, split, str(c), f'{j}.png'))
  if bad_file:
    with open(os.path.join(root, 'train', str(classes[0]), 'broken.png'), 'wb') as f:
      f.write(b'\x89PNG\r\n\x1a\n not really')
  return root


@pytest.fixture
def config(digits_config):
  c = digits_config
  c.classical.hog_cell = 2
  c.classical.edge_grid = 2
  c.classical.edge_sigma = 0.5
  c.classical.C = 0.1
  c.classical.workers = 2
  return c


def test_holdout_on_a_tfds_dataset_writes_the_evaluate_report(config, tmp_path, capsys):
  out = str(tmp_path / 'run')
  rep = classical.classical(config, out)
  # The summary names the files written: no training run, so no training curves.
  report_line = capsys.readouterr().out.strip().splitlines()[-1]
  assert report_line.startswith('Report: ') and 'reliability.png' in report_line
  assert 'training_curves' not in report_line
  assert not os.path.exists(os.path.join(out, report_files.CURVES_FILE))
  for name in report_files.REPORT_FILES + (classical_model.MODEL_FILE, classical_model.META_FILE):
    assert os.path.exists(os.path.join(out, name)), name
  with open(os.path.join(out, 'report.json')) as f:
    assert json.load(f)['accuracy'] == rep['accuracy']
  # The report's numbers are sklearn's on the saved classifier's own predictions.
  x, y = digits.load_arrays('test')
  fitted = joblib.load(os.path.join(out, classical_model.MODEL_FILE))
  pred = fitted.predict(features.extract(x, features.spec_from_config(config.classical)))
  assert rep['num_examples'] == len(y) == 450
  assert rep['accuracy'] == pytest.approx(metrics.accuracy_score(y, pred), abs=1e-12)
  assert rep['macro_avg']['f1'] == pytest.approx(metrics.f1_score(y, pred, average='macro'),
                                                 abs=1e-9)
  assert np.array_equal(rep['confusion_matrix'], metrics.confusion_matrix(y, pred))
  # sklearn's SVC on raw pixels scores 99.1%; these features with a linear model ~98%.
  assert rep['accuracy'] > 0.95
  assert rep['context']['train_examples'] == 1347 and rep['context']['fit_s'] > 0
  # The confidence intervals of --mode=evaluate: Clopper-Pearson from the beta distribution, and
  # bootstrap intervals around sklearn's figures.
  iv = rep['intervals']
  right, alpha = int(np.sum(pred == y)), 1 - config.evaluate.confidence_level
  assert iv['level'] == config.evaluate.confidence_level and iv['examples'] == 450
  assert iv['accuracy_exact'] == pytest.approx(
      [scipy.stats.beta.ppf(alpha / 2, right, 450 - right + 1),
       scipy.stats.beta.ppf(1 - alpha / 2, right + 1, 450 - right)], abs=1e-9)
  for key, value in (('accuracy', metrics.accuracy_score(y, pred)),
                     ('f1_macro', metrics.f1_score(y, pred, average='macro')),
                     ('balanced_accuracy', metrics.balanced_accuracy_score(y, pred))):
    assert iv[key][0] <= value <= iv[key][1] and iv[key][1] - iv[key][0] < 0.05, key
  assert '## Confidence intervals' in open(os.path.join(out, 'report.md')).read()


def test_an_arrays_dataset_fits_though_the_config_names_a_host_augmentation(config, tmp_path):
  """The fit reads its images unaugmented, so the tfds config's 'pad_crop(pad=1)' (which arrays
  refuse for training) does not stop it reading the same digits as arrays."""
  assert config.data.train_preprocess
  config.data.name = 'arrays:sklearn_digits'
  out = str(tmp_path / 'arrays')
  rep = classical.classical(config, out)
  x, y = digits.load_arrays('test')
  pred = joblib.load(os.path.join(out, classical_model.MODEL_FILE)).predict(
      features.extract(x, features.spec_from_config(config.classical)))
  assert rep['accuracy'] == pytest.approx(metrics.accuracy_score(y, pred), abs=1e-12)
  assert rep['accuracy'] > 0.95


def test_cross_validation_uses_the_cnns_folds(config, tmp_path):
  config.data.train_split = 'train+test'
  config.cross_validation.folds = 2
  out = str(tmp_path / 'cv')
  summary = classical.classical(config, out)
  assignment = folds_lib.assign(config.data, 'train+test', 2, config.seed)
  for i in range(2):
    # The fold the CNN's cross-validation would train: the same id files.
    fc = cross_validation.fold_config(config, os.path.join(out, f'fold_{i}', 'train_ids.txt'),
                                      os.path.join(out, f'fold_{i}', 'eval_ids.txt'))
    with open(fc.data.eval_split.split('@')[1]) as f:
      assert [line.strip() for line in f] == assignment.held_out(i)
    with open(os.path.join(out, f'fold_{i}', 'report.json')) as f:
      assert json.load(f)['num_examples'] == len(assignment.held_out(i))
  pooled = summary['pooled_out_of_fold']
  assert pooled['num_examples'] == 1797 and summary['num_examples'] == 1797
  assert np.sum(pooled['confusion_matrix']) == 1797
  # The pooled accuracy is the example-weighted mean of the folds'.
  weights = [r['eval_examples'] for r in summary['per_fold']]
  accs = [r['accuracy'] for r in summary['per_fold']]
  assert pooled['accuracy'] == pytest.approx(np.average(accs, weights=weights), abs=1e-12)
  assert summary['mean']['accuracy'] > 0.95
  for name in ('cv_report.json', 'cv_report.md', 'cv_confusion_matrix.png', 'cv_reliability.png'):
    assert os.path.exists(os.path.join(out, name))


def test_image_folder_with_an_unreadable_file_and_a_calibrated_svm(config, tmp_path, caplog):
  root = digits_folder(str(tmp_path / 'images'))
  config.data.name = 'image_folder'
  config.data.folder = root
  config.data.train_preprocess = ''
  config.classical.classifier = 'linear_svm'
  out = str(tmp_path / 'run')
  rep = classical.classical(config, out)
  assert rep['class_names'] == ['0', '1', '7'] and rep['num_examples'] == 18
  assert rep['context']['train_examples'] == 60   # broken.png skipped
  assert any('broken.png' in r.getMessage() for r in caplog.records)
  assert rep['accuracy'] > 0.8  # three well separated digits, 20 examples each
  # SVM margins are no probabilities: the saved model is Platt-scaled, and the report's loss, ECE
  # and accuracy are sklearn's (and numpy's) of that model's own probabilities.
  assert 'Platt scaling' in rep['context']['probabilities']
  x, y, _ = features.split_arrays(config.data, 'test')
  fitted = joblib.load(os.path.join(out, classical_model.MODEL_FILE))
  probs = fitted.predict_proba(features.extract(x, features.spec_from_config(config.classical)))
  assert rep['loss'] == pytest.approx(metrics.log_loss(y, probs, labels=[0, 1, 2]), abs=1e-5)
  assert rep['accuracy'] == metrics.accuracy_score(y, probs.argmax(1))
  bins = int(config.evaluate.calibration_bins)
  conf, hit = probs.max(1), probs.argmax(1) == y
  b = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)
  ece = sum(abs(hit[b == i].mean() - conf[b == i].mean()) * np.mean(b == i)
            for i in range(bins) if np.any(b == i))
  assert rep['ece'] == pytest.approx(ece, abs=1e-5)


def test_user_errors(config, tmp_path):
  config.classical.classifier = 'forest'
  with pytest.raises(UserError, match="classifier='forest' must be one of logistic, linear_svm"):
    classical.classical(config, str(tmp_path / 'a'))
  config.classical.classifier = 'linear_svm'   # calibrated on folds: 2 images of each class
  with pytest.raises(UserError, match="calibrates its margins on cross-validation folds, and a "
                     "class has 1 training image; give every class 2 or more, or use "
                     "config.classical.classifier='logistic'."):
    classical.make_classifier(config.classical, np.array([0, 0, 1, 2, 2]))
  config.classical.classifier = 'logistic'
  config.classical.features = 'hog,sift'
  with pytest.raises(UserError, match='must name one or more of hog, lbp'):
    classical.classical(config, str(tmp_path / 'b'))
  config.classical.features = 'hog'
  config.data.multilabel = True   # tags: sklearn's 'y should be a 1d array' traceback, before
  with pytest.raises(UserError, match=r'^The classical baseline fits one class per image and has '
                     r'no tagging version, and config.data.multilabel is set; train the network '
                     r'for tags \(--mode=train\).$'):
    classical.classical(config, str(tmp_path / 'c'))
  assert not os.path.exists(tmp_path / 'c')


def test_cli_mode_reaches_the_baseline_and_a_bad_value_gets_one_line(tmp_path, tfds_dir):
  out = subprocess.run(
      [sys.executable, '-m', 'imgcls_jax.main', '--mode=classical',
       f'--config={REPO}/configs/digits_classical.py', f'--config.data.data_dir={tfds_dir}',
       f'--workdir={tmp_path}/run', '--config.classical.C=-1'],
      capture_output=True, text=True, env=subprocess_env(1), timeout=300, cwd=REPO)
  assert out.returncode == 2
  assert out.stderr.strip().splitlines() == ['error: config.classical.C=-1.0 must be positive.']
