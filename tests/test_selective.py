"""Selective prediction (imgcls_jax/selective.py): the report's risk-coverage rows and the fitted
abstention threshold against a brute-force numpy search over per-example probabilities, and a
trained run whose predict, serve, export and evaluate outputs abstain exactly below it."""
import dataclasses
import http.client
import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import scipy.stats
from PIL import Image

from imgcls_jax import (calibrate, checkpoint, checkpoint_files, held_out, inference, predict,
                        report, selective)
from imgcls_jax import serve, train
from imgcls_jax.data import images as image_files
from imgcls_jax.errors import UserError
from tests.conftest import export_description, small_digits_config

EDGES = np.arange(selective.BINS + 1) / selective.BINS


def _oracle(p_top1, right):
  """Per edge j (threshold j / bins, the device's float32 rule): (answered, answered right)."""
  kept = np.stack([selective.answered(p_top1, t) for t in EDGES])    # (bins + 1) x N
  return kept.sum(1), (kept & right[None]).sum(1)


def _sums(fn, probs_NxK, labels_N, batch=64):
  """``fn(probabilities or logits, labels, mask)`` over padded, masked batches (garbage in the
  padding), summed."""
  fn = jax.jit(fn)
  total = None
  for start in range(0, len(labels_N), batch):
    x = np.full((batch, probs_NxK.shape[1]), 0.01, np.float32)
    x[:, 0] = 0.97                                      # padding: confident, wrong, masked
    y = np.ones((batch,), np.int32)
    m = np.zeros((batch,), bool)
    chunk = slice(start, start + batch)
    n = len(labels_N[chunk])
    x[:n], y[:n], m[:n] = probs_NxK[chunk], labels_N[chunk], True
    total = report.add(total, fn(x, y, m))
  return report.stats_to_numpy(total)


def _low_ends(kept, hit, level=0.95):
  """The Clopper-Pearson interval's low end per edge, from beta quantiles (0 with no hit)."""
  out = np.full(len(kept), -1.0)
  for j, (n, k) in enumerate(zip(kept, hit)):
    if n:
      out[j] = scipy.stats.beta.ppf((1 - level) / 2, k, n - k + 1) if k else 0.0
  return out


def test_rows_and_fit_equal_a_brute_force_search_at_every_edge():
  rng = np.random.default_rng(0)
  n, k = 3000, 4
  logits = rng.normal(size=(n, k)) * rng.uniform(0.2, 4.0, (n, 1))
  probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  # Some top-1 probabilities exactly on float32 edges (one at j = 17, where float32(p * 1000)
  # rounds below 17): the rule must be p >= float32(j / 1000), as on the device.
  for i, j in enumerate([17, 500, 723, 999]):
    p = np.float32(j / 1000)
    probs[i] = [p] + [(1 - p) / (k - 1)] * (k - 1)
  probs = probs.astype(np.float32)
  # Right with the top-1 probability (a calibrated model), else another class.
  top = probs.argmax(1)
  labels = np.where(rng.random(n) < probs.max(1), top, (top + rng.integers(1, k, n)) % k)
  right = probs.argmax(1) == labels
  kept, hit = _oracle(probs.max(1), right)
  s = _sums(selective.sums, probs, labels)
  # The report's statistics hold the same histograms (of its own softmax of the logits).
  full = _sums(report.eval_sums, np.log(probs), labels)
  dev = np.asarray(jnp.exp(jax.nn.log_softmax(jnp.log(probs)))).max(1)
  dev_kept, dev_hit = _oracle(dev, right)
  np.testing.assert_array_equal(np.cumsum(full['sel_right'][::-1])[::-1], dev_hit[:-1])
  np.testing.assert_array_equal(np.cumsum((full['sel_right'] + full['sel_wrong'])[::-1])[::-1],
                                dev_kept[:-1])
  rows = selective.summary(s['sel_right'], s['sel_wrong'], min_confidence=0.723)
  acc = np.where(kept > 0, hit / np.maximum(kept, 1), np.nan)
  for r in rows['accuracy_at_coverage']:
    j = int(round(r['threshold'] * 1000))
    assert kept[j] >= r['coverage_target'] * n and (j == 1000 or
                                                    kept[j + 1] < r['coverage_target'] * n)
    assert r['coverage'] == kept[j] / n and r['accuracy'] == pytest.approx(acc[j], abs=1e-12)
  reached = 0
  for r in rows['coverage_at_accuracy']:
    ok = [j for j in range(1001) if kept[j] > 0 and acc[j] >= r['accuracy_target'] - 1e-12]
    if not ok:
      assert r['threshold'] is None and r['answered'] == 0
      continue
    reached += 1
    assert r['threshold'] == ok[0] / 1000 and r['answered'] == kept[ok[0]]
  assert reached >= 2                       # the targets split the range: some are reachable
  # The fit: the lowest edge whose answers' exact 95% interval starts at the target or above.
  low = _low_ends(kept, hit)
  fitted = 0
  for target in (0.8, 0.9, 0.95, 0.97, 0.99):
    ok = [j for j in range(1001) if kept[j] > 0 and low[j] >= target]
    fit = selective.fit(s['sel_right'], s['sel_wrong'], target, 'x')
    assert (fit is None) == (not ok), target
    if ok:
      fitted += 1
      assert fit['min_confidence'] == ok[0] / 1000 and fit['answered'] == kept[ok[0]]
      assert fit['accuracy'] == pytest.approx(acc[ok[0]], abs=1e-12)
      assert fit['accuracy'] >= target
      assert fit['accuracy_interval'][0] == pytest.approx(low[ok[0]], rel=1e-9)
      point = [j for j in range(1001) if kept[j] > 0 and acc[j] >= target - 1e-12]
      assert ok[0] >= point[0]              # never looser than the point estimate
  assert fitted >= 2
  assert selective.fit(s['sel_right'], s['sel_wrong'], 1.0, 'x') is None   # never certain
  assert rows['at_min_confidence']['answered'] == kept[723] == selective.answered(
      probs.max(1), 0.723).sum()
  assert 0 < kept[723] < n
  assert full['count'] == n and s['sel_right'].sum() == right.sum()   # the padding adds nothing
  # The plotted curve: one point per distinct answered set, strictest threshold first.
  c = rows['curve']
  js = [int(round(t * 1000)) for t in c['threshold']]
  assert js == sorted(js, reverse=True) and c['coverage'][-1] == 1.0
  assert sorted(set(kept[kept > 0])) == [kept[j] for j in js]
  for j, cov, a in zip(js, c['coverage'], c['accuracy']):
    assert kept[j] > kept[j + 1] if j < 1000 else kept[j] > 0
    assert cov == pytest.approx(kept[j] / n, abs=1e-6) and a == pytest.approx(acc[j], abs=1e-6)


def test_the_fit_needs_the_interval_not_just_the_point_estimate():
  right = np.zeros(selective.BINS, np.int64)
  wrong = np.zeros(selective.BINS, np.int64)
  right[950], right[900], wrong[900], right[400], wrong[400] = 30, 1970, 5, 300, 60
  # 30 answers above 0.95, all right: 100%, but their 90% interval starts at 90.5%.
  fit = selective.fit(right, wrong, 0.99, 'held', confidence_level=0.9)
  assert fit['min_confidence'] == 0.401 and fit['answered'] == 2005
  assert fit['coverage'] == pytest.approx(2005 / 2365)
  k, n, a = 2000, 2005, 0.1        # the beta-quantile form of the exact interval
  assert fit['accuracy_interval'] == pytest.approx(
      [scipy.stats.beta.ppf(a / 2, k, n - k + 1), scipy.stats.beta.ppf(1 - a / 2, k + 1, n - k)],
      rel=1e-9)
  assert selective.fit(right, wrong, 0.999, 'held') is None
  assert '2005 answers with a top-1 probability >= 0.401 are 99.75% right' in (
      selective.best_possible(right, wrong))


def test_bad_settings_are_one_line(digits_config):
  for bad in (1.5, -0.1, 'high', True):
    with pytest.raises(UserError, match='abstain_accuracy.*in \\(0, 1\\]'):
      selective.abstain_target({'abstain_accuracy': bad})
  from imgcls_jax.data import reader
  c = digits_config
  c.evaluate.abstain_accuracy = 0.95
  info = reader.describe(c.data)
  with pytest.raises(UserError, match='set temperature_split to a held-out split'):
    held_out.check_fit_splits(c, info)
  with pytest.raises(UserError, match="multi-label run's per-class thresholds"):
    held_out.check_fit_splits(c, dataclasses.replace(info, multilabel=True))


# ---- a trained run ----

def _digits(tfds_dir, split):
  import tensorflow_datasets as tfds
  from imgcls_jax.data import digits  # noqa: F401  (registers the builder)
  d = tfds.as_numpy(tfds.load('sklearn_digits', split=split, batch_size=-1, data_dir=tfds_dir))
  return d['image'], d['label']


@pytest.fixture(scope='module')
def abstaining(tmp_path_factory, tfds_dir):
  """A digits run trained briefly on 80% of its training split; the temperature and a 95%
  abstention threshold fitted on the other 20%."""
  c = small_digits_config(tfds_dir)
  c.data.train_split = 'train[:80%]'
  c.evaluate.temperature_split = 'train[80%:]'
  c.evaluate.abstain_accuracy = 0.95
  c.num_train_steps = 40
  workdir = str(tmp_path_factory.mktemp('abstaining'))
  train.train_and_evaluate(c, workdir)
  return c, workdir


def _served_top1(workdir, images):
  probs = inference.classifier(inference.load(workdir)).predict_arrays(images)['probabilities']
  return probs.max(1), probs.argmax(1)


def test_the_threshold_is_the_lowest_edge_reaching_the_target_on_served_probabilities(
    abstaining, tfds_dir):
  _, workdir = abstaining
  with checkpoint.Checkpointer(workdir) as ckpt:
    record = ckpt.read_meta(ckpt.latest_step())['temperature']
  images, labels = _digits(tfds_dir, 'train[80%:]')
  p, pred = _served_top1(workdir, images)
  kept, hit = _oracle(p, pred == labels)
  low = _low_ends(kept, hit)
  ok = [j for j in range(1001) if kept[j] and low[j] >= 0.95]
  a = record['abstain']
  assert record['abstain_accuracy'] == 0.95 and a['split'] == 'train[80%:]'
  assert a['min_confidence'] == ok[0] / 1000 and a['answered'] == kept[ok[0]]
  assert a['accuracy'] == hit[ok[0]] / kept[ok[0]] >= a['accuracy_interval'][0] >= 0.95
  assert 0.05 < a['coverage'] < 0.98, a         # a real trade-off: neither everything nor nothing
                                                # (here ~0.33; wide: other CPUs round otherwise)
  assert (pred == labels).mean() < 0.95         # ... of a model that is not 95% right overall
  assert inference.load(workdir).min_confidence == a['min_confidence']


def test_predict_serve_and_export_abstain_below_it(abstaining, tfds_dir, tmp_path):
  config, workdir = abstaining
  t = inference.load(workdir).min_confidence
  images, _ = _digits(tfds_dir, 'test')
  p, _ = _served_top1(workdir, images[:40])
  below = ~selective.answered(p, t)
  assert 0 < below.sum() < len(p)          # some answered, some abstained on
  # predict: one PNG per test image (8x8, lossless: the same pixels)
  files = []
  for i in range(40):
    files.append(str(tmp_path / f'{i:02d}.png'))
    Image.fromarray(images[i, :, :, 0]).save(files[-1])
  clf = inference.classifier(inference.load(workdir))
  results, skipped = predict.predict_files(clf, files, top=3)
  assert not skipped and [r['abstained'] for r in results] == list(below)
  assert all(r['min_confidence'] == t for r in results)
  out = io.StringIO()
  predict.write(results, out, 'csv')
  rows = out.getvalue().splitlines()
  assert rows[0].endswith(',abstained') and rows[1].endswith(f',{int(below[0])}')
  # serve: the JSON answer and the model description
  srv = serve.make_server(clf, _serve_cfg(config)).start()
  try:
    host, port = srv.url.split('//')[1].rsplit(':', 1)
    for i in (int(np.argmax(below)), int(np.argmin(below))):
      conn = http.client.HTTPConnection(host, int(port), timeout=30)
      conn.request('POST', '/v1/classify', body=open(files[i], 'rb').read())
      answer = json.loads(conn.getresponse().read())
      assert answer['abstained'] == bool(below[i]) and answer['min_confidence'] == t
      conn.request('GET', '/v1/model')
      assert json.loads(conn.getresponse().read())['min_confidence'] == t
      conn.close()
  finally:
    srv.close()
  # export: the threshold is in the export's description
  pytest.importorskip('tensorflow')
  description = export_description(config, workdir, str(tmp_path / 'export'))
  assert description['min_confidence'] == t and description['unknown_below'] is None


def _serve_cfg(config):
  cfg = config.serve.copy_and_resolve_references()
  cfg.port = 0
  cfg.max_batch_size = 8
  return cfg


def _calibrate(workdir, capsys, **flags):
  """``--mode=calibrate`` in this process; returns what it printed."""
  overrides = {'evaluate.temperature_split': 'train[80%:]',
               **{f'evaluate.{k}': v for k, v in flags.items()}}
  calibrate.calibrate(None, workdir, overrides)
  return capsys.readouterr().out


def test_calibrate_refits_keeps_and_drops_the_threshold(abstaining, tmp_path, monkeypatch,
                                                        capsys):
  import shutil
  _, original = abstaining
  workdir = str(tmp_path / 'run')
  shutil.copytree(original, workdir)
  t95 = inference.load(workdir).min_confidence
  out = _calibrate(workdir, capsys, abstain_accuracy=0.9)
  assert 'abstaining below a top-1 probability of' in out and 'target 90.00%' in out
  t90 = inference.load(workdir).min_confidence
  assert 0 < t90 <= t95
  _calibrate(workdir, capsys)        # no flag: the last fit's target, fitted again
  assert inference.load(workdir).min_confidence == t90
  assert 'the abstention threshold is removed' in _calibrate(workdir, capsys, abstain_accuracy=0)
  assert inference.load(workdir).min_confidence == 0.0
  _calibrate(workdir, capsys)        # removal is remembered (the run's config says 0.95)
  assert inference.load(workdir).min_confidence == 0.0
  # A target nothing reaches: one line, and the checkpoint keeps what it had.
  before = checkpoint_files.read_weights(workdir).meta['temperature']
  monkeypatch.setattr(selective, 'fit', lambda *a, **k: None)
  with pytest.raises(UserError, match=r'No confidence threshold makes the answers on .*'
                     r'lower config\.evaluate\.abstain_accuracy\. Nothing was saved\.'):
    calibrate.calibrate(None, workdir, {'evaluate.temperature_split': 'train[80%:]',
                                        'evaluate.abstain_accuracy': 0.999})
  assert checkpoint_files.read_weights(workdir).meta['temperature'] == before


def _binned(p):
  """The float32 bin rule of the device histograms (``roc.bin_index``), in numpy."""
  edges = (np.arange(1, selective.BINS) / selective.BINS).astype(np.float32)
  return np.searchsorted(edges, np.asarray(p, np.float32), side='right')


def test_out_of_distribution_images_against_sklearn_on_the_served_probabilities(
    abstaining, tfds_dir, tmp_path, capsys):
  from sklearn.datasets import load_sample_images
  from sklearn.metrics import roc_auc_score, roc_curve
  from imgcls_jax import evaluate
  _, workdir = abstaining
  ood = tmp_path / 'ood'
  (ood / 'nested').mkdir(parents=True)
  rng = np.random.default_rng(0)
  for k, photo in enumerate(load_sample_images().images):   # photos: none of the digits
    for i in range(30):
      y, x = rng.integers(0, photo.shape[0] - 64), rng.integers(0, photo.shape[1] - 64)
      Image.fromarray(photo[y:y + 64, x:x + 64]).save(ood / ('nested' if i % 2 else '.') /
                                                      f'p{k}_{i}.png')
  (ood / 'broken.png').write_bytes(b'not a png')              # skipped, counted
  rep = evaluate.evaluate(None, workdir, {'evaluate.checkpoint': 'latest',
                                          'evaluate.ood_inputs': str(ood),
                                          'evaluate.output_dir': str(tmp_path / 'report')})
  o = rep['out_of_distribution']
  assert o['examples'] == 60 and o['inputs'] == 61 and o['skipped'] == 1
  # The oracle: the served classifier's top-1 probabilities of both sets, in the device's bins.
  images, _ = _digits(tfds_dir, 'test')
  p_in, pred_in = _served_top1(workdir, images)
  clf = inference.classifier(inference.load(workdir))
  results, skipped = predict.predict_files(clf, image_files.list_inputs(str(ood)), top=1)
  p_ood = np.array([r['predictions'][0]['probability'] for r in results], np.float32)
  assert len(p_ood) == 60 and len(skipped) == 1
  scores = np.concatenate([_binned(p_in), _binned(p_ood)])
  truth = np.r_[np.ones(len(p_in)), np.zeros(len(p_ood))]
  assert o['auroc'] == pytest.approx(roc_auc_score(truth, scores), abs=1e-12)
  assert 0.5 < o['auroc'] < 1.0                                # some separation, not perfect
  kept_in = np.array([selective.answered(p_in, t).sum() for t in EDGES])
  j95 = int(np.flatnonzero(kept_in >= 0.95 * len(p_in))[-1])
  assert o['at_95']['threshold'] == j95 / 1000
  assert o['at_95']['answered_ood'] == selective.answered(p_ood, j95 / 1000).mean()
  t = inference.load(workdir).min_confidence
  assert o['at_min_confidence']['answered_ood'] == selective.answered(p_ood, t).mean()
  assert o['at_min_confidence']['answered_split'] == selective.answered(p_in, t).mean()
  # Per image, the three scores of the same pass against sklearn on the served logits.
  logits_in = clf.predict_arrays(images)['logits'].astype(np.float64)
  logits_ood = clf.predict_arrays(np.stack([
      clf.prepare(f) for f in image_files.list_inputs(str(ood)) if 'broken' not in f
  ]))['logits'].astype(np.float64)
  oracle = {'msp': (p_in, p_ood),
            'logsumexp': (scipy.special.logsumexp(logits_in, 1),
                          scipy.special.logsumexp(logits_ood, 1)),
            'max_logit': (logits_in.max(1), logits_ood.max(1))}
  assert [d['score'] for d in o['detectors']] == ['msp', 'logsumexp', 'max_logit']
  # The device's float32 scores against scipy's on the served logits: the same ranks here; an
  # ulp apart elsewhere, which could swap a near-tied pair or move one image across the FPR95
  # threshold (the tolerances: two pairs, one image).
  n_pairs = len(p_in) * len(p_ood)
  for d in o['detectors']:
    s = np.concatenate(oracle[d['score']])
    assert d['auroc'] == pytest.approx(roc_auc_score(truth, s), abs=2 / n_pairs), d['score']
    fpr, tpr, thr = roc_curve(truth, s, drop_intermediate=False)
    first = int(np.argmax(tpr >= 0.95))     # the highest threshold keeping 95% of the split
    assert d['at_95']['answered_ood'] == pytest.approx(fpr[first], abs=1 / len(p_ood) + 1e-12)
    assert d['at_95']['threshold'] == pytest.approx(thr[first], rel=1e-5)
  best = max(o['detectors'], key=lambda d: d['auroc'])
  assert o['best'] == best['score'] and len({d['auroc'] for d in o['detectors']}) == 3
  out = capsys.readouterr().out
  assert f"out-of-distribution: 60 images, ROC-AUC {o['auroc']:.4f}" in out
  assert (f"best score per image: {best['name']}, ROC-AUC {best['auroc']:.4f}, FPR95 "
          f"{best['at_95']['answered_ood']:.2%}") in out
  md = open(tmp_path / 'report' / 'report.md').read()
  assert '## Out-of-distribution images' in md
  assert f"| {best['name']} (best ROC-AUC) | {best['auroc']:.4f} |" in md
  # The report's row at the run's threshold (from the summed histograms) and its figure.
  _, labels = _digits(tfds_dir, 'test')
  below = ~selective.answered(p_in, t)
  row = rep['selective']['at_min_confidence']
  assert row['answered'] == (~below).sum() and 0 < below.sum() < len(below)
  assert row['accuracy'] == pytest.approx((pred_in == labels)[~below].mean(), abs=1e-12)
  assert f'abstaining below {t:.3f}: {(~below).mean():.2%} answered' in out
  assert "| the run's threshold |" in md
  assert (tmp_path / 'report' / 'selective.png').stat().st_size > 10_000
  # Bad inputs: one line each.
  with pytest.raises(UserError, match=r'Input .*nowhere \(from config\.evaluate\.ood_inputs\) '
                                      'does not exist'):
    evaluate.evaluate(None, workdir, {'evaluate.ood_inputs': str(tmp_path / 'nowhere')})
  with pytest.raises(UserError, match='None of the 1 files of config.evaluate.ood_inputs could '
                                      'be read as an image'):
    evaluate.evaluate(None, workdir, {'evaluate.ood_inputs': str(ood / 'broken.png')})


def test_logit_scores_are_the_weighted_mean_over_the_test_time_views(abstaining, tfds_dir):
  """``eval_steps.logit_scores`` against numpy on the served logits of each view: 'flip' averages
  the image's and its mirror image's log-sum-exp and largest logit, 1/2 each."""
  from imgcls_jax import eval_steps
  _, workdir = abstaining
  clf = inference.classifier(inference.load(workdir))
  x, _ = _digits(tfds_dir, 'test[:40]')
  views = [clf.predict_arrays(v)['logits'].astype(np.float64) for v in (x, x[:, :, ::-1])]
  for tta, weights in (('', (1.0, 0.0)), ('flip', (0.5, 0.5))):
    got = jax.device_get(eval_steps.logit_scores(clf.variables, jnp.asarray(x), tta=tta,
                                                 model_def=clf.model_def, cfg=clf.step_cfg))
    for key, fn in (('logsumexp', lambda z: scipy.special.logsumexp(z, 1)),
                    ('max_logit', lambda z: z.max(1))):
      want = sum(w * fn(v) for w, v in zip(weights, views))
      np.testing.assert_allclose(got[key], want, rtol=1e-5, atol=1e-5, err_msg=f'{tta} {key}')
