"""--mode=evaluate: the report of a digits checkpoint, its PNGs, TensorBoard during training, TTA,
checkpoint choice, and one-line errors."""
import csv
import functools
import glob
import json
import os
import subprocess
import sys

import jax
import matplotlib.image
import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as skm

from imgcls_jax import (checkpoint, eval_steps, evaluate, metrics, models, plots, report_files,
                        restored_split, run, sharding, steps)
from imgcls_jax import state as state_lib
from imgcls_jax import train
from imgcls_jax.errors import UserError
from tests.conftest import REPO, subprocess_env


def _small_config(tfds_dir):
  sys.path.insert(0, REPO)
  from configs import default
  c = default.tfds_digits(default.get_config())
  c.data.data_dir = tfds_dir
  c.model.widths = (16, 32)
  c.batch_size = 64
  c.eval_batch_size = 64          # 450 test images = 7 full batches + 2: padding is exercised
  c.num_train_steps = 40
  c.log_every_steps = 10
  c.eval_every_steps = 20
  c.checkpoint_every_steps = 20
  c.progress_bar = False
  c.tensorboard = True
  return c


def _assert_png(path):
  assert os.path.getsize(path) > 1000, path
  with Image.open(path) as im:
    im.verify()
  with Image.open(path) as im:
    assert im.format == 'PNG' and im.size[0] > 200 and im.size[1] > 200
  assert matplotlib.image.imread(path).ndim == 3


@pytest.fixture(scope='module')
def trained(tmp_path_factory, tfds_dir):
  """A digits run: 40 steps, evaluated and checkpointed at steps 20 and 40."""
  workdir = str(tmp_path_factory.mktemp('digits_run'))
  config = _small_config(tfds_dir)
  final = train.train_and_evaluate(config, workdir)
  return config, workdir, final


# ---- plots ----

def test_training_curves_from_a_run_still_writing_its_metrics(tmp_path):
  records = [{'step': s, 'split': 'train', 'loss': 2.0 / s, 'accuracy': 1 - 1 / s}
             for s in (10, 20, 30)]
  records += [{'step': 20, 'split': 'eval', 'loss': 0.3, 'accuracy': 0.8},
              {'step': 20, 'split': 'train', 'loss': 0.05, 'accuracy': 0.9}]  # resumed: re-logged
  path = tmp_path / 'metrics.jsonl'
  path.write_text(''.join(json.dumps(r) + '\n' for r in records) + '{"step": 40, "spl')
  read = metrics.read_jsonl(str(path))
  assert len(read) == len(records)  # the half-written last line is skipped
  steps_, values = plots._latest_per_step(read, 'train', 'loss')
  assert list(steps_) == [10, 20, 30] and values[1] == 0.05  # the later record of step 20 wins
  out = str(tmp_path / 'curves.png')
  plots.training_curves(read, out)
  _assert_png(out)


def test_confusion_and_reliability_pngs_for_many_classes(tmp_path):
  rng = np.random.default_rng(0)
  cm = rng.integers(0, 5, (60, 60)) + np.diag(rng.integers(50, 100, 60))
  plots.confusion_matrix(cm, [f'c{i}' for i in range(60)], str(tmp_path / 'cm.png'))
  bins = [{'lower': i / 10, 'upper': (i + 1) / 10, 'count': int(i > 3) * 10 * i,
           'confidence': i / 10 + 0.05 if i > 3 else None,
           'accuracy': i / 10 if i > 3 else None} for i in range(10)]
  plots.reliability_diagram(bins, 0.05, str(tmp_path / 'rel.png'))
  _assert_png(str(tmp_path / 'cm.png'))
  _assert_png(str(tmp_path / 'rel.png'))


# ---- TTA ----

def test_flip_tta_averages_the_probabilities_of_image_and_mirror_image():
  model_fn = functools.partial(models.get, 'cnn', num_classes=10, in_channels=1, widths=(8, 16))
  mesh = sharding.make_mesh(1)
  import optax
  state, _ = state_lib.create(model_fn, optax.sgd(0.1), 0, mesh)
  mdef = state_lib.model_def(model_fn)
  cfg = steps.StepConfig(num_classes=10)
  images = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 1), dtype=np.uint8)
  fn = functools.partial(eval_steps.log_probs_fn, model_def=mdef, cfg=cfg)
  plain = np.exp(np.asarray(fn(state, images, tta='')))
  mirrored = np.exp(np.asarray(fn(state, images[:, :, ::-1], tta='')))
  tta = np.exp(np.asarray(fn(state, images, tta='flip')))
  assert not np.allclose(plain, mirrored, atol=1e-4)
  np.testing.assert_allclose(tta, (plain + mirrored) / 2, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(tta.sum(axis=1), 1.0, rtol=1e-5)


# ---- end to end on digits ----

@pytest.mark.slow
def test_every_evaluation_during_training_reaches_tensorboard_and_metrics_jsonl(trained):
  import tensorflow as tf
  _, workdir, final = trained
  evals = [r for r in metrics.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
           if r['split'] == 'eval']
  assert [r['step'] for r in evals] == [20, 40]
  for r in evals:
    assert r['count'] == 450
    assert {'f1_macro', 'precision_weighted', 'ece', 'accuracy', 'loss'} <= set(r)
  assert final['f1_macro'] == pytest.approx(evals[-1]['f1_macro'])
  tags: dict[str, list[int]] = {}
  for path in glob.glob(os.path.join(workdir, 'tensorboard', 'events.*')):
    for event in tf.compat.v1.train.summary_iterator(path):
      for v in event.summary.value:
        tags.setdefault(v.tag, []).append(event.step)
  for tag in ('eval/accuracy', 'eval/f1_macro', 'eval/recall_macro', 'eval/ece', 'eval/loss'):
    assert sorted(tags[tag]) == [20, 40], tag


@pytest.mark.slow
def test_evaluating_a_digits_checkpoint_writes_the_report_and_three_pngs(trained, tmp_path,
                                                                        capsys):
  config, workdir, _ = trained
  config = config.copy_and_resolve_references()
  config.evaluate.output_dir = str(tmp_path / 'out')
  config.evaluate.checkpoint = 'latest'
  rep = evaluate.evaluate(config, workdir)
  out = str(tmp_path / 'out')
  for name in report_files.REPORT_FILES + (report_files.CURVES_FILE,):
    assert os.path.exists(os.path.join(out, name)), name
  for png in ('confusion_matrix.png', 'reliability.png', 'training_curves.png'):
    _assert_png(os.path.join(out, png))
  with open(os.path.join(out, 'report.json')) as f:
    saved = json.load(f)
  assert saved['context']['checkpoint_step'] == 40 and saved['context']['split'] == 'test'
  assert saved['class_names'] == [str(i) for i in range(10)]
  # Every example exactly once (450 = 7 x 64 + 2: the padded rows count for nothing).
  assert saved['num_examples'] == 450 and np.sum(saved['confusion_matrix']) == 450
  assert sum(r['support'] for r in saved['per_class']) == 450
  printed = capsys.readouterr().out
  assert 'top-1' in printed and 'macro avg' in printed and 'most confused' in printed
  assert 'reliability.png' in printed and 'training_curves.png' in printed
  md = open(os.path.join(out, 'report.md')).read()
  assert '## Per class' in md and '| 9 |' in md
  # Same checkpoint, same split: the training-time evaluation at step 40 agrees.
  last_eval = [r for r in metrics.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
               if r['split'] == 'eval'][-1]
  assert rep['accuracy'] == pytest.approx(last_eval['accuracy'])
  assert rep['macro_avg']['f1'] == pytest.approx(last_eval['f1_macro'])
  assert rep['loss'] == pytest.approx(last_eval['loss'], rel=1e-5)

  # Independently: predict the 450 test images (from scikit-learn's arrays, not through the tfds
  # pipeline) with the restored checkpoint; sklearn's metrics must match the report.
  from imgcls_jax.data import digits
  images, labels = digits.load_arrays('test')
  s = run.setup(config)
  with checkpoint.Checkpointer(workdir, async_save=False) as ckpt:
    target, _ = state_lib.abstract_state(s.model_fn, s.tx, config.seed, s.mesh)
    state, meta = ckpt.restore(target, 40)
  predict = jax.jit(functools.partial(eval_steps.probabilities, model_def=s.model_def,
                                      cfg=s.step_cfg))
  probs = np.asarray(predict(state, images)['probabilities'], np.float64)
  probs /= probs.sum(axis=1, keepdims=True)
  pred = probs.argmax(axis=1)
  assert meta['class_names'] == saved['class_names']
  assert rep['accuracy'] == pytest.approx(skm.accuracy_score(labels, pred))
  np.testing.assert_array_equal(rep['confusion_matrix'], skm.confusion_matrix(labels, pred))
  assert rep['macro_avg']['f1'] == pytest.approx(skm.f1_score(labels, pred, average='macro'))
  assert rep['accuracy_top5'] == pytest.approx(skm.top_k_accuracy_score(labels, probs, k=5))
  assert rep['loss'] == pytest.approx(skm.log_loss(labels, probs), rel=1e-4)

  # errors.csv: every mistake, the most confident first, named by its tfds id. The oracle reads
  # the split with tfds itself, in file order, and predicts it as above.
  import tensorflow_datasets as tfds
  rows = list(tfds.as_numpy(tfds.load('sklearn_digits', split='test', shuffle_files=False,
                                      data_dir=config.data.data_dir,
                                      read_config=tfds.ReadConfig(add_tfds_id=True))))
  p = np.asarray(predict(state, np.stack([r['image'] for r in rows]))['probabilities'], np.float64)
  y = np.array([r['label'] for r in rows])
  wrong = np.flatnonzero(p.argmax(1) != y)
  with open(os.path.join(out, 'errors.csv'), newline='') as f:
    listed = list(csv.DictReader(f))
  assert len(listed) == len(wrong) == round((1 - rep['accuracy']) * 450) > 0
  positions = [int(r['position']) for r in listed]
  assert sorted(positions) == wrong.tolist()
  for r, pos in zip(listed, positions):
    assert r['id'] == rows[pos]['tfds_id'].decode()
    assert (r['label'], r['predicted']) == (str(y[pos]), str(p[pos].argmax()))
    assert float(r['p_predicted']) == pytest.approx(p[pos].max(), abs=1e-5)
    assert float(r['p_label']) == pytest.approx(p[pos, y[pos]], abs=1e-5)
  confidence = [float(r['p_predicted']) for r in listed]
  assert confidence == sorted(confidence, reverse=True)
  assert saved['errors']['count'] == len(wrong)
  _assert_png(os.path.join(out, 'errors.png'))
  assert '## The most confident errors' in md
  config.evaluate.errors = 0       # no listing: an earlier one in the folder is removed
  evaluate.evaluate(config, workdir)
  assert not any(os.path.exists(os.path.join(out, n)) for n in report_files.ERROR_FILES)


@pytest.mark.slow
def test_checkpoint_choice(trained, tmp_path):
  _, workdir, _ = trained
  fake = tmp_path / 'metrics.jsonl'
  fake.write_text('\n'.join(json.dumps(r) for r in [
      {'step': 20, 'split': 'eval', 'accuracy': 0.9},
      {'step': 40, 'split': 'eval', 'accuracy': 0.8},
      {'step': 40, 'split': 'train', 'accuracy': 0.99}]) + '\n')
  evals = {r['step']: r['accuracy'] for r in metrics.read_jsonl(os.path.join(workdir,
                                                                           'metrics.jsonl'))
           if r['split'] == 'eval'}
  with checkpoint.Checkpointer(workdir, keep_best=1, async_save=False) as ckpt:
    # Checkpoints saved with their evaluation metrics: the Checkpointer's own ranking.
    step, how = restored_split.choose_step(ckpt, 'best', str(fake))
    assert evals[step] == max(evals.values()) and 'accuracy' in how
  with checkpoint.Checkpointer(workdir, keep_best=0, async_save=False) as ckpt:
    # Without that ranking: the highest eval top-1 in metrics.jsonl among the kept checkpoints.
    assert ckpt.all_steps() == [20, 40]
    assert restored_split.choose_step(ckpt, 'best', str(fake))[0] == 20
    assert restored_split.choose_step(ckpt, 'latest', str(fake))[0] == 40
    assert restored_split.choose_step(ckpt, '20', str(fake)) == (20, 'step 20')
    step, how = restored_split.choose_step(ckpt, 'best', str(tmp_path / 'none.jsonl'))
    assert step == 40 and how.startswith('latest')
    with pytest.raises(UserError, match='kept steps: 20, 40'):
      restored_split.choose_step(ckpt, '30', str(fake))
    with pytest.raises(UserError, match="'best', 'latest' or a step"):
      restored_split.choose_step(ckpt, 'newest', str(fake))


def test_best_is_by_the_runs_own_best_metric_when_a_config_is_given(trained, tmp_path):
  """The command line always gives a config (the schema's defaults when --config is left out):
  'best' must still rank by the run's own config.checkpoint.best_metric / best_mode."""
  import shutil
  _, workdir, _ = trained
  run = str(tmp_path / 'by_loss')
  shutil.copytree(workdir, run)
  with open(os.path.join(run, 'config.json')) as f:
    saved = json.load(f)
  saved['checkpoint'].update(best_metric='loss', best_mode='min')
  with open(os.path.join(run, 'config.json'), 'w') as f:
    json.dump(saved, f)
  losses = {r['step']: r['loss'] for r in metrics.read_jsonl(os.path.join(run, 'metrics.jsonl'))
            if r['split'] == 'eval'}
  sys.path.insert(0, REPO)
  from configs import default
  r = restored_split.restore_for_split(run, default.get_config(), checkpoint_spec='best',
                                       overrides={})
  assert r.chosen == 'best by eval loss (min)'
  assert r.step == min(losses, key=losses.get)


def _run_cli(*args):
  return subprocess.run([sys.executable, '-m', 'imgcls_jax.main', '--config=configs/default.py',
                         '--mode=evaluate', *args], cwd=REPO, env=subprocess_env(1),
                        capture_output=True, text=True, timeout=300)


def _assert_one_line_error(proc, *fragments):
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1, proc.stderr
  assert lines[0].startswith('error: ')
  for fragment in fragments:
    assert fragment in lines[0]
  assert proc.stdout == ''


@pytest.mark.slow
def test_a_workdir_without_checkpoint_fails_with_one_line(tmp_path, tfds_dir):
  empty = tmp_path / 'empty'
  proc = _run_cli(f'--workdir={empty}', f'--config.data.data_dir={tfds_dir}')
  _assert_one_line_error(proc, 'No checkpoint in', str(empty), 'Train first')
  assert not empty.exists()  # evaluating creates nothing


@pytest.mark.slow
def test_a_split_that_does_not_exist_fails_with_one_line(trained, tfds_dir):
  _, workdir, _ = trained
  proc = _run_cli(f'--workdir={workdir}', f'--config.data.data_dir={tfds_dir}',
                  '--config.evaluate.split=validation')
  _assert_one_line_error(proc, "Split 'validation' does not exist", 'test, train')


@pytest.mark.slow
def test_an_output_dir_that_is_a_file_is_refused_before_evaluating(trained, tmp_path):
  """Was: the whole evaluation ran, the label-issue search warned of a FileExistsError, and the
  report was lost at the end to a generic path error."""
  config, workdir, _ = trained
  config = config.copy_and_resolve_references()
  config.evaluate.output_dir = str(tmp_path / 'a_file')
  (tmp_path / 'a_file').write_text('')
  with pytest.raises(UserError, match=r'config.evaluate.output_dir=.*a_file is a file; give a '
                                      'folder'):
    evaluate.evaluate(config, workdir)


@pytest.mark.slow
def test_flip_tta_is_refused_for_digits(trained):
  config, workdir, _ = trained
  config = config.copy_and_resolve_references()
  config.evaluate.tta = 'flip'
  with pytest.raises(UserError, match='Horizontal flips change the meaning'):
    evaluate.evaluate(config, workdir)


def test_curves_mode_needs_metrics(digits_config, tmp_path):
  with pytest.raises(UserError, match='No metrics in'):
    evaluate.curves(digits_config, str(tmp_path))
  (tmp_path / 'metrics.jsonl').write_text(json.dumps(
      {'step': 5, 'split': 'train', 'loss': 1.0, 'accuracy': 0.5}) + '\n')
  path = evaluate.curves(digits_config, str(tmp_path))
  _assert_png(path)


def test_other_images_are_matched_by_path_with_a_folder_runs_training_files(tmp_path):
  """Evaluating a folder run on another folder or manifest: the images it trained on are found
  by real path (a manifest listing the training folder's files, a folder of links to them); it
  used to take any other location as unseen and search its 'label issues'."""
  import ml_collections
  from imgcls_jax import restored_split
  from imgcls_jax.data import folder_index
  from tests.test_image_folder import make_folder
  root = str(tmp_path / 'images')
  make_folder(root)
  trained_on = ml_collections.ConfigDict({
      'name': 'image_folder', 'folder': root, 'manifest': '', 'train_split': 'train',
      'eval_split': 'test', 'holdout_fraction': 0.0, 'holdout_seed': 0})
  names = ('cat', 'dog')
  train_files = sorted(os.path.join(d, f) for d, _, fs in os.walk(os.path.join(root, 'train'))
                       for f in fs if f.endswith(('.png', '.jpg')) and 'corrupt' not in f)
  # A manifest of 3 training images and 2 test images, in a folder of its own.
  other = tmp_path / 'elsewhere'
  other.mkdir()
  rows = [(os.path.relpath(p, other), os.path.basename(os.path.dirname(p)))
          for p in train_files[:3] + [os.path.join(root, 'test', 'cat', 't0.png'),
                                      os.path.join(root, 'test', 'dog', 't1.jpg')]]
  (other / 'm.csv').write_text('path,label\n' + ''.join(f'{p},{y}\n' for p, y in rows))
  manifest = ml_collections.ConfigDict({**trained_on.to_dict(), 'folder': '',
                                        'manifest': str(other / 'm.csv'),
                                        'holdout_fraction': 0.0})
  assert restored_split._seen_files(trained_on, names, manifest, 'all') == 3
  # A folder of links to 2 training images: the same files.
  linked = tmp_path / 'linked'
  for k, p in enumerate(train_files[:2]):
    (linked / os.path.basename(os.path.dirname(p))).mkdir(parents=True, exist_ok=True)
    os.symlink(p, linked / os.path.basename(os.path.dirname(p)) / f'l{k}.png')
  folder = ml_collections.ConfigDict({**trained_on.to_dict(), 'folder': str(linked)})
  assert restored_split._seen_files(trained_on, names, folder, 'all') == 2
  # Copies, not links: the same bytes are the same image (a photo saved twice), in another folder
  # and in the run's own test split (split folders are disjoint by path, not by content).
  import shutil
  copies = tmp_path / 'copies'
  for k, p in enumerate(train_files[:3]):
    (copies / 'dog').mkdir(parents=True, exist_ok=True)
    shutil.copy(p, copies / 'dog' / f'c{k}{os.path.splitext(p)[1]}')
  shutil.copy(os.path.join(root, 'test', 'cat', 't0.png'), copies / 'dog' / 'new.png')
  folder = ml_collections.ConfigDict({**trained_on.to_dict(), 'folder': str(copies)})
  assert restored_split._seen_files(trained_on, names, folder, 'all') == 0   # other files
  assert restored_split._copied_files(trained_on, names, folder, 'all') == 3
  assert restored_split._copied_files(trained_on, names, trained_on, 'test') == 0
  assert restored_split._copied_files(trained_on, names, trained_on, 'train') == 0   # themselves
  shutil.copy(train_files[1], os.path.join(root, 'test', 'dog', 'again.png'))
  folder_index.clear_memo()
  assert restored_split._copied_files(trained_on, names, trained_on, 'test') == 1
  # A run trained on tfds or arrays: not known.
  tfds = ml_collections.ConfigDict({'name': 'sklearn_digits', 'train_split': 'train'})
  assert restored_split._seen_files(tfds, names, folder, 'all') is None


def test_a_run_stopped_before_its_end_is_said_so_when_evaluated(digits_config, tmp_path, caplog):
  """A halving trial stopped at a share of its run (or a run a signal stopped) was evaluated with
  no hint that its model is not trained to the end."""
  import logging
  from imgcls_jax import train
  digits_config.num_train_steps = 8
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(digits_config, workdir, pause_at=0.5)   # as a sweep's first rung
  with caplog.at_level(logging.WARNING):
    evaluate.evaluate(None, workdir, overrides={'evaluate.output_dir': str(tmp_path / 'e1')})
  assert ("Checkpoint 4 is the run's latest, but the run is of 8 steps: it stopped 50% of the "
          'way') in caplog.text
  train.train_and_evaluate(digits_config, workdir)   # finished
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    evaluate.evaluate(None, workdir, overrides={'evaluate.output_dir': str(tmp_path / 'e2')})
  assert 'stopped' not in caplog.text
