"""k-fold cross-validation: deterministic stratified folds, the subset-split hook, the CV run."""
import collections
import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from imgcls_jax import cross_validation, evaluate, metrics, train
from imgcls_jax.data import digits, folds, pipeline
from imgcls_jax.errors import UserError
from tests.conftest import main_run_here


def test_folds_are_stratified_disjoint_complete_and_fixed_by_the_seed(digits_config):
  data = digits_config.data
  a = folds.assign(data, 'train+test', 5, seed=0)
  b = folds.assign(data, 'train+test', 5, seed=0)
  c = folds.assign(data, 'train+test', 5, seed=1)
  assert len(a.ids) == len(set(a.ids)) == 1797
  np.testing.assert_array_equal(a.fold, b.fold)
  assert a.ids == b.ids
  assert (a.fold != c.fold).mean() > 0.5
  held = [set(a.held_out(i)) for i in range(5)]
  assert sum(len(h) for h in held) == 1797 and set().union(*held) == set(a.ids)
  for i in range(5):
    assert set(a.training(i)) == set(a.ids) - held[i]
    per_class = np.bincount(a.labels[a.fold == i], minlength=10)
    overall = np.bincount(a.labels, minlength=10)
    # Stratified: each fold holds 1/5 of every class (to within one example).
    assert np.all(np.abs(per_class - overall / 5) <= 1), per_class
  with pytest.raises(UserError, match='at least 2 folds'):
    folds.assign(data, 'train', 1, seed=0)
  with pytest.raises(UserError, match="Split 'validation' does not exist"):
    folds.assign(data, 'validation', 5, seed=0)
  data.name = 'arrays:sklearn_digits'   # the default config's: no example ids to fold by
  with pytest.raises(UserError, match=r"lists examples by tfds id or file.*configs/digits_cv\.py"):
    folds.assign(data, 'train', 5, seed=0)
  data.name = 'image_folder'   # folders cross-validate too (test_folder_index.py), once located
  with pytest.raises(UserError, match='neither config.data.folder nor config.data.manifest'):
    folds.assign(data, 'train', 5, seed=0)


def test_a_folder_without_splits_is_cross_validated_as_all(digits_config, tmp_path):
  """A folder of class directories has no 'train' to cut into folds: the refusal names
  train_split=all (every image; the folds are the evaluation), not a hold-out that shrinks the
  pool."""
  x, y = digits.load_arrays('train')
  for c in (0, 1):
    os.makedirs(tmp_path / str(c))
    for j, i in enumerate(np.flatnonzero(y == c)[:4]):
      Image.fromarray(x[i, :, :, 0]).save(tmp_path / str(c) / f'{j}.png')
  data = digits_config.data
  data.name, data.folder, data.index_cache = 'image_folder', str(tmp_path), 'off'
  with pytest.raises(UserError, match=rf"^{tmp_path} has no split directories, so config.data."
                     r"train_split='train', .* set --config.data.train_split=all to "
                     r'cross-validate every image \(the held-out folds are the evaluation: no '
                     r'test split is needed\).$'):
    folds.assign(data, 'train', 2, seed=0)
  assert len(folds.assign(data, 'all', 2, seed=0).ids) == 8
  data.holdout_fraction = 0.25   # a test set kept out: the folds cut what is left
  assert len(folds.assign(data, 'train', 2, seed=0).ids) == 6


def test_the_train_command_takes_the_fold_count(tmp_path, tfds_dir, monkeypatch, capsys):
  """The command line's entry point (``python -m imgcls_jax.main`` is ``sys.exit(main.run())``),
  in this process (``main_run_here``): a child paid ~8 s of imports for this one line."""
  proc = main_run_here(monkeypatch, capsys, '--config=configs/default.py',
                       f'--workdir={tmp_path}', f'--config.data.data_dir={tfds_dir}',
                       '--config.cross_validation.folds=1')
  status, err = proc.returncode, proc.stderr
  assert status == 2, err
  assert err.strip().splitlines() == [
      'error: config.cross_validation.folds=1: use 0 (off) or at least 2 folds.']


def test_a_subset_split_reads_exactly_the_listed_examples(digits_config, tmp_path):
  data = digits_config.data
  ids, labels = folds.read_ids_and_labels(data, 'train')
  keep = ids[::7]
  path = str(tmp_path / 'ids.txt')
  folds.write_ids(path, keep)
  split = folds.subset_split('train', path)
  ev = pipeline.EvalData(data, split, local_batch_size=64)
  got = np.concatenate([b['label'][b['mask']] for b in ev.batches()])
  assert len(got) == len(keep)
  assert collections.Counter(got.tolist()) == collections.Counter(labels[::7].tolist())
  n = pipeline.examples_per_process(data, split, 0, 1)
  assert n == len(keep)
  data.train_split = split
  _, per_epoch = pipeline.train_dataset(data, seed=0, local_batch_size=32)
  assert per_epoch == len(keep)
  folds.write_ids(path, keep)  # same ids again: fine
  with pytest.raises(UserError, match='use a new --workdir'):
    folds.write_ids(path, keep[1:])
  with pytest.raises(UserError, match='missing or empty'):
    pipeline.EvalData(data, folds.subset_split('train', str(tmp_path / 'nope.txt')),
                      local_batch_size=64)


def _cv_config(digits_config, k):
  c = digits_config
  c.data.train_split = 'train+test'
  c.cross_validation.folds = k
  c.num_train_steps = 15
  c.optim.warmup_steps = 3
  c.batch_size = 64
  c.eval_batch_size = 128
  return c


@pytest.mark.slow
def test_cross_validation_end_to_end_and_resume(digits_config, tmp_path, monkeypatch, capsys,
                                                caplog):
  # Two folds: a third cost ~1/3 more and showed nothing more (fold 1, the last, is resumed).
  config = _cv_config(digits_config, 2)
  workdir = str(tmp_path / 'cv')

  # An interrupted run: fold 1 dies after fold 0 finished.
  real = train.train_and_evaluate
  calls = []

  def dies_on_fold_1(cfg, wd):
    calls.append(os.path.basename(wd))
    if os.path.basename(wd) == 'fold_1':
      raise KeyboardInterrupt
    return real(cfg, wd)

  monkeypatch.setattr(train, 'train_and_evaluate', dies_on_fold_1)
  with pytest.raises(KeyboardInterrupt):
    cross_validation.cross_validate(config, workdir)
  monkeypatch.setattr(train, 'train_and_evaluate', real)
  fold0_metrics = open(os.path.join(workdir, 'fold_0', 'metrics.jsonl')).read()
  with open(os.path.join(workdir, 'fold_0', 'report.json')) as f:
    fold0_report = json.load(f)

  # The training loop alone refuses k-fold configs (main's 'train' mode dispatches them).
  with pytest.raises(UserError, match='k-fold cross-validation is its own entry point'):
    train.train_and_evaluate(config, workdir)
  summary = cross_validation.cross_validate(config, workdir)
  assert calls == ['fold_0', 'fold_1']
  # Fold 0 was finished: it was not trained again (no new metrics records).
  assert open(os.path.join(workdir, 'fold_0', 'metrics.jsonl')).read() == fold0_metrics
  assert summary['per_fold'][0]['accuracy'] == fold0_report['accuracy']
  assert summary['per_fold'][0]['loss'] == fold0_report['loss']

  assert summary['folds'] == 2 and summary['num_examples'] == 1797
  rows = summary['per_fold']
  assert [r['fold'] for r in rows] == [0, 1]
  assert sum(r['eval_examples'] for r in rows) == 1797
  assert all(r['train_examples'] + r['eval_examples'] == 1797 for r in rows)
  assert all(r['checkpoint_step'] == 15 for r in rows)
  for key in ('accuracy', 'f1_macro', 'ece', 'loss', 'accuracy_top5'):
    values = [r[key] for r in rows]
    assert summary['mean'][key] == pytest.approx(np.mean(values))
    assert summary['std'][key] == pytest.approx(np.std(values))
  pooled = summary['pooled_out_of_fold']
  # Every example of the split was predicted exactly once, by the model that did not train on it.
  assert pooled['num_examples'] == 1797 and np.sum(pooled['confusion_matrix']) == 1797
  expected_pooled = sum(r['accuracy'] * r['eval_examples'] for r in rows) / 1797
  assert pooled['accuracy'] == pytest.approx(expected_pooled)
  assert summary['mean']['accuracy'] > 0.15  # above chance (0.1) after 15 steps
  for i in range(2):
    fold_dir = os.path.join(workdir, f'fold_{i}')
    with open(os.path.join(fold_dir, 'report.json')) as f:
      rep = json.load(f)
    assert rep['num_examples'] == rows[i]['eval_examples']
    assert rep['accuracy'] == pytest.approx(rows[i]['accuracy'])
    for png in ('confusion_matrix.png', 'reliability.png', 'training_curves.png'):
      assert os.path.getsize(os.path.join(fold_dir, png)) > 1000
    evals = [r for r in metrics.read_jsonl(os.path.join(fold_dir, 'metrics.jsonl'))
             if r['split'] == 'eval']
    assert evals[-1]['count'] == rows[i]['eval_examples']
  for name in ('cv_report.json', 'cv_report.md', 'cv_confusion_matrix.png', 'cv_reliability.png',
               'cv_label_issues.csv'):
    assert os.path.exists(os.path.join(workdir, name))
  # The label-issue list names tfds examples by the ids the folds were cut by (after 15 steps the
  # models are weak: many examples are flagged; tests/test_label_issues.py checks the search).
  held_out_by = {}
  for i in range(2):
    with open(os.path.join(workdir, f'fold_{i}', 'eval_ids.txt')) as f:
      held_out_by.update({x: i for x in f.read().split()})
  with open(os.path.join(workdir, 'cv_label_issues.csv')) as f:
    flagged = list(csv.DictReader(f))
  assert len(flagged) == summary['label_issues']['count'] > 0
  assert all(held_out_by[r['id']] == int(r['fold']) for r in flagged)
  # Each row's probabilities are its own example's: the label it gives is the split's.
  assignment = folds.assign(config.data, 'train+test', 2, config.seed)
  label_of = dict(zip(assignment.ids, assignment.labels.tolist()))
  assert all(int(r['label']) == label_of[r['id']] for r in flagged)
  assert not os.path.exists(os.path.join(workdir, 'cv_label_issues.png'))   # tfds: no files
  issue_files = ('cv_label_issues.csv', 'cv_kept_ids.txt')
  assert all(os.path.exists(os.path.join(workdir, n)) for n in issue_files)
  printed = capsys.readouterr().out
  assert '2-fold cross-validation of sklearn_digits:train+test' in printed and '+-std' in printed

  # Moved elsewhere, a fold is evaluated from its own id lists (they were read from the old path,
  # gone), as --mode=evaluate calls it: it reports in <fold>/evaluate; the fold's report, which
  # cv_report.md links, is the cross-validation's record and stays byte for byte.
  import logging
  import shutil
  moved = str(tmp_path / 'elsewhere' / 'cv')
  shutil.move(workdir, moved)
  fold_dir = os.path.join(moved, 'fold_0')
  before = {n: open(os.path.join(fold_dir, n), 'rb').read() for n in ('report.json', 'report.md')}
  moved0 = evaluate.evaluate(None, fold_dir, overrides={})   # as --mode=evaluate calls it
  assert moved0['accuracy'] == rows[0]['accuracy']
  assert moved0['num_examples'] == rows[0]['eval_examples']
  assert {n: open(os.path.join(fold_dir, n), 'rb').read() for n in before} == before
  with open(os.path.join(fold_dir, 'evaluate', 'report.json')) as f:
    assert json.load(f)['accuracy'] == rows[0]['accuracy']

  # The search turned off, the moved run again (one rerun shows both): the finished folds are
  # evaluated again from the same checkpoints, the last run's lists go, and it resumes without a
  # "changed config" warning about the id lists' new paths.
  config.cross_validation.label_issues = False
  with caplog.at_level(logging.WARNING):
    again = cross_validation.cross_validate(config, moved)
  assert 'label_issues' not in again
  assert again['mean']['accuracy'] == summary['mean']['accuracy']   # the same checkpoints
  assert not any(os.path.exists(os.path.join(moved, n)) for n in issue_files)
  assert 'changed config' not in caplog.text and 'other evaluations' not in caplog.text

  # Another seed in the same workdir is refused (its folds would differ).
  config.seed = 1
  with pytest.raises(UserError, match='use a new --workdir'):
    cross_validation.cross_validate(config, moved)
