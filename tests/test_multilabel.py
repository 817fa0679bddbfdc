"""Multi-label (tagging) runs: the sigmoid loss against PyTorch, labels from a manifest and from a
tfds sequence feature, and one run through train -> thresholds -> evaluate -> predict -> export ->
serve, checked against scikit-learn on the model's own probabilities. Also class-balanced sampling.
"""
import csv
import io
import json
import os
import pathlib
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from PIL import Image
from sklearn import metrics as skm

from imgcls_jax import inference, loss_weights, predict, report, run, steps, train
from imgcls_jax.data import folder_index, folder_layout, image_folder, pipeline, sources
from imgcls_jax.errors import UserError
from tests.conftest import REPO

TAGS = ('zero', 'one', 'two', 'three', 'four')


def _digit_tiles(root, counts=(('train', 480), ('validation', 160), ('test', 160)), seed=0):
  """16x16 images tiling 1-2 sklearn digits (classes 0-4) on a 2x2 grid; tags = the digits'
  names. Returns {split: [(relative path, set of tags)]}, written with a manifest.csv."""
  from sklearn.datasets import load_digits
  d = load_digits()
  x = (d.images * 255 / 16).astype(np.uint8)
  pool = np.flatnonzero(d.target < 5)
  rng = np.random.default_rng(seed)
  out, rows = {}, []
  for split, n in counts:
    os.makedirs(os.path.join(root, split), exist_ok=True)
    out[split] = []
    for i in range(n):
      img, tags = np.zeros((16, 16), np.uint8), set()
      for cell in rng.choice(4, rng.integers(1, 3), replace=False):
        j = rng.choice(pool)
        r, q = divmod(int(cell), 2)
        img[r * 8:(r + 1) * 8, q * 8:(q + 1) * 8] = x[j]
        tags.add(TAGS[d.target[j]])
      rel = f'{split}/{i:04d}.png'
      Image.fromarray(img).save(os.path.join(root, rel))
      out[split].append((rel, tags))
      rows.append((rel, ';'.join(sorted(tags)), split))
  with open(os.path.join(root, 'manifest.csv'), 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(['path', 'labels', 'split'])
    w.writerows(rows)
  return out


def _config(manifest):
  if REPO not in sys.path:
    sys.path.insert(0, REPO)
  from configs import default
  c = default.get_config()
  c.data.name = 'image_folder'
  c.data.manifest = manifest
  c.data.multilabel = True
  c.data.train_split, c.data.eval_split = 'train', 'test'
  c.data.train_preprocess = c.data.device_preprocess = ''
  c.evaluate.threshold_split = 'validation'
  c.label_smoothing = 0.0
  c.model.widths = (16, 32)   # as good as the default (32, 64, 128) here, half the compiling
  c.batch_size = c.eval_batch_size = 64
  c.num_epochs = 30.0
  c.optim.learning_rate = 0.2
  c.eval_every_epochs = c.checkpoint_every_epochs = -1.0
  c.progress_bar = c.tensorboard = False
  return c


@pytest.fixture(scope='module')
def tagged_run(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('tiles'))
  truth = _digit_tiles(root)
  config = _config(os.path.join(root, 'manifest.csv'))
  workdir = str(tmp_path_factory.mktemp('tagged_run'))
  final = train.train_and_evaluate(config, workdir)
  return config, workdir, root, truth, final


def _multi_hot(tag_sets):
  return np.array([[t in tags for t in TAGS] for tags in tag_sets], np.int64)


def test_sigmoid_loss_and_gradient_match_pytorch():
  torch = pytest.importorskip('torch')
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 3, (6, 5)).astype(np.float32)
  y = (rng.random((6, 5)) < 0.4).astype(np.float32)
  w = (0.5, 1.0, 2.0, 4.0, 9.0)
  for pos_weight in (None, w):
    got = jax.value_and_grad(lambda x: steps.sigmoid_cross_entropy(x, jnp.asarray(y),
                                                                    pos_weight).mean())(logits)
    x = torch.tensor(logits, requires_grad=True)
    ref = torch.nn.BCEWithLogitsLoss(
        pos_weight=None if pos_weight is None else torch.tensor(w))(x, torch.tensor(y))
    ref.backward()
    np.testing.assert_allclose(float(got[0]), float(ref.detach()), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(got[1]), x.grad.numpy(), rtol=1e-5, atol=1e-7)
  # Without weights the gradient is (sigmoid(x) - y) / (B K): checked against the formula too.
  g = jax.grad(lambda x: steps.sigmoid_cross_entropy(x, jnp.asarray(y)).mean())(logits)
  np.testing.assert_allclose(np.asarray(g), (1 / (1 + np.exp(-logits)) - y) / y.size, rtol=1e-5,
                             atol=1e-7)


def test_manifest_tags_become_multi_hot_rows(tmp_path):
  truth = _digit_tiles(str(tmp_path), counts=(('train', 40), ('test', 12)))
  c = _config(str(tmp_path / 'manifest.csv'))
  info = sources.describe(c.data)
  assert info.multilabel and info.class_names == tuple(sorted(TAGS))
  names = info.class_names
  indexed = folder_index.index(folder_layout.source_of(c.data), 'test', names)
  rows = {ex['tfds_id'].decode(): ex['label'] for ex in
          image_folder.dataset(indexed, 1).as_numpy_iterator()}
  for rel, tags in truth['test']:
    assert rows[rel].tolist() == [int(n in tags) for n in names], rel
  counts = sources.class_counts(c.data, 'train', len(names))
  assert counts.tolist() == [sum(n in t for _, t in truth['train']) for n in names]
  # pos_weight='balanced' = negatives / positives of each tag in the training split.
  c.loss.pos_weight = 'balanced'
  np.testing.assert_allclose(loss_weights.pos_weight(c, info), (40 - counts) / counts)
  c.loss.pos_weight = ''
  c.loss.class_weights = 'balanced'
  with pytest.raises(UserError, match='pos_weight'):
    run.setup(c, info)


def test_a_tfds_sequence_label_is_read_as_multi_hot(tmp_path):
  import tensorflow_datasets as tfds
  c = _config('')
  c.data.name, c.data.manifest = 'voc/2007', None
  c.data.train_split, c.data.eval_split = 'train', 'test'
  with tfds.testing.mock_data(num_examples=6):
    info = sources.describe(c.data)
    assert info.multilabel and info.num_classes == 20
    raw = [sorted(set(ex['labels'].tolist())) for ex in
           tfds.as_numpy(tfds.builder('voc/2007').as_dataset(split='train'))]
    got = [np.flatnonzero(ex['label']).tolist() for ex in
           sources.read(c.data, 'train', 0, 1, drop_remainder=False).as_numpy_iterator()]
    assert got == raw
    c.data.multilabel = False
    with pytest.raises(UserError, match='multilabel=True'):
      sources.describe(c.data)


def test_tagged_run_metrics_equal_sklearn_on_the_models_probabilities(tagged_run):
  from sklearn import metrics as skm
  config, workdir, root, truth, final = tagged_run
  trained = inference.load(workdir)
  clf = inference.classifier(trained)
  assert trained.thresholds is not None and len(trained.thresholds) == len(TAGS)
  test = truth['test']
  images = np.stack([clf.prepare(os.path.join(root, rel)) for rel, _ in test])
  probs = clf.predict_arrays(images)['probabilities']
  y = _multi_hot([t for _, t in test])
  order = [TAGS.index(n) for n in trained.class_names]
  y = y[:, order]
  ap = skm.average_precision_score(y, probs, average='macro')
  assert abs(final['map'] - ap) < 5e-3, (final['map'], ap)       # binned histograms vs raw
  pred = (probs >= np.asarray(trained.thresholds, np.float32)).astype(int)
  for avg in ('micro', 'macro'):
    assert abs(final[f'f1_{avg}'] - skm.f1_score(y, pred, average=avg, zero_division=0)) < 0.01
  assert abs(final['accuracy'] - skm.accuracy_score(y, pred)) <= 2 / len(test)
  assert abs(final['hamming_loss'] - skm.hamming_loss(y, pred)) <= 2 / y.size
  assert final['map'] > 0.9 and final['accuracy'] > 0.6, final   # it learned the tags
  # The tag probabilities' calibration: per-bin fractions and mean probabilities from sklearn.
  # (Another batching moves a probability by ~1e-7; one that close to a bin edge may change bin.)
  bins = report.DEFAULT_CALIBRATION_BINS
  edge = bool(np.any(np.abs(probs * bins - np.round(probs * bins)) < 1e-4))
  tol = 2.0 / y.size if edge else 1e-4
  assert final['ece'] == pytest.approx(_ece(y.ravel(), probs.ravel()), abs=tol)
  assert final['ece_classwise'] == pytest.approx(
      np.mean([_ece(y[:, k], probs[:, k]) for k in range(len(TAGS))]),
      abs=2.0 / len(y) if edge else 1e-4)
  assert set(final) == set(report.eval_metric_names(multilabel=True))   # best_metric's choices


def _ece(y, p, n_bins=report.DEFAULT_CALIBRATION_BINS):
  """Expected calibration error of binary outcomes: sklearn's reliability curve weighted by the
  pairs in each of its bins (sklearn bins with searchsorted on the inner edges)."""
  from sklearn.calibration import calibration_curve
  fraction, mean = calibration_curve(y, p, n_bins=n_bins, strategy='uniform')
  counts = np.bincount(np.searchsorted(np.linspace(0, 1, n_bins + 1)[1:-1], p),
                       minlength=n_bins)
  counts = counts[counts > 0]
  assert len(counts) == len(fraction)
  return float(np.sum(counts * np.abs(fraction - mean)) / len(p))


def test_evaluate_predict_export_and_serve_a_tagged_run(tagged_run, tmp_path, capsys):
  from imgcls_jax import evaluate, export, serve
  config, workdir, root, truth, final = tagged_run
  evaluate.evaluate(None, workdir, overrides={'evaluate.output_dir': str(tmp_path)})
  for name in ('report.json', 'report.md', 'pr_curves.png', 'reliability.png'):
    assert os.path.getsize(tmp_path / name) > 0, name
  saved = json.loads((tmp_path / 'report.json').read_text())
  assert saved['ece'] == pytest.approx(final['ece'], abs=1e-9)
  iv = saved['intervals']          # bootstrap from the same pass's per-example probabilities
  assert iv['examples'] == 160 and iv['resamples'] == 1000
  for key, value in (('map', saved['mean_average_precision']),
                     ('f1_macro', saved['at_thresholds']['f1_macro']),
                     ('exact_match', saved['at_thresholds']['exact_match']),
                     ('exact_match_exact', saved['at_thresholds']['exact_match'])):
    assert iv[key][0] <= value <= iv[key][1], (key, iv[key], value)
  assert 'exact match (Clopper-Pearson, exact)' in (tmp_path / 'report.md').read_text()
  assert sum(b['count'] for b in saved['calibration_bins']) == 160 * len(TAGS)
  assert saved['task'] == 'multilabel'
  for key in ('mean_average_precision', 'at_0.5', 'at_thresholds', 'thresholds', 'per_class'):
    assert key in saved, key
  assert abs(saved['mean_average_precision'] - final['map']) < 1e-9
  assert saved['at_thresholds']['exact_match'] == pytest.approx(final['accuracy'])
  # Where the thresholds come from, and no softmax temperature for independent tags.
  assert saved['thresholds_source'] == "fitted per tag (best F1) on split 'validation'"
  assert 'temperature' not in saved['context']
  assert "Thresholds: fitted per tag (best F1) on split 'validation'." in (
      tmp_path / 'report.md').read_text()

  trained = inference.load(workdir)
  clf = inference.classifier(trained)
  _assert_tag_errors(tmp_path, saved, root, truth['test'], trained, clf)
  files = [os.path.join(root, rel) for rel, _ in truth['test'][:16]]
  results, _ = predict.predict_files(clf, files, top=3)
  probs = clf.predict_arrays(np.stack([clf.prepare(f) for f in files]))['probabilities']
  right = 0
  for r, p, (_, tags) in zip(results, probs, truth['test'][:16]):
    listed = {t['class'] for t in r['tags']}
    expected = {n for n, pk, t in zip(trained.class_names, p, trained.thresholds) if pk >= t}
    assert listed == expected
    right += listed == tags
  assert right >= 10, right
  out = io.StringIO()
  predict.write(results, out, 'csv')
  assert out.getvalue().splitlines()[0] == 'file,rank,tag,index,probability,threshold'

  # One export writes (and checks against JAX) the SavedModel, the float TFLite model and an
  # int8 one. int8: the sigmoid must not become 1 / (1 + exp(-x)), whose quantised divisor rounds
  # to its zero point (LiteRT aborted, 'div.cc data[i] != zero_point'; tf.lite returned garbage).
  record = export.export(None, workdir, overrides={'export.output_dir': str(tmp_path / 'int8'),
                                                   'export.quantize': 'int8',
                                                   'export.onnx': False})
  assert record['task'] == 'multilabel'
  assert record['thresholds'] == pytest.approx(list(trained.thresholds))
  assert record['verification']['saved_model']['max_abs_prob_diff'] < 1e-4
  assert record['verification']['tflite']['max_abs_prob_diff'] < 1e-4
  q = record['verification']['quantized']
  assert q['tag_agreement'] >= 0.97, q
  assert q['accuracy_drop'] <= 0.05, q
  printed = capsys.readouterr().out
  assert f"int8 tag agreement {q['tag_agreement']:.2%}" in printed, printed
  assert 'exact match drop' in printed and 'top-1' not in printed.splitlines()[-1]

  cfg = config.serve.copy_and_resolve_references()
  cfg.port = 0
  srv = serve.make_server(clf, cfg).start()
  try:
    import http.client
    host, port = srv.url.split('//')[1].rsplit(':', 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    with open(files[0], 'rb') as f:
      conn.request('POST', '/v1/classify', body=f.read())
    answer = json.loads(conn.getresponse().read())
    assert [t['class'] for t in answer['tags']] == [t['class'] for t in results[0]['tags']]
  finally:
    srv.close()


def _assert_tag_errors(out, saved, root, test, trained, clf):
  """errors.csv lists every wrong tag decision of the test split, the most confident first: the
  oracle is the served Classifier's probabilities on each file, the manifest's tags and the run's
  thresholds (decisions within 1e-5 of a threshold are left out: batching can flip them)."""
  names, t = trained.class_names, np.asarray(trained.thresholds, np.float32)
  probs = clf.predict_arrays(np.stack([clf.prepare(os.path.join(root, rel))
                                       for rel, _ in test]))['probabilities']
  expected, near = {}, set()
  for (rel, tags), p in zip(test, probs):
    for k, name in enumerate(names):
      if abs(float(p[k]) - float(t[k])) < 1e-5:
        near.add((rel, name))
      elif (p[k] >= t[k]) != (name in tags):
        expected[(rel, name)] = ('missed' if name in tags else 'extra', float(p[k]))
  with open(out / 'errors.csv', newline='') as f:
    rows = list(csv.DictReader(f))
  assert list(rows[0]) == ['rank', 'position', 'id', 'tag', 'error', 'p_tag', 'threshold',
                           'labels', 'predicted']
  got = {(os.path.relpath(os.path.join(root, r['id']), root), r['tag']): r for r in rows}
  assert len(got) == len(rows) and expected          # one row per decision; the model errs
  assert set(got) - near == set(expected)
  truth = dict(test)
  for key, (error, p) in expected.items():
    r = got[key]
    assert r['error'] == error and abs(float(r['p_tag']) - p) < 1e-5, (key, r, p)
    assert float(r['threshold']) == pytest.approx(float(t[names.index(key[1])]), abs=1e-6)
    assert set(filter(None, r['labels'].split(';'))) == truth[key[0]]
  where = {}                        # an example's position in the split's read order
  for r in rows:
    assert where.setdefault(r['id'], int(r['position'])) == int(r['position'])
  assert len(set(where.values())) == len(where) and 0 <= min(where.values())
  assert max(where.values()) < len(test)
  sure = [1 - float(r['p_tag']) if r['error'] == 'missed' else float(r['p_tag']) for r in rows]
  assert [int(r['rank']) for r in rows] == list(range(1, len(rows) + 1))
  assert all(a >= b - 1e-6 for a, b in zip(sure, sure[1:])), sure    # most confident first
  assert saved['errors']['count'] == len(rows)
  assert os.path.getsize(out / 'errors.png') > 0
  assert '## The most confident wrong tag decisions' in (out / 'report.md').read_text()


def test_a_split_too_large_to_keep_on_the_host_skips_the_listing_not_the_report(
    tagged_run, tmp_path, monkeypatch, caplog):
  from imgcls_jax import evaluate, evaluation
  _, workdir, *_ = tagged_run
  monkeypatch.setattr(evaluation, 'MAX_TAG_CELLS', 100)     # 160 test examples x 5 tags
  rep = evaluate.evaluate(None, workdir, overrides={'evaluate.output_dir': str(tmp_path)})
  assert not (tmp_path / 'errors.csv').exists() and 'map' not in rep['intervals']
  assert 'label_issues' not in rep and not (tmp_path / 'label_issues.csv').exists()
  assert rep['intervals']['exact_match_exact'][0] <= rep['at_thresholds']['exact_match']
  assert os.path.getsize(tmp_path / 'reliability.png') > 0
  assert 'or an image folder or manifest split with fewer images' in caplog.text
  with pytest.raises(UserError, match='errors=101 must be between 0 and 100'):
    evaluate.evaluate(None, workdir, overrides={'evaluate.errors': 101})
  # The split the thresholds were chosen on: its figures are optimistic, and the report says so.
  caplog.clear()
  evaluate.evaluate(None, workdir, overrides={'evaluate.output_dir': str(tmp_path / 'v'),
                                              'evaluate.split': 'validation'})
  assert "Split 'validation' is the one this run's thresholds were fitted on" in caplog.text


def test_evaluate_lists_the_tags_changed_in_a_test_split(tagged_run, tmp_path, capsys):
  """A copy of the manifest with one tag changed on 24 of the 160 test images (a labelled tag
  dropped, or another one added): evaluate's label-issue search flags mostly those images, and
  names the changed tag as missing (dropped) or extra (added). The oracle is the change made."""
  from imgcls_jax import evaluate, label_issues
  _, workdir, root, _, _ = tagged_run
  with open(os.path.join(root, 'manifest.csv'), newline='') as f:
    rows = list(csv.reader(f))
  rng = np.random.default_rng(3)
  changed: dict[str, tuple[str, str]] = {}   # path -> ('missing' | 'extra', tag)
  for i in rng.choice([i for i, r in enumerate(rows) if r[2] == 'test'], 24, replace=False):
    tags, tag = set(filter(None, rows[i][1].split(';'))), TAGS[rng.integers(len(TAGS))]
    changed[rows[i][0]] = ('missing' if tag in tags else 'extra', tag)
    rows[i][1] = ';'.join(sorted(tags ^ {tag}))
  manifest = os.path.join(root, 'manifest_changed_tags.csv')   # beside the images it names
  with open(manifest, 'w', newline='') as f:
    csv.writer(f).writerows(rows)
  capsys.readouterr()
  rep = evaluate.evaluate(None, workdir, overrides={'evaluate.output_dir': str(tmp_path),
                                                    'data.manifest': manifest})
  with open(tmp_path / label_issues.EVAL_FILE, newline='') as f:
    found = list(csv.DictReader(f))
  assert tuple(found[0]) == label_issues.EVAL_TAG_COLUMNS
  hits = [r for r in found if r['id'] in changed]
  named = sum(changed[r['id']][1] in r[changed[r['id']][0]].split(';') for r in hits)
  with capsys.disabled():
    print(f'\ntags: {len(changed)} changed, {len(found)} flagged, {len(hits)} of them changed, '
          f'{named} naming the changed tag')
  assert len(hits) >= 0.7 * len(changed) and len(hits) >= 0.6 * len(found)
  assert named >= 0.9 * len(hits)   # the flagged tag is the one changed, the right way round
  tags_of = {r[0]: r[1] for r in rows[1:]}
  for r in found:   # the row's tags are the manifest's; suggested = tags with the flagged changed
    assert r['tags'] == tags_of[r['id']]
    given, missing, extra = ({t for t in r[k].split(';') if t} for k in ('tags', 'missing',
                                                                          'extra'))
    assert missing and not missing & given or extra and extra <= given
    assert {t for t in r['suggested'].split(';') if t} == (given - extra) | missing
  quality = [float(r['quality']) for r in found]
  assert quality == sorted(quality)
  s = rep['label_issues']
  assert s['task'] == 'multilabel' and s['count'] == len(found) and s['num_examples'] == 160
  # Random tiles repeat: test images that are byte-for-byte training images are counted (the
  # search stays on: a copy labelled otherwise is just what it should flag).
  read = lambda split: [open(os.path.join(root, r[0]), 'rb').read() for r in rows[1:]
                        if r[2] == split]
  train_bytes = set(read('train'))
  copies = sum(b in train_bytes for b in read('test'))
  assert copies > 0 and rep['copies_of_training_images'] == copies
  saved = json.loads((tmp_path / 'report.json').read_text())
  assert label_issues.EVAL_FILE in saved['files']
  md = (tmp_path / 'report.md').read_text()
  assert '## Likely label issues' in md and f"`{found[0]['id']}`" in md
  assert f'likely label issues: {len(found)} of 160' in capsys.readouterr().out


def test_compare_two_tagged_runs_equals_sklearn_on_their_probabilities(tagged_run, tmp_path):
  """--mode=compare of two tagging runs: mAP, macro F1 at each run's thresholds and exact match
  as scikit-learn scores each run's served probabilities; the exact-match table and McNemar's p
  from the binomial distribution."""
  from imgcls_jax import compare
  config, workdir, root, truth, final = tagged_run
  c = config.copy_and_resolve_references()
  c.seed, c.num_epochs = 1, 4.0            # a weaker run B
  other = str(tmp_path / 'b')
  train.train_and_evaluate(c, other)
  result = compare.compare(None, workdir, overrides={'compare.workdir': other,
                                                     'evaluate.checkpoint': 'latest',
                                                     'evaluate.output_dir': str(tmp_path)})
  assert result['task'] == 'multilabel' and result['examples'] == len(truth['test'])
  assert json.loads((tmp_path / 'compare.json').read_text()) == result
  exact, near = [], False
  for tag, w in (('A', workdir), ('B', other)):
    trained = inference.load(w)
    clf = inference.classifier(trained)
    probs = clf.predict_arrays(np.stack([clf.prepare(os.path.join(root, rel))
                                         for rel, _ in truth['test']]))['probabilities']
    y = _multi_hot([t for _, t in truth['test']])[:, [TAGS.index(n) for n in trained.class_names]]
    t = np.asarray(trained.decision_thresholds, np.float32)
    pred = probs >= t
    # Another batching can move a probability by ~1e-7: exact equality unless one is that close
    # to its threshold (then one decision may differ).
    near = near or bool(np.any(np.abs(probs - t) < 1e-5))
    tol = 1.0 / len(truth['test']) if near else 1e-9
    got = result['runs'][tag]
    assert got['map'] == pytest.approx(skm.average_precision_score(y, probs), abs=1e-6), tag
    assert got['f1_macro'] == pytest.approx(
        skm.f1_score(y, pred, average='macro', zero_division=0), abs=10 * tol), tag
    assert got['exact_match'] == pytest.approx(skm.accuracy_score(y, pred), abs=tol), tag
    exact.append(np.all(pred == y.astype(bool), axis=1))
  only_a, only_b = int(np.sum(exact[0] & ~exact[1])), int(np.sum(~exact[0] & exact[1]))
  assert only_b < only_a, 'the 4-epoch run should get fewer tag sets right'
  if not near:
    assert result['table']['only_a_right'] == only_a
    assert result['table']['only_b_right'] == only_b
  a, b = result['table']['only_a_right'], result['table']['only_b_right']
  p = min(1.0, 2 * scipy.stats.binom.cdf(min(a, b), a + b, 0.5))
  assert result['mcnemar_exact_p'] == pytest.approx(p, rel=1e-9)
  for name in ('map', 'f1_macro', 'exact_match'):
    d = result['difference_b_minus_a'][name]
    assert d['value'] == pytest.approx(result['runs']['B'][name] - result['runs']['A'][name])
    assert d['interval'][0] <= d['value'] <= d['interval'][1], (name, d)
  assert 'exact match' in (tmp_path / 'compare.md').read_text()


def test_weighted_average_precision_and_the_tag_bootstrap_match_sklearn():
  """A bootstrap resample as weights: AP from cumulative sums equals scikit-learn's with those
  weights (ties included), and the paired intervals match resamples scored by scikit-learn."""
  from imgcls_jax import intervals_multilabel as im
  rng = np.random.default_rng(3)
  n, k = 300, 4
  y = rng.random((n, k)) < 0.35
  pa = np.round(np.clip(rng.random((n, k)) * 0.7 + 0.25 * y, 0, 1), 2).astype(np.float32)
  pb = np.round(np.clip(rng.random((n, k)) * 0.6 + 0.35 * y, 0, 1), 2).astype(np.float32)
  w = rng.multinomial(n, np.ones(n) / n, size=6).astype(float)
  for c in range(k):
    np.testing.assert_allclose(im.weighted_average_precision(y[:, c], pa[:, c], w),
                               [skm.average_precision_score(y[:, c], pa[:, c], sample_weight=r)
                                for r in w], rtol=1e-12)
  t = np.array([0.5, 0.4, 0.6, 0.45], np.float32)
  got = im.paired_differences(y, pa, t, pb, t, level=0.9, resamples=2000, seed=1)

  def scored(i, p):
    pred = p[i] >= t
    return (skm.average_precision_score(y[i], p[i]),
            skm.f1_score(y[i], pred, average='macro', zero_division=0),
            skm.accuracy_score(y[i], pred))

  draws = []
  for _ in range(400):
    i = rng.integers(0, n, n)
    draws.append(np.subtract(scored(i, pb), scored(i, pa)))
  draws = np.array(draws)
  want = np.percentile(draws, [5, 95], axis=0).T
  for j, name in enumerate(im.METRICS):
    np.testing.assert_allclose(got[name], want[j], atol=0.4 * draws[:, j].std(), err_msg=name)
  # One run's report intervals: the same resamples scored by scikit-learn, and exact match's
  # Clopper-Pearson interval from the beta distribution that defines it.
  one = types.SimpleNamespace(labels=y, probs=pb, thresholds=t)
  right = int(np.all((pb >= t) == y, axis=1).sum())
  got = im.report_intervals(right, n, one, level=0.9, resamples=2000, seed=4)
  own = np.array([scored(rng.integers(0, n, n), pb) for _ in range(400)])
  want = np.percentile(own, [5, 95], axis=0).T
  for j, name in enumerate(im.METRICS):
    np.testing.assert_allclose(got[name], want[j], atol=0.4 * own[:, j].std(), err_msg=name)
  lo, hi = scipy.stats.beta.ppf(0.05, right, n - right + 1), scipy.stats.beta.ppf(0.95, right + 1,
                                                                                  n - right)
  np.testing.assert_allclose(got['exact_match_exact'], [lo, hi], rtol=1e-9)


def _imbalanced_folder(root):
  """Digits PNGs of 3 classes, 120 / 30 / 6 images: a manifest for single-label runs."""
  from sklearn.datasets import load_digits
  d = load_digits()
  x = (d.images * 255 / 16).astype(np.uint8)
  rows = []
  for k, n in ((0, 120), (1, 30), (2, 6)):
    for i, j in enumerate(np.flatnonzero(d.target == k)[:n]):
      rel = f'{k}_{i}.png'
      Image.fromarray(x[j]).save(os.path.join(root, rel))
      rows.append(f'{rel},c{k},train')
  (root / 'm.csv').write_text('\n'.join(rows) + '\n')
  return str(root / 'm.csv')


def test_balanced_sampling_evens_the_classes_and_resumes_exactly(tmp_path):
  c = _config(_imbalanced_folder(tmp_path))
  c.data.multilabel = False
  c.data.eval_split = 'train'
  folder_index.clear_memo()
  plain, _ = pipeline.train_dataset(c.data, seed=0, local_batch_size=32)
  c.data.balanced_sampling = True
  ds, per_epoch = pipeline.train_dataset(c.data, seed=0, local_batch_size=32)
  assert per_epoch == 156
  it = ds.as_numpy_iterator()
  batches = [next(it) for _ in range(30)]
  shares = np.bincount(np.concatenate([b['label'] for b in batches]), minlength=3) / (30 * 32)
  assert np.all(np.abs(shares - 1 / 3) < 0.06), shares          # 120:30:6 drawn as ~1:1:1
  it_plain = plain.as_numpy_iterator()
  plain_shares = np.bincount(np.concatenate([next(it_plain)['label'] for _ in range(30)]),
                             minlength=3) / (30 * 32)
  assert plain_shares[0] > 0.7                                  # the plain stream keeps 77%
  resumed, _ = pipeline.train_dataset(c.data, seed=0, local_batch_size=32, start_step=11)
  it2 = resumed.as_numpy_iterator()
  for step in range(11, 30):
    b = next(it2)
    np.testing.assert_array_equal(b['image'], batches[step]['image'])
    np.testing.assert_array_equal(b['label'], batches[step]['label'])
  other, _ = pipeline.train_dataset(c.data, seed=1, local_batch_size=32)
  assert not np.array_equal(next(other.as_numpy_iterator())['label'], batches[0]['label'])


@pytest.fixture(scope='module')
def tagged_cv(tmp_path_factory):
  """(config, workdir, tiles, summary) of one 2-fold cross-validation of 96 training tiles, each
  fold's thresholds fitted on a 48-tile validation split, the label-issue search on: the two
  cross-validation tests below read it."""
  from imgcls_jax import cross_validation
  root = tmp_path_factory.mktemp('tagged_cv')
  truth = _digit_tiles(str(root / 'd'), counts=(('train', 96), ('validation', 48)))
  c = _config(str(root / 'd' / 'manifest.csv'))
  c.data.eval_split = 'train'
  c.num_epochs, c.batch_size = 2.0, 16   # (evaluated in batches of 64: tagged_run's programs)
  c.cross_validation.folds = 2
  workdir = str(root / 'cv')
  return c, workdir, truth, cross_validation.cross_validate(c, workdir)


def test_multilabel_cross_validation_uses_plain_folds_and_reports_map(tagged_cv):
  from sklearn.model_selection import KFold
  from imgcls_jax.data import folds
  c, workdir, truth, summary = tagged_cv
  cv = pathlib.Path(workdir)
  assigned = folds.assign(c.data, 'train', 2, seed=0)
  ids = sorted(rel for rel, _ in truth['train'])
  assert list(assigned.ids) == ids
  for i, (_, held) in enumerate(KFold(2, shuffle=True, random_state=0).split(ids)):
    assert sorted(assigned.held_out(i)) == sorted(ids[j] for j in held)
  assert summary['pooled_out_of_fold']['num_examples'] == 96
  # The label-issue search on the pooled out-of-fold tag probabilities: rows name the manifest's
  # tags (the quality of the list is test_evaluate_lists_the_tags_changed_in_a_test_split's).
  from imgcls_jax import label_issues
  with open(cv / label_issues.FILE, newline='') as f:
    found = list(csv.DictReader(f))
  tags_of = {rel: ';'.join(sorted(tags)) for rel, tags in truth['train']}
  assert all(r['tags'] == tags_of[r['id']] for r in found)
  assert all(r['id'] in (cv / f"fold_{r['fold']}" / 'eval_ids.txt').read_text() for r in found)
  kept = (cv / label_issues.KEPT).read_text().split()
  assert len(kept) == 96 - len(found) and not set(kept) & {r['id'] for r in found}
  assert summary['label_issues']['task'] == 'multilabel'
  assert summary['label_issues']['count'] == len(found)
  assert 0 < summary['mean']['map'] <= 1
  assert os.path.getsize(cv / 'cv_pr_curves.png') > 0
  assert os.path.getsize(cv / 'cv_reliability.png') > 0
  pooled = summary['pooled_out_of_fold']      # the folds' calibration sums, pooled
  assert sum(b['count'] for b in pooled['calibration_bins']) == 96 * len(TAGS)
  assert 0 <= pooled['ece'] <= 1 and 0 <= summary['mean']['ece'] <= 1


def test_the_pooled_cross_validation_counts_each_folds_tags_at_its_own_thresholds(tagged_cv):
  """Each fold fits its thresholds on the validation split; the pooled 'at thresholds' row gave
  the 0.5 figures beside an exact match at the folds' thresholds (a Hamming loss no exact match
  allows). Oracle: scikit-learn on every held-out example's probabilities, each fold's at its
  own thresholds."""
  from sklearn import metrics as skm
  from imgcls_jax import cross_validation, evaluation
  c, workdir, _, summary = tagged_cv
  pooled = summary['pooled_out_of_fold']
  truth, decided, thresholds = [], [], []
  for i in range(2):
    fold = os.path.join(workdir, f'fold_{i}')
    fc = cross_validation.fold_config(c, os.path.join(fold, 'train_ids.txt'),
                                      os.path.join(fold, 'eval_ids.txt'))
    o = evaluation.evaluate_checkpoint(fold, fc, split=fc.data.eval_split, keep_probs=True).outcomes
    truth.append(o.labels)
    decided.append(o.probs >= o.thresholds)
    thresholds.append(o.thresholds)
  assert any(np.any(t != 0.5) for t in thresholds)     # (the folds fitted their own)
  y, p = np.concatenate(truth), np.concatenate(decided)
  got = pooled['at_thresholds']
  for key, want in (('f1_micro', skm.f1_score(y, p, average='micro', zero_division=0)),
                    ('f1_macro', skm.f1_score(y, p, average='macro', zero_division=0)),
                    ('precision_micro', skm.precision_score(y, p, average='micro',
                                                            zero_division=0)),
                    ('recall_micro', skm.recall_score(y, p, average='micro', zero_division=0)),
                    ('hamming_loss', skm.hamming_loss(y, p)),
                    ('exact_match', skm.accuracy_score(y, p))):
    assert got[key] == pytest.approx(want, abs=1e-9), key
  per_tag = skm.f1_score(y, p, average=None, zero_division=0)
  assert [r['at_thresholds']['f1'] for r in pooled['per_class']] == pytest.approx(per_tag)
  assert pooled['fold_thresholds'] == [pytest.approx(t.tolist()) for t in thresholds]
  md = open(os.path.join(workdir, 'cv_report.md')).read()
  assert "each fold's tags at that fold's own thresholds" in md


def test_a_misnamed_threshold_split_fails_before_the_first_step(tmp_path):
  """The threshold split is read at the end of training; its name is checked at the start, so a
  typo costs no training time: one UserError naming it, and no checkpoint written."""
  _digit_tiles(str(tmp_path / 'd'), counts=(('train', 32), ('validation', 16), ('test', 16)))
  c = _config(str(tmp_path / 'd' / 'manifest.csv'))
  c.evaluate.threshold_split = 'validaton'
  c.num_epochs, c.batch_size, c.eval_batch_size = 2.0, 16, 16
  c.checkpoint_every_epochs = 1.0  # a run that got as far as step 2 would leave a checkpoint
  with pytest.raises(UserError, match="config.evaluate.threshold_split='validaton': .*; set "
                                      'config.evaluate.threshold_split'):
    train.train_and_evaluate(c, str(tmp_path / 'run'))
  assert not os.path.isdir(tmp_path / 'run' / 'checkpoints') or not [
      d for d in os.listdir(tmp_path / 'run' / 'checkpoints') if d[0].isdigit()]


def test_calibrate_mode_chooses_the_thresholds_training_chose(tagged_run, tmp_path):
  """On a copy of the tagged run whose thresholds were overwritten, ``--mode=calibrate`` brings
  back exactly the ones the trainer chose at the end of training on the same split."""
  import shutil
  from imgcls_jax import calibrate, checkpoint, checkpoint_files
  _, workdir, root, _, _ = tagged_run
  copy = str(tmp_path / 'run')
  shutil.copytree(workdir, copy)
  chosen = inference.load(workdir).thresholds
  with checkpoint.Checkpointer(copy) as ckpt:
    step = ckpt.latest_step()
  checkpoint_files.update_meta(copy, step,
                               {'thresholds': {'values': [0.9] * len(TAGS), 'split': 'x'}})
  assert inference.load(copy).thresholds == (0.9,) * len(TAGS)
  out = calibrate.calibrate(None, copy, overrides={'evaluate.threshold_split': 'validation'})
  assert out['step'] == step and out['thresholds']['split'] == 'validation'
  assert inference.load(copy).thresholds == chosen
  with pytest.raises(UserError, match='temperature_split is for single-label'):
    calibrate.calibrate(None, copy, overrides={'evaluate.threshold_split': '',
                                               'evaluate.temperature_split': 'validation'})
  with pytest.raises(UserError, match="shares .* examples with config.data.eval_split='test'"):
    calibrate.calibrate(None, copy, overrides={'evaluate.threshold_split': 'test'})
  # A held-out split without a tag (its validation rows dropped from a copy of the manifest):
  # that tag keeps its threshold; the others are fitted on what is left.
  manifest = os.path.join(root, 'manifest.csv')
  with open(manifest, newline='') as f:
    rows = list(csv.reader(f))
  without = os.path.join(root, 'manifest_without_four.csv')   # beside the images it names
  with open(without, 'w', newline='') as f:
    csv.writer(f).writerows(r for r in rows if not (r[2] == 'validation' and 'four' in r[1]))
  out = calibrate.calibrate(None, copy, overrides={'evaluate.threshold_split': 'validation',
                                                   'data.manifest': str(without)})
  four = list(inference.load(copy).class_names).index('four')
  assert out['thresholds']['kept'] == ['four']
  assert out['thresholds']['values'][four] == chosen[four]
  # No tag at all on the held-out rows: nothing can be chosen, and nothing is saved.
  untagged = os.path.join(root, 'manifest_untagged_validation.csv')
  with open(untagged, 'w', newline='') as f:
    csv.writer(f).writerows([r[0], '' if r[2] == 'validation' else r[1], r[2]] for r in rows)
  before = inference.load(copy).thresholds
  with pytest.raises(UserError, match='no positive example of any class'):
    calibrate.calibrate(None, copy, overrides={'evaluate.threshold_split': 'validation',
                                               'data.manifest': untagged})
  assert inference.load(copy).thresholds == before
