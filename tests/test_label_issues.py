"""Likely label issues from k-fold cross-validation (imgcls_jax/label_issues.py).

The oracle is the noise the test puts in: a manifest of sklearn's digits in which a known 5% of
the labels were changed. The flagged examples must be mostly those, and the class the models
suggest for them must be mostly the label they had before.
"""
from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from imgcls_jax import cross_validation, label_issues, out_of_fold
from imgcls_jax.data import digits, reader

NOISE = 0.05


def _noisy_manifest(root: str, seed: int = 0
                    ) -> tuple[str, dict[str, tuple[int, int]], dict[str, int]]:
  """root/img/<i>.png for all 1797 digits and root/labels.csv with 5% of the labels changed to
  another digit; returns the manifest, {path: (true label, written label)} of the changed and
  {path: written label} of all."""
  x = np.concatenate([digits.load_arrays('train')[0], digits.load_arrays('test')[0]])
  y = np.concatenate([digits.load_arrays('train')[1], digits.load_arrays('test')[1]])
  rng = np.random.default_rng(seed)
  changed = rng.choice(len(y), int(NOISE * len(y)), replace=False)
  written = y.copy()
  written[changed] = (y[changed] + rng.integers(1, 10, len(changed))) % 10
  os.makedirs(os.path.join(root, 'img'), exist_ok=True)
  rows, flipped, label_of = [], {}, {}
  for i in range(len(y)):
    path = f'img/{i}.png'
    Image.fromarray(x[i, :, :, 0]).save(os.path.join(root, path))
    rows.append(f'{path},{written[i]}\n')
    label_of[path] = int(written[i])
    if written[i] != y[i]:
      flipped[path] = (int(y[i]), int(written[i]))
  manifest = os.path.join(root, 'labels.csv')
  with open(manifest, 'w') as f:
    f.write('path,label\n' + ''.join(rows))
  return manifest, flipped, label_of


@pytest.fixture(scope='module')
def noisy(tmp_path_factory):
  """``_noisy_manifest`` written once for the module's two cross-validations (they only read
  it)."""
  return _noisy_manifest(str(tmp_path_factory.mktemp('noisy')))


@pytest.mark.slow
def test_cross_validation_flags_the_labels_that_were_changed(digits_config, noisy, tmp_path,
                                                             capsys):
  manifest, flipped, label_of = noisy
  c = digits_config
  c.data.name = 'image_folder'
  c.data.manifest = manifest
  c.data.train_split = 'all'
  c.data.eval_split = 'all'
  c.data.train_preprocess = ''
  c.data.eval_preprocess = ''
  c.data.mean = (0.3,)
  c.data.std = (0.4,)
  c.cross_validation.folds = 2
  # The run of the evaluate test below (its programs, compiled once): 200 steps, batches of 64.
  c.num_train_steps = 200
  c.optim.warmup_steps = 10
  c.batch_size = 64
  c.eval_batch_size = 64
  workdir = str(tmp_path / 'cv')
  summary = cross_validation.cross_validate(c, workdir)

  with open(os.path.join(workdir, label_issues.FILE)) as f:
    found = list(csv.DictReader(f))
  assert tuple(found[0]) == label_issues.COLUMNS
  flagged = {r['id'] for r in found}
  hits = flagged & set(flipped)
  recall, precision = len(hits) / len(flipped), len(hits) / max(len(flagged), 1)
  with capsys.disabled():   # the figures, for the notes (pytest -s)
    print(f'\n{len(flipped)} changed, {len(flagged)} flagged, recall {recall:.3f}, precision '
          f'{precision:.3f}, pooled accuracy {summary["pooled_out_of_fold"]["accuracy"]:.4f}')
  assert recall >= 0.8 and precision >= 0.6
  # For the changed labels it found, the models point back at the label the image had.
  back = sum(int(r['suggested']) == flipped[r['id']][0] for r in found if r['id'] in flipped)
  assert back >= 0.9 * len(hits)
  for r in found:   # each row's label is the manifest's for its image
    assert r['label'] == str(label_of[r['id']])
    assert os.path.exists(os.path.join(os.path.dirname(manifest), r['id']))
  # Ranked by the probability of the given label, the least likely first.
  p_label = [float(r['p_label']) for r in found]
  assert p_label == sorted(p_label)
  assert [int(r['rank']) for r in found] == list(range(1, len(found) + 1))
  # Each example is flagged by the fold that held it out (its model never trained on it).
  for r in found[:20]:
    with open(os.path.join(workdir, f"fold_{r['fold']}", 'eval_ids.txt')) as f:
      assert r['id'] in f.read().split('\n')

  # The other examples, as an id list the input pipeline reads: training on them drops the flagged.
  kept_path = os.path.join(workdir, label_issues.KEPT)
  kept = open(kept_path).read().split()
  assert len(kept) == 1797 - len(found) and not set(kept) & flagged
  kept_split = reader.example_ids(c.data, f'all@{kept_path}')
  assert sorted(kept_split) == sorted(kept)

  s = summary['label_issues']
  assert s['count'] == len(found) and s['num_examples'] == 1797
  assert s['picture'] == label_issues.PICTURE
  assert os.path.getsize(os.path.join(workdir, label_issues.PICTURE)) > 5000
  with open(os.path.join(workdir, 'cv_report.json')) as f:
    assert json.load(f)['label_issues']['count'] == len(found)
  md = open(os.path.join(workdir, 'cv_report.md')).read()
  assert '## Likely label issues' in md and f"`{found[0]['id']}`" in md
  assert f'likely label issues: {len(found)}' in capsys.readouterr().out


def test_the_classical_baselines_cross_validation_flags_the_changed_labels(digits_config, noisy,
                                                                            tmp_path, capsys):
  """--mode=classical with folds: the same list from the feature classifier's out-of-fold
  probabilities; each row's p_label is the fold's saved classifier's probability of the label."""
  import joblib
  from imgcls_jax import classical, classical_model, features
  from imgcls_jax.data import images
  manifest, flipped, label_of = noisy
  c = digits_config
  c.data.name, c.data.manifest = 'image_folder', manifest
  c.data.train_split = c.data.eval_split = 'all'
  c.data.train_preprocess = c.data.eval_preprocess = ''
  c.classical.hog_cell, c.classical.edge_grid, c.classical.edge_sigma = 2, 2, 0.5
  c.classical.C, c.classical.workers = 0.1, 2
  c.cross_validation.folds = 3
  workdir = str(tmp_path / 'cv')
  summary = classical.classical(c, workdir)
  with open(os.path.join(workdir, label_issues.FILE)) as f:
    found = list(csv.DictReader(f))
  flagged = {r['id'] for r in found}
  hits = flagged & set(flipped)
  with capsys.disabled():
    print(f'\nclassical: {len(flipped)} changed, {len(flagged)} flagged, recall '
          f'{len(hits) / len(flipped):.3f}, precision {len(hits) / len(flagged):.3f}')
  assert len(hits) >= 0.7 * len(flipped) and len(hits) >= 0.5 * len(flagged)
  spec = features.spec_from_config(c.classical)
  root = os.path.dirname(manifest)
  for r in found[:10]:
    assert r['label'] == str(label_of[r['id']])
    fitted = joblib.load(os.path.join(workdir, f"fold_{r['fold']}", classical_model.MODEL_FILE))
    x = images.decode(os.path.join(root, r['id']), channels=1)[None]
    p = fitted.predict_proba(features.extract(x, spec))[0]
    assert float(r['p_label']) == pytest.approx(p[int(r['label'])], abs=1e-4)
  assert summary['label_issues']['count'] == len(found)
  assert '## Likely label issues' in open(os.path.join(workdir, 'cv_report.md')).read()
  assert f'likely label issues: {len(found)}' in capsys.readouterr().out
  kept = open(os.path.join(workdir, label_issues.KEPT)).read().split()
  assert len(kept) == 1797 - len(found)


def test_the_search_on_probabilities_with_a_known_answer(tmp_path):
  """A direct check of the search on probabilities with a known answer, and of the rows."""
  rng = np.random.default_rng(0)
  n, k = 600, 3
  truth = rng.integers(0, k, n)
  probs = np.full((n, k), 0.05, np.float32)
  probs[np.arange(n), truth] = 0.9
  labels = truth.copy()
  wrong = rng.choice(n, 30, replace=False)
  labels[wrong] = (truth[wrong] + 1) % k
  ranked = label_issues.find(labels, probs)
  assert set(ranked.tolist()) == set(wrong.tolist())
  rows = label_issues.rows(ranked, ids=[f'x{i}' for i in range(n)], folds=np.zeros(n, int),
                           labels=labels, probs=probs, class_names=('a', 'b', 'c'))
  assert all(r['suggested'] == 'abc'[truth[int(r['id'][1:])]] for r in rows)
  path = str(tmp_path / label_issues.FILE)
  label_issues.write_csv(rows, path)
  with open(path) as f:
    assert len(list(csv.DictReader(f))) == 30


def test_the_tag_search_on_probabilities_with_a_known_answer(tmp_path):
  """Tagging: one tag changed on 40 of 800 examples whose probabilities are sure of the truth.
  The search finds only those, in cleanlab's set, and names each changed tag as missing
  (a true tag dropped) or extra (a false one added)."""
  from cleanlab.multilabel_classification.filter import find_label_issues
  from cleanlab.multilabel_classification.rank import get_label_quality_scores
  rng = np.random.default_rng(0)
  n, k, names = 800, 4, ('a', 'b', 'c', 'd')
  truth = rng.random((n, k)) < 0.35
  probs = (np.where(truth, 0.9, 0.05) + rng.uniform(-0.04, 0.04, (n, k))).astype(np.float32)
  labels = truth.copy()
  wrong, tag = rng.choice(n, 40, replace=False), rng.integers(0, k, 40)
  labels[wrong, tag] ^= True
  ranked, cells, quality = label_issues.find_tags(labels, probs)
  tag_lists = [np.flatnonzero(r).tolist() for r in labels]
  oracle = find_label_issues(tag_lists, probs.astype(np.float64), n_jobs=1)
  assert sorted(ranked.tolist()) == np.flatnonzero(oracle).tolist()   # cleanlab's set
  scores = get_label_quality_scores(tag_lists, probs.astype(np.float64),
                                    aggregator_kwargs={'method': 'softmin', 'temperature': 0.1})
  assert np.all(np.diff(scores[ranked]) >= 0)   # its scores, pooled by a soft minimum, worst first
  # Every flagged example is a changed one, flagged at the changed tag only; confident learning
  # counts the errors per tag from the probabilities and finds 33 of the 40 here.
  assert set(ranked.tolist()) <= set(wrong.tolist()) and len(ranked) >= 30
  assert cells.sum() == len(ranked) and cells[wrong, tag].sum() == len(ranked)
  rows = label_issues.tag_rows(ranked, cells, quality, ids=[f'x{i}' for i in range(n)],
                               labels=labels, class_names=names, positions=np.arange(n))
  changed = dict(zip(wrong.tolist(), tag.tolist()))
  for r in rows:
    i = int(r['id'][1:])
    assert r['position'] == i
    assert r['missing' if truth[i, changed[i]] else 'extra'] == names[changed[i]]
    assert r['suggested'] == ';'.join(names[j] for j in np.flatnonzero(truth[i]))
  path = str(tmp_path / label_issues.EVAL_FILE)
  label_issues.write_csv(rows, path, label_issues.EVAL_TAG_COLUMNS)
  with open(path) as f:
    back = list(csv.DictReader(f))
  assert [r['id'] for r in back] == [r['id'] for r in rows]
  assert [float(r['quality']) for r in back] == sorted(float(r['quality']) for r in back)
  s = label_issues.summary(rows, n, 'test', evaluation=True, tagged=True)
  md = '\n'.join(label_issues.markdown(s))
  assert '| rank | id | position | tags | suggested | quality |' in md
  assert f"| 1 | `{rows[0]['id']}` |" in md


def test_a_tag_on_every_example_or_on_none_is_not_judged_and_the_others_are(caplog):
  """A tag every example carries (or none does) has no examples to compare: cleanlab refuses it,
  so its cells are left unflagged, with a warning; the other tags are searched as before."""
  rng = np.random.default_rng(1)
  n = 400
  truth = rng.random((n, 4)) < 0.4
  truth[:, 1], truth[:, 3] = True, False
  probs = (np.where(truth, 0.9, 0.05) + rng.uniform(-0.04, 0.04, (n, 4))).astype(np.float32)
  labels = truth.copy()
  wrong = rng.choice(n, 20, replace=False)
  labels[wrong, 0] ^= True
  ranked, cells, _ = label_issues.find_tags(labels, probs, ('a', 'all', 'b', 'none'))
  assert set(ranked.tolist()) <= set(wrong.tolist()) and len(ranked) >= 15
  assert not cells[:, 1].any() and not cells[:, 3].any()
  assert 'all, none on every example of the split or on none, so not judged' in caplog.text
  ranked, cells, _ = label_issues.find_tags(np.zeros((n, 4), bool), probs)   # no tag at all
  assert len(ranked) == 0 and not cells.any()


def test_a_missing_cleanlab_is_one_line_before_any_fold_trains(digits_config, monkeypatch):
  from imgcls_jax.errors import UserError
  digits_config.cross_validation.folds = 2
  real = out_of_fold.importlib.util.find_spec
  monkeypatch.setattr(out_of_fold.importlib.util, 'find_spec',
                      lambda name, *a: None if name == 'cleanlab' else real(name, *a))
  with pytest.raises(UserError, match=r'needs cleanlab, which is not installed: run pip install '
                                      r'-e \. .*label_issues=False'):
    out_of_fold.OutOfFold(digits_config, 1797)
  digits_config.cross_validation.label_issues = False   # off: no cleanlab needed
  assert not out_of_fold.OutOfFold(digits_config, 1797).wanted


@pytest.mark.slow
def test_evaluate_flags_the_changed_labels_of_a_test_split_and_not_of_the_training_split(
    digits_config, tmp_path, capsys, monkeypatch, caplog):
  """--mode=evaluate on a held-out split whose labels were changed in part (10% of sklearn's 450
  test digits), the training split clean: the changes are what it flags."""
  from imgcls_jax import evaluate, report_files, train
  xs = {s: digits.load_arrays(s) for s in ('train', 'test')}
  rng = np.random.default_rng(1)
  y_test = xs['test'][1].copy()
  changed = rng.choice(len(y_test), 45, replace=False)
  y_test[changed] = (y_test[changed] + rng.integers(1, 10, 45)) % 10
  root = tmp_path / 'data'
  rows, flipped = [], set()
  for split, (x, y) in (('train', xs['train']), ('test', (xs['test'][0], y_test))):
    os.makedirs(root / split, exist_ok=True)
    for i in range(len(y)):
      path = f'{split}/{i}.png'
      Image.fromarray(x[i, :, :, 0]).save(root / path)
      rows.append(f'{path},{y[i]},{split}\n')
      if split == 'test' and y[i] != xs['test'][1][i]:
        flipped.add(path)
  (root / 'labels.csv').write_text('path,label,split\n' + ''.join(rows))
  c = digits_config
  c.data.name = 'image_folder'
  c.data.manifest = str(root / 'labels.csv')
  c.data.train_split, c.data.eval_split = 'train', 'test'
  c.data.train_preprocess = c.data.eval_preprocess = ''
  c.data.mean, c.data.std = (0.3,), (0.4,)
  c.num_train_steps = 200   # (as the cross-validation test's folds: their compiled programs)
  c.optim.warmup_steps = 10
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(c, workdir)
  capsys.readouterr()

  c.evaluate.output_dir = out = str(tmp_path / 'out')
  rep = evaluate.evaluate(c, workdir)
  with open(os.path.join(out, label_issues.EVAL_FILE)) as f:
    found = list(csv.DictReader(f))
  assert tuple(found[0]) == label_issues.EVAL_COLUMNS
  flagged = {r['id'] for r in found}
  hits = flagged & flipped
  with capsys.disabled():
    print(f'\nevaluate: {len(flipped)} changed, {len(flagged)} flagged, recall '
          f'{len(hits) / len(flipped):.3f}, precision {len(hits) / len(flagged):.3f}')
  assert len(hits) >= 0.8 * len(flipped) and len(hits) >= 0.6 * len(flagged)
  label_of = {line.split(',')[0]: line.split(',')[1] for line in rows}
  for r in found:   # the row's label is the manifest's; its position is the id's in read order
    assert r['label'] == label_of[r['id']] and r['id'] == f"test/{r['id'].split('/')[1]}"
  s = rep['label_issues']
  assert s['count'] == len(found) and s['num_examples'] == 450 and s['kept_ids'] is None
  with open(os.path.join(out, 'report.json')) as f:
    files = json.load(f)['files']
  assert label_issues.EVAL_FILE in files and label_issues.EVAL_PICTURE in files
  assert '## Likely label issues' in open(os.path.join(out, 'report.md')).read()
  assert f'likely label issues: {len(found)} of 450' in capsys.readouterr().out

  # The training split: probabilities of learnt examples; no search, and the last list goes.
  c.evaluate.split = 'train'
  rep = evaluate.evaluate(c, workdir)
  assert 'label_issues' not in rep
  assert not any(os.path.exists(os.path.join(out, n)) for n in report_files.ISSUE_FILES)

  # Without cleanlab (a venv from before it was a dependency): a warning, and the report.
  real = evaluate.importlib.util.find_spec
  monkeypatch.setattr(evaluate.importlib.util, 'find_spec',
                      lambda name, *a: None if name == 'cleanlab' else real(name, *a))
  c.evaluate.split = 'test'
  rep = evaluate.evaluate(c, workdir)
  assert 'label_issues' not in rep and rep['num_examples'] == 450
  assert 'cleanlab is not installed; run pip install -e .' in caplog.text
