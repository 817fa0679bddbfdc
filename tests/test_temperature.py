"""Temperature scaling (``config.evaluate.temperature_split``, imgcls_jax/temperature.py): the
fitted temperature against scipy's minimiser of scikit-learn's log loss, and a trained run whose
checkpoint, evaluation report, predictions and export all use it."""
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
import scipy.optimize
import scipy.special
from sklearn import metrics as skm

from imgcls_jax import (checkpoint, checkpoint_files, held_out, held_out_fits, inference, metrics,
                        run, run_directory, temperature, train)
from imgcls_jax.errors import UserError
from tests.conftest import REPO, subprocess_env


def _oracle_temperature(logits_NxK, labels_N):
  """scipy's bounded minimiser of scikit-learn's log loss of softmax(logits / T)."""
  k = logits_NxK.shape[1]

  def loss(t):
    return skm.log_loss(labels_N, scipy.special.softmax(logits_NxK / t, axis=1), labels=range(k))

  res = scipy.optimize.minimize_scalar(loss, bounds=(temperature.T_MIN, temperature.T_MAX),
                                       method='bounded', options={'xatol': 1e-6})
  return float(res.x), float(res.fun), loss(1.0)


def _fit(logits_NxK, labels_N, batch=64):
  """``temperature.nll_sums`` over padded, masked batches (garbage in the padding), summed."""
  total = None
  fn = jax.jit(temperature.nll_sums)
  for start in range(0, len(labels_N), batch):
    x = np.full((batch, logits_NxK.shape[1]), 1e4, np.float32)   # padding: huge, wrong logits
    y = np.zeros((batch,), np.int32)
    m = np.zeros((batch,), bool)
    chunk = slice(start, start + batch)
    n = len(labels_N[chunk])
    x[:n], y[:n], m[:n] = logits_NxK[chunk], labels_N[chunk], True
    sums = jax.device_get(fn(x, y, m))
    total = sums if total is None else jax.tree.map(np.add, total, sums)
  return temperature.choose(total['nll_G'], total['count'])


@pytest.mark.parametrize('true_t', [0.4, 2.5])
def test_fit_matches_scipy_on_log_loss(true_t):
  rng = np.random.default_rng(int(true_t * 10))
  z = rng.normal(size=(1500, 7)).astype(np.float32) * 3.0
  # labels drawn from softmax(z / true_t): the NLL-optimal temperature is near true_t
  cdf = np.cumsum(scipy.special.softmax(z.astype(np.float64) / true_t, axis=1), axis=1)
  y = np.minimum((rng.random((len(z), 1)) > cdf).sum(1), 6)
  fit = _fit(z, y)
  t_ref, nll_ref, nll_one = _oracle_temperature(z.astype(np.float64), y)
  assert abs(fit.temperature / t_ref - 1) < 0.005, (fit, t_ref)
  assert abs(fit.temperature / true_t - 1) < 0.2
  assert fit.nll_before == pytest.approx(nll_one, rel=1e-5)
  assert fit.nll_after == pytest.approx(nll_ref, rel=2e-3)   # the grid point next to the minimum
  assert not fit.at_edge


def test_fit_at_the_grid_edge_and_non_finite():
  z = np.eye(5, dtype=np.float32)[np.arange(200) % 5] * 4.0   # every example right: T -> 0 wins
  fit = _fit(z, np.arange(200) % 5)
  assert fit.at_edge and fit.temperature == 1.0 and not fit.fitted   # nothing to fit
  fit = _fit(-z, np.arange(200) % 5)                   # every example confidently wrong
  assert fit.at_edge and fit.temperature == pytest.approx(temperature.T_MAX, rel=1e-6)
  assert fit.fitted
  bad = temperature.choose(np.full(temperature.GRID_SIZE, np.nan), 10)
  assert bad.temperature == 1.0 and not bad.fitted


# ---- a trained run ----

def _digits(tfds_dir, split):
  import tensorflow_datasets as tfds
  from imgcls_jax.data import digits  # noqa: F401  (registers the builder)
  d = tfds.as_numpy(tfds.load('sklearn_digits', split=split, batch_size=-1, data_dir=tfds_dir))
  return d['image'], d['label']


@pytest.fixture(scope='module')
def calibrated(tmp_path_factory, tfds_dir):
  """A digits run trained with label smoothing 0.3 (under-confident) on 80% of the training
  split, the temperature fitted on the other 20%."""
  sys.path.insert(0, REPO)
  from configs import default
  c = default.tfds_digits(default.get_config())   # _digits reads tfds's order
  c.data.data_dir = tfds_dir
  c.data.train_split = 'train[:80%]'
  c.evaluate.temperature_split = 'train[80%:]'
  c.label_smoothing = 0.3
  c.model.widths = (16, 32)
  c.batch_size = 64
  c.eval_batch_size = 64
  c.num_train_steps = 120
  c.eval_every_steps = 60
  c.checkpoint_every_steps = 60
  c.progress_bar = False
  c.tensorboard = False
  workdir = str(tmp_path_factory.mktemp('calibrated'))
  final = train.train_and_evaluate(c, workdir)
  return c, workdir, final


def _raw_logits(workdir, images):
  trained = inference.load(workdir)
  clf = inference.classifier(dataclasses.replace(trained, temperature=1.0))
  return trained.temperature, clf.predict_arrays(images)['logits'].astype(np.float64)


def test_run_fits_the_temperature_that_minimises_held_out_log_loss(calibrated, tfds_dir):
  _, workdir, final = calibrated
  with checkpoint.Checkpointer(workdir) as ckpt:
    record = ckpt.read_meta(ckpt.latest_step())['temperature']
  images, labels = _digits(tfds_dir, 'train[80%:]')
  t, raw = _raw_logits(workdir, images)
  assert record['value'] == t and record['split'] == 'train[80%:]'
  assert final['temperature'] == t      # the final evaluation says its probabilities are tempered
  assert record['examples'] == len(labels)
  t_ref, nll_ref, nll_one = _oracle_temperature(raw, labels)
  assert abs(t / t_ref - 1) < 0.005, (t, t_ref)
  assert t < 0.9     # label smoothing 0.3 leaves the model under-confident: T sharpens it
  assert record['nll'][0] == pytest.approx(nll_one, rel=1e-4)
  assert record['nll'][1] == pytest.approx(nll_ref, rel=2e-3)
  assert record['ece'][1] < record['ece'][0]


def test_every_reader_of_the_run_uses_the_temperature(calibrated, tfds_dir, tmp_path):
  _, workdir, final = calibrated
  images, labels = _digits(tfds_dir, 'test')
  t, raw = _raw_logits(workdir, images)
  want = scipy.special.softmax(raw / t, axis=1)
  # predict / serve: the Classifier of the run
  got = inference.classifier(inference.load(workdir)).predict_arrays(images)
  np.testing.assert_allclose(got['probabilities'], want, atol=2e-6)
  np.testing.assert_allclose(got['logits'], raw / t, rtol=1e-5, atol=1e-5)
  # the final evaluation of training and --mode=evaluate: the loss of the tempered probabilities
  assert final['loss'] == pytest.approx(skm.log_loss(labels, want, labels=range(10)), rel=1e-4)
  out = tmp_path / 'report'
  res = subprocess.run([sys.executable, '-m', 'imgcls_jax.main', '--mode=evaluate',
                        f'--workdir={workdir}', '--config.evaluate.checkpoint=latest',
                        f'--config.evaluate.output_dir={out}'], cwd=REPO,
                       env=subprocess_env(1), capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-2000:]
  rep = json.load(open(out / 'report.json'))
  assert rep['context']['temperature'] == t
  assert rep['loss'] == pytest.approx(skm.log_loss(labels, want, labels=range(10)), rel=1e-4)


def test_export_records_and_applies_the_temperature(calibrated, tmp_path):
  pytest.importorskip('tensorflow')
  from imgcls_jax import export
  config, workdir, _ = calibrated
  config = config.copy_and_resolve_references()
  config.export.output_dir = str(tmp_path / 'export')
  config.export.verify_examples = 32
  record = export.export(config, workdir)
  t = inference.load(workdir).temperature
  assert record['temperature'] == t != 1.0
  assert json.load(open(tmp_path / 'export' / 'export.json'))['temperature'] == t
  samples = run_directory.read_samples(workdir)['eval_images'][:8]
  _, raw = _raw_logits(workdir, samples)
  got = export.run_tflite(str(tmp_path / 'export' / 'model.tflite'), samples)
  np.testing.assert_allclose(got['probabilities'], scipy.special.softmax(raw / t, axis=1),
                             atol=1e-5)


def test_id_listed_folds_are_counted_by_their_ids(digits_config, tmp_path):
  """A cross-validation fold trains on 'train+test@ids': a temperature fitted on 'test' shared
  examples with it, uncounted (id lists were not checked), so it was fitted on learnt images."""
  from imgcls_jax.data import reader
  ids = reader.example_ids(digits_config.data, 'train+test')
  train_ids = tmp_path / 'train_ids.txt'
  train_ids.write_text('\n'.join(ids[::2]) + '\n')   # every other example of the 1797
  fold = f'train+test@{train_ids}'
  test_ids = set(reader.example_ids(digits_config.data, 'test'))
  want = len(test_ids & set(ids[::2]))
  assert 0 < want < len(test_ids)
  assert reader.shared_examples(digits_config.data, 'test', fold) == want
  digits_config.data.train_split = fold
  digits_config.evaluate.temperature_split = 'test'
  with pytest.raises(UserError, match=f"shares {want} examples with config.data.train_split="
                                      f"'train\\+test@"):
    run.setup(digits_config)


def test_bad_temperature_splits_are_one_line(digits_config, tmp_path):
  digits_config.evaluate.temperature_split = 'test'
  with pytest.raises(UserError, match="shares 450 examples with config.data.eval_split='test'"):
    run.setup(digits_config)
  digits_config.evaluate.temperature_split = 'train[90%:]'   # train_split is the whole 'train'
  with pytest.raises(UserError, match="shares 135 examples with config.data.train_split='train'.*"
                                      "train_split='train\\[:90%\\]'"):
    run.setup(digits_config)
  digits_config.data.train_split = 'train[:91%]'              # 14 examples still shared
  with pytest.raises(UserError, match='shares 14 examples'):
    run.setup(digits_config)
  digits_config.data.train_split = 'train[:90%]'
  info = run.setup(digits_config).info                        # disjoint: accepted
  with pytest.raises(UserError, match='single-label runs'):
    held_out.check_fit_splits(digits_config, dataclasses.replace(info, multilabel=True))
  digits_config.evaluate.temperature_split = 'train[100%:]'
  with pytest.raises(UserError, match='holds no examples'):
    train.train_and_evaluate(digits_config, str(tmp_path))
  digits_config.evaluate.temperature_split = 'nonexistent'
  with pytest.raises(UserError, match='nonexistent'):
    train.train_and_evaluate(digits_config, str(tmp_path))   # before the first step
  assert checkpoint_files.finished_steps(str(tmp_path / 'checkpoints')) == []


def test_a_failing_fit_costs_the_run_nothing(digits_config, tmp_path, monkeypatch, caplog):
  """The fit runs just before the final save: if it fails, the trained weights are saved anyway."""
  def broken(*args, **kwargs):
    raise RuntimeError('the split could not be read')   # not a UserError: any failure
  monkeypatch.setattr(held_out_fits, 'fit_temperature', broken)
  digits_config.data.train_split = 'train[:80%]'
  digits_config.evaluate.temperature_split = 'train[80%:]'
  digits_config.num_train_steps = 10
  final = train.train_and_evaluate(digits_config, str(tmp_path))
  assert final['count'] == 450
  with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
    assert ckpt.latest_step() == 10 and 'temperature' not in ckpt.read_meta(10)
  assert 'No temperature fitted (the split could not be read)' in caplog.text
  assert inference.load(str(tmp_path)).temperature == 1.0


def test_test_time_views_are_each_tempered_then_averaged(calibrated):
  """With flip TTA, log(mean over the image and its mirror of softmax(logits / T)): the eval
  step's and compare's probabilities, against the same formula on the untempered logits."""
  from imgcls_jax import eval_steps
  _, workdir, _ = calibrated
  trained = inference.load(workdir)
  clf = inference.classifier(trained)
  images = run_directory.read_samples(workdir)['eval_images'][:16]
  got = np.exp(np.asarray(eval_steps.log_probs_fn(clf.variables, images, model_def=clf.model_def,
                                                  cfg=clf.step_cfg, tta='flip'), np.float64))
  t, raw = _raw_logits(workdir, images)
  _, raw_mirror = _raw_logits(workdir, images[:, :, ::-1])
  want = 0.5 * (scipy.special.softmax(raw / t, axis=1) + scipy.special.softmax(raw_mirror / t, 1))
  np.testing.assert_allclose(got, want, atol=2e-6)


# ---- --mode=calibrate: the same fit for a run trained without it ----

@pytest.fixture(scope='module')
def uncalibrated(calibrated, tmp_path_factory):
  """The ``calibrated`` run's config, trained again without a temperature split."""
  config = calibrated[0].copy_and_resolve_references()
  config.evaluate.temperature_split = ''
  workdir = str(tmp_path_factory.mktemp('uncalibrated'))
  train.train_and_evaluate(config, workdir)
  return workdir


def _meta(workdir):
  with checkpoint.Checkpointer(workdir) as ckpt:
    return ckpt.latest_step(), ckpt.read_meta(ckpt.latest_step())


def test_calibrate_mode_saves_the_temperature_training_would_have_fitted(calibrated, uncalibrated):
  """The oracle is the trainer's own fit on the same weights (training is deterministic): the
  temperature, its split's log loss and calibration error before and after."""
  step, before = _meta(uncalibrated)
  assert 'temperature' not in before and inference.load(uncalibrated).temperature == 1.0
  res = subprocess.run([sys.executable, '-m', 'imgcls_jax.main', '--mode=calibrate',
                        f'--workdir={uncalibrated}',
                        '--config.evaluate.temperature_split=train[80%:]'], cwd=REPO,
                       env=subprocess_env(1), capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-2000:]
  _, want = _meta(calibrated[1])
  got_step, after = _meta(uncalibrated)
  assert got_step == step
  # The two fits read the same float32 logits through other batchings (8 devices in the
  # trainer, 1 in the child), so the grid's NLL sums differ in the last bits; the parabola's
  # offset, (a - c) / (a - 2b + c) of neighbouring sums, magnifies that: 2.7e-6 relative on an
  # Intel Xeon (Ice Lake), exact on Zen 4/5. Another split or other weights move T by >1e-2.
  assert after['temperature']['value'] == pytest.approx(want['temperature']['value'], rel=2e-5)
  for key in ('nll', 'ece'):
    np.testing.assert_allclose(after['temperature'][key], want['temperature'][key], rtol=1e-5)
  assert after['temperature']['split'] == 'train[80%:]'
  assert after['temperature']['examples'] == want['temperature']['examples']
  assert {k: v for k, v in after.items() if k != 'temperature'} == before  # nothing else changed
  t = after['temperature']['value']
  assert f'Temperature {t:.4f} fitted on' in res.stdout and f'checkpoint {step}' in res.stdout
  records = [r for r in metrics.read_jsonl(os.path.join(uncalibrated, 'metrics.jsonl'))
             if r['split'] == 'eval']
  top = max(r['accuracy'] for r in records)
  best = {r['step'] for r in records if r['accuracy'] == top}   # evaluate's default checkpoint
  if best == {step}:
    assert 'predict, serve, export and evaluate use it' in res.stdout
  elif step not in best:   # told that --mode=evaluate's default checkpoint is not the calibrated one
    assert f"its default, 'best', is checkpoint {best.pop()}" in res.stdout
  assert inference.load(uncalibrated).temperature == t   # every reader of the run now uses it


def test_calibrate_refuses_bad_splits_in_one_line(uncalibrated, monkeypatch):
  from imgcls_jax import calibrate
  step, before = _meta(uncalibrated)
  cases = [({}, 'Name the held-out split'),
           ({'evaluate.temperature_split': 'train[70%:]'},
            "shares 135 examples with config.data.train_split='train\\[:80%\\]'"),
           ({'evaluate.temperature_split': 'test'}, "shares 450 examples with config.data.eval_"),
           ({'evaluate.threshold_split': 'train[80%:]'}, 'threshold_split is for multi-label'),
           ({'evaluate.temperature_split': 'train[100%:]'}, 'selects no examples'),
           ({'evaluate.temperature_split': 'train[80%:]', 'evaluate.checkpoint': 'best'},
            'fits the latest checkpoint only'),
           ({'evaluate.temperature_split': 'train[80%:]', 'data.validation_fraction': 0.1},
            'would move the held-out images')]
  for overrides, message in cases:
    with pytest.raises(UserError, match=message):
      calibrate.calibrate(None, uncalibrated, overrides=overrides)
  assert _meta(uncalibrated) == (step, before)
  # A fold of a cross-validation: calibrated alone it changed its scores in the next summary.
  cv = os.path.join(os.path.dirname(uncalibrated), 'a_cv')
  os.makedirs(os.path.join(cv, 'fold_1'), exist_ok=True)
  fold = os.path.join(cv, 'fold_0')
  if not os.path.exists(fold):
    shutil.copytree(uncalibrated, fold)
  with pytest.raises(UserError, match=r'is a fold of the cross-validation .*a_cv: calibrated '
                                      r'alone, its scores'):
    calibrate.calibrate(None, fold, overrides={'evaluate.temperature_split': 'train[80%:]'})
  assert _meta(fold) == (step, before)
  # A split nothing can be fitted on (every example right by a margin) saves nothing.
  real = temperature.choose
  with monkeypatch.context() as m:
    m.setattr(temperature, 'choose',
              lambda nll, count: dataclasses.replace(real(nll, count), fitted=False))
    with pytest.raises(UserError, match='No temperature can be fitted.*Nothing was saved'):
      calibrate.calibrate(None, uncalibrated,
                          overrides={'evaluate.temperature_split': 'train[80%:]'})
  assert _meta(uncalibrated) == (step, before)
  # validation_fraction draws splits from an image folder; digits from tfds would ignore it.
  c = ml_collections.ConfigDict(run_directory.read_config(uncalibrated))
  c.data.validation_fraction = 0.1
  with pytest.raises(UserError, match='applies to image folders and manifests only'):
    run.setup(c)
  run.setup(c, training=False)    # a run saved with it (ignored then) still restores


def test_a_meta_update_that_cannot_be_written_leaves_the_old_one(uncalibrated):
  step, before = _meta(uncalibrated)
  with pytest.raises(TypeError):
    checkpoint_files.update_meta(uncalibrated, step, {'temperature': {'value': object()}})
  assert _meta(uncalibrated) == (step, before)
  with pytest.raises(UserError, match='not in'):
    checkpoint_files.update_meta(uncalibrated, step + 1, {'x': 1})


def test_an_image_folder_run_is_calibrated_on_its_validation_fraction(digits_config, tmp_path,
                                                                      tfds_dir, caplog):
  """The user's photos in <class>/ folders: data.validation_fraction gives the held-out split
  that training's fit and --mode=calibrate use, and the train split is refused with that fix.
  Then --mode=evaluate lists the mistakes by path, with a test image damaged after indexing (a
  masked row in the middle of the split): each listed path's folder is its listed label, and the
  Classifier reading that file predicts the listed class."""
  from PIL import Image
  from imgcls_jax import calibrate, evaluate
  from imgcls_jax.data import folder_index, folder_layout
  images, labels = _digits(tfds_dir, 'train[:400]')
  for k, (x, y) in enumerate(zip(images, labels)):
    os.makedirs(tmp_path / 'photos' / str(y), exist_ok=True)
    Image.fromarray(x[..., 0]).save(tmp_path / 'photos' / str(y) / f'{k}.png')
  c = digits_config
  c.data.name, c.data.folder = 'image_folder', str(tmp_path / 'photos')
  c.data.holdout_fraction, c.data.validation_fraction = 0.2, 0.15
  c.data.train_preprocess = c.data.eval_preprocess = ''
  # Per class: round(0.2 n) held out for evaluation, then round(0.15 n') of the rest validates.
  per_class = np.bincount(labels, minlength=10)
  kept = per_class - np.round(0.2 * per_class).astype(int)
  held = np.round(0.15 * kept).astype(int)
  c.evaluate.temperature_split = 'train'
  with pytest.raises(UserError, match=f"shares {(kept - held).sum()} examples.*use the held-out "
                                      "split: evaluate.temperature_split='validation'"):
    run.setup(c)
  c.data.validation_fraction = 0.0
  with pytest.raises(UserError, match="data.validation_fraction=0.1 and "
                                      "evaluate.temperature_split='validation'"):
    run.setup(c)
  c.data.validation_fraction = 0.15
  c.evaluate.temperature_split = ''          # held out, and nothing reads it: said once
  with caplog.at_level(logging.WARNING):
    run.setup(c)
  assert "split 'validation', and no fit of this run reads it" in caplog.text
  caplog.clear()
  c.data.eval_split = 'validation'           # evaluating on it reads it
  with caplog.at_level(logging.WARNING):
    run.setup(c)
  assert 'no fit of this run reads it' not in caplog.text
  c.data.eval_split = 'test'
  c.evaluate.temperature_split = 'validation'
  with caplog.at_level(logging.WARNING):
    run.setup(c)
  assert 'no fit of this run reads it' not in caplog.text
  c.num_train_steps = 30
  train.train_and_evaluate(c, str(tmp_path / 'run'))
  folder_index.clear_memo()
  val = folder_index.index(folder_layout.source_of(c.data), 'validation',
                           tuple(str(d) for d in range(10)))
  _, trained = _meta(str(tmp_path / 'run'))
  assert trained['temperature']['examples'] == len(val) == held.sum()
  again = calibrate.calibrate(None, str(tmp_path / 'run'), overrides={})   # the saved split
  assert again['temperature']['value'] == pytest.approx(trained['temperature']['value'], rel=1e-6)
  with pytest.raises(UserError, match='would move the held-out images'):
    calibrate.calibrate(None, str(tmp_path / 'run'), overrides={'data.holdout_seed': 1})
  saved = run_directory.read_config(str(tmp_path / 'run'))
  saved['data']['validation_fraction'] = 0.0         # as if trained without a validation split
  with pytest.raises(UserError, match='holds no .validation. images out.*train it again with '
                                      '--config.data.validation_fraction=0.1'):
    calibrate._check_validation_exists(saved, {}, 'temperature_split', 'validation')
  calibrate._check_validation_exists(saved, {}, 'temperature_split', 'train[90%:]')   # not asked
  with pytest.raises(UserError, match="'all' shares .* with config.data.train_split"):
    calibrate.calibrate(None, str(tmp_path / 'run'),
                        overrides={'evaluate.temperature_split': 'all'})
  # New photos in the folder redraw the held-out splits: the validation split would now hold
  # images the model trained on, so calibrate refuses until the folder is as it was.
  extra = [tmp_path / 'photos' / str(y) / f'new_{k}.png' for k, y in enumerate(labels[:40])]
  for path, x in zip(extra, images[:40]):
    Image.fromarray(x[..., 0]).save(path)
  folder_index.clear_memo()
  with pytest.raises(UserError, match="image folder changed since training .split 'train' "
                                      'lists other files or labels'):
    calibrate.calibrate(None, str(tmp_path / 'run'), overrides={})
  for path in extra:
    os.remove(path)
  folder_index.clear_memo()
  # A training photo renamed: the same count, but its class's held-out draw changes.
  moved = folder_index.index(folder_layout.source_of(c.data), 'train',
                             tuple(str(d) for d in range(10))).paths[0]
  os.rename(moved, moved + '.renamed.png')
  folder_index.clear_memo()
  with pytest.raises(UserError, match=r"changed since training \(split 'train' lists other "
                                      "files or labels.*restore the folder as it was"):
    calibrate.calibrate(None, str(tmp_path / 'run'), overrides={})
  with caplog.at_level(logging.WARNING):
    evaluate.evaluate(None, str(tmp_path / 'run'),
                      overrides={'evaluate.output_dir': str(tmp_path / 'swapped')})
  assert "held-out split 'test' drawn from it may hold images the model trained on" in caplog.text
  os.rename(moved + '.renamed.png', moved)
  folder_index.clear_memo()
  caplog.clear()
  # Another seed draws another test split from the same files: that flag is named, not the folder.
  with caplog.at_level(logging.WARNING):
    evaluate.evaluate(None, str(tmp_path / 'run'),
                      overrides={'evaluate.output_dir': str(tmp_path / 'reseeded'),
                                 'data.holdout_seed': 1})
  assert 'config.data.holdout_seed=1 draws other held-out images than the run did' in caplog.text
  assert 'folder changed' not in caplog.text
  caplog.clear()

  import csv
  test = folder_index.index(folder_layout.source_of(c.data), 'test',
                            tuple(str(d) for d in range(10)))
  victim = test.paths[5]
  with open(victim, 'wb') as f:          # damaged after it was indexed
    f.write(b'\x89PNG\r\n\x1a\n' + b'\0' * 64)
  rep = evaluate.evaluate(None, str(tmp_path / 'run'),
                          overrides={'evaluate.output_dir': str(tmp_path / 'report'),
                                     'evaluate.checkpoint': 'latest'})
  assert rep['num_examples'] == len(test) - 1
  with open(tmp_path / 'report' / 'errors.csv', newline='') as f:
    listed = list(csv.DictReader(f))
  assert len(listed) == round((1 - rep['accuracy']) * rep['num_examples']) > 0
  clf = inference.classifier(inference.load(str(tmp_path / 'run')))
  for r in listed:
    assert r['id'] == os.path.relpath(test.paths[int(r['position'])], c.data.folder)
    assert r['id'].split('/')[0] == r['label'] != r['predicted']
    probs = clf.predict_arrays(clf.prepare(os.path.join(c.data.folder, r['id']))[None])
    assert str(int(np.argmax(probs['probabilities'][0]))) == r['predicted']
  assert os.path.relpath(victim, c.data.folder) not in {r['id'] for r in listed}
