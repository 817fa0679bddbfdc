"""The folders --mode=classical writes, as the other modes meet them: the network modes say what
the folder is and where its results are (not "train first" or "use one fold"); evaluate scores a
split (or another labelled folder) with its scikit-learn model as its fit's evaluation did;
compare takes a fit or one fold (tests/test_compare.py pairs one with a network); predict predicts
with its scikit-learn model as its own evaluation scored, and a folder of class directories
without split directories cross-validates as train_split='all'."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from imgcls_jax import classical, compare, evaluate, inference, predict, run_directory
from imgcls_jax.data import digits, folder_index, folder_layout
from imgcls_jax.errors import UserError
from tests.conftest import REPO, subprocess_env


def flat_digits_folder(root: str, classes=(0, 1, 7), per_class=16) -> str:
  """root/<digit>/*.png from sklearn's digits: no train/ or test/ directories."""
  x, y = digits.load_arrays('train')
  for c in classes:
    os.makedirs(os.path.join(root, str(c)), exist_ok=True)
    for j, i in enumerate(np.flatnonzero(y == c)[:per_class]):
      Image.fromarray(x[i, :, :, 0]).save(os.path.join(root, str(c), f'{j}.png'))
  return root


def default_config():
  sys.path.insert(0, REPO)
  from configs import default
  return default.get_config()


def folder_config(root: str):
  c = default_config()
  c.data.name = 'image_folder'
  c.data.folder = root
  c.data.train_preprocess = ''
  c.data.index_cache = 'off'
  c.classical.hog_cell = 2
  c.classical.edge_grid = 2
  c.classical.edge_sigma = 0.5
  c.classical.C = 0.1
  c.classical.workers = 1
  c.evaluate.bootstrap_resamples = 200
  return c


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """(a classical hold-out run, a classical cross-validation) of one flat folder; the CV leaves
  config.data.eval_split at its default 'test', which the folder has not."""
  base = tmp_path_factory.mktemp('classical_runs')
  root = flat_digits_folder(str(base / 'images'))
  c = folder_config(root)
  c.data.holdout_fraction = 0.25
  holdout = str(base / 'holdout')
  classical.classical(c, holdout)
  c = folder_config(root)
  c.data.train_split = 'all'
  c.cross_validation.folds = 2
  cv = str(base / 'cv')
  summary = classical.classical(c, cv)
  return holdout, cv, summary


def test_a_flat_folder_cross_validates_every_image_without_a_test_split(runs):
  _, cv, summary = runs
  assert summary['split'] == 'all' and summary['num_examples'] == 48
  assert summary['pooled_out_of_fold']['num_examples'] == 48
  assert os.path.exists(os.path.join(cv, 'cv_report.json'))


@pytest.mark.parametrize('which', ['holdout', 'fold', 'cv'])
def test_network_modes_name_the_classical_folder_and_its_report(runs, which):
  holdout, cv, _ = runs
  path = {'holdout': holdout, 'fold': os.path.join(cv, 'fold_0'), 'cv': cv}[which]
  expected = {'holdout': f'is a classical baseline .*its evaluation is {path}/report.md',
              'fold': f'is a fold of the classical cross-validation in {cv} .*{path}/report.md',
              'cv': f'is a cross-validation of the classical baseline .*{cv}/cv_report.md'}[which]
  c = default_config()   # what the command line gives when --config is left out
  calls = [lambda: inference.load(path, c, overrides={})]             # export, serve, calibrate
  if which == 'cv':   # evaluate and predict take one fold_<i>
    calls += [lambda: evaluate.evaluate(c, path, overrides={}),
              lambda: predict.predict(c, path, overrides={'predict.inputs': path})]
  for call in calls:
    with pytest.raises(UserError, match=expected) as e:
      call()
    message = str(e.value)
    assert 'Train first' not in message and 'use one fold' not in message
    assert message.count('. ') == 0 and message.endswith('--mode=train.'), message


def test_compare_takes_a_fold_not_a_classical_cross_validation_in_one_line(runs, tmp_path):
  holdout, cv, _ = runs
  for a, b, flag in ((cv, holdout, '--workdir'), (holdout, cv, '--config.compare.workdir')):
    with pytest.raises(UserError, match=rf'^{flag}=.* is a cross-validation of the classical '
                       r'baseline, .*give one of its fold_<i> folders'):
      compare.compare(default_config(), a, overrides={'compare.workdir': b})
  with pytest.raises(UserError, match=r'compare.workdir=.* holds no checkpoint to compare: No '
                     r'checkpoint in .*point --config.compare.workdir at a run directory.$'):
    compare.compare(default_config(), holdout, overrides={'compare.workdir': str(tmp_path)})


def test_the_cli_evaluates_a_classical_fit_as_its_own_evaluation_scored(runs):
  """--mode=evaluate of a classical fit (was: refused) scores its split again with the fitted
  model: the report equals the fit's own, in <workdir>/evaluate, and the fit's report.md stays."""
  holdout, _, _ = runs
  own_md = open(os.path.join(holdout, 'report.md')).read()
  proc = subprocess.run([sys.executable, '-m', 'imgcls_jax.main', '--mode=evaluate',
                         f'--workdir={holdout}'], capture_output=True, text=True,
                        env=subprocess_env(1), cwd=REPO, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  with open(os.path.join(holdout, 'report.json')) as f:
    fit = json.load(f)
  with open(os.path.join(holdout, 'evaluate', 'report.json')) as f:
    again = json.load(f)
  for key in ('num_examples', 'accuracy', 'loss', 'ece'):
    assert again[key] == pytest.approx(fit[key], abs=1e-9), key
  assert again['confusion_matrix'] == fit['confusion_matrix']
  assert again['class_names'] == fit['class_names']
  assert again['intervals']['accuracy_exact'] == pytest.approx(fit['intervals']['accuracy_exact'])
  assert again['context']['model'] == fit['context']['model']
  assert again['trained_on_split'] == 0
  assert open(os.path.join(holdout, 'report.md')).read() == own_md
  assert run_directory.kind(holdout) == 'classical'


def test_a_classical_fit_evaluates_another_labelled_folder_as_predict_answers(runs, tmp_path):
  """--config.data.folder=NEW: the fitted model on other photos of its classes; the report's
  accuracy is that of --mode=predict's answers on the same files, and its settings errors are
  one line."""
  holdout, _, _ = runs
  x, y = digits.load_arrays('test')
  new = tmp_path / 'new'
  for c in (0, 1, 7):
    os.makedirs(new / str(c))
    for j, i in enumerate(np.flatnonzero(y == c)[:10]):
      Image.fromarray(x[i, :, :, 0]).save(new / str(c) / f'{j}.png')
  out = tmp_path / 'report'
  rep = evaluate.evaluate(default_config(), holdout, overrides={
      'data.folder': str(new), 'evaluate.output_dir': str(out)})
  assert rep['num_examples'] == 30 and rep['context']['dataset'] == folder_layout.NAME
  assert 'trained_on_split' not in rep   # other files: not known to be new
  answers = predict.predict(default_config(), holdout, overrides={'predict.inputs': str(new)})
  right = [a['predictions'][0]['class'] == os.path.basename(os.path.dirname(a['file']))
           for a in answers]
  assert len(right) == 30 and rep['accuracy'] == pytest.approx(np.mean(right), abs=1e-12)
  assert json.load(open(out / 'report.json'))['accuracy'] == rep['accuracy']
  for key, value in (('evaluate.tta', 'flip'), ('evaluate.ood_inputs', str(new))):
    with pytest.raises(UserError, match=rf'^config.{key} needs a network, .*: drop it.$'):
      evaluate.evaluate(default_config(), holdout, overrides={key: value})


@pytest.mark.parametrize('which', ['holdout', 'fold'])
def test_predict_with_a_classical_fit_gives_its_own_evaluations_probabilities(runs, which,
                                                                                  tmp_path):
  """--mode=predict of a classical folder (was: refused): on the files of the split its fit
  evaluated, the predicted probabilities give the report's own accuracy and loss."""
  holdout, cv, _ = runs
  path = holdout if which == 'holdout' else os.path.join(cv, 'fold_1')
  with open(os.path.join(path, 'classical.json')) as f:
    saved = json.load(f)['config']
  with open(os.path.join(path, 'report.json')) as f:
    report = json.load(f)
  data = default_config().data
  data.update(saved['data'])
  names = tuple(report['class_names'])
  files = folder_index.files_of(folder_layout.source_of(data), data.eval_split, names)
  assert len(files) == report['num_examples']
  (tmp_path / 'list').mkdir()
  for k, f in enumerate(files):   # one folder of them, named to keep their labels
    os.symlink(f, tmp_path / 'list' / f'{os.path.basename(os.path.dirname(f))}_{k}.png')
  out = tmp_path / 'p.jsonl'
  results = predict.predict(default_config(), path, overrides={
      'predict.inputs': str(tmp_path / 'list'), 'predict.top_k': len(names),
      'predict.output': str(out)})
  labels = [os.path.basename(r['file']).split('_')[0] for r in results]
  p_label = [next(q['probability'] for q in r['predictions'] if q['class'] == y)
             for r, y in zip(results, labels)]
  top1 = [r['predictions'][0]['class'] for r in results]
  assert np.mean(np.equal(top1, labels)) == pytest.approx(report['accuracy'], abs=1e-12)
  assert -np.mean(np.log(p_label)) == pytest.approx(report['loss'], rel=1e-5)
  assert len(out.read_text().splitlines()) == len(files)
  with pytest.raises(UserError, match='config.predict.explain needs a network'):
    predict.predict(default_config(), path, overrides={
        'predict.inputs': str(tmp_path / 'list'), 'predict.explain': 'gradcam'})
