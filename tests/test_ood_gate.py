"""The unknown-input gate (``config.evaluate.unknown_keep``, imgcls_jax/ood.py): fitted with the
temperature on the held-out split, checked against numpy on the served logits; predict and serve
mark exactly the images below it; calibrate refits, remembers and drops it; bad values refused in
one line."""
import io
import json
import logging

import numpy as np
import pytest
import scipy.special
from PIL import Image

from imgcls_jax import answers, calibrate, evaluate, inference, ood, predict, train
from imgcls_jax.data import images as image_files
from imgcls_jax.errors import UserError
from tests.conftest import export_description, local_service, small_digits_config


def _digits(tfds_dir, split):
  import tensorflow_datasets as tfds
  from imgcls_jax.data import digits  # noqa: F401  (registers the builder)
  d = tfds.as_numpy(tfds.load('sklearn_digits', split=split, batch_size=-1, data_dir=tfds_dir))
  return d['image'], d['label']


def _scores(logits):
  """The log-sum-exp of each row, in float64, as float32 (scipy: the oracle)."""
  return scipy.special.logsumexp(np.asarray(logits, np.float64), axis=1).astype(np.float32)


def _oracle_below(logits, keep):
  """Halfway (float32) between the lowest of the top ``keep`` share of the rows' scores and the
  next one down (no ties in these scores)."""
  s = np.sort(_scores(logits))[::-1]
  k = int(np.ceil(keep * len(s) - 1e-9))
  assert (k / len(s) >= keep) and ((k - 1) / len(s) < keep) and s[k - 1] > s[k]
  return float(np.float32((np.float64(s[k - 1]) + np.float64(s[k])) / 2))


def test_the_fit_and_the_decision_at_the_boundary():
  """``fit_gate`` keeps the asked share with ties and NaNs (never kept), and ``gate`` keeps a
  score exactly at the threshold and calls NaN unknown."""
  scores = np.array([5, 4, 4, 4, 3, 2, np.nan, 1], np.float32)
  r = ood.fit_gate(scores, 0.5, 's')        # 4 of 8 needed: 5, 4, 4, 4 -> halfway to 3
  assert r['below'] == 3.5 and r['kept'] == 0.5 and r['examples'] == 8
  r = ood.fit_gate(scores, 0.3, 's')        # 3 of 8 needed: the tie at 4 keeps all four
  assert r['below'] == 3.5 and r['kept'] == 0.5
  r = ood.fit_gate(scores, 0.8, 's')        # 7 of 8 needed: the NaN is never kept, and below
  assert r['below'] == 1.0 and r['kept'] == 7 / 8   # the lowest kept score there is no other
  for bad in ([1, np.nan], [np.nan], [-np.inf, -np.inf, 3]):   # no finite threshold keeps 90%
    with pytest.raises(UserError, match=r"No unknown-input gate keeps 90\.00% of 's': \d+ of its "
                                        r'\d+ scores are not finite'):
      ood.fit_gate(np.array(bad, np.float32), 0.9, 's')
  with pytest.raises(UserError, match="empty split 's'"):
    ood.fit_gate(np.zeros((0,), np.float32), 0.9, 's')
  logits = np.array([0.0, np.log(3.0)], np.float32)    # log-sum-exp = log 4
  at = float(ood.energy(logits[None])[0])
  assert not ood.gate(logits, at)['unknown']
  assert ood.gate(logits, float(np.nextafter(np.float32(at), np.float32(np.inf))))['unknown']
  nan = ood.gate(np.array([np.nan, 0.0], np.float32), -1e30)
  assert nan['unknown'] and nan['logsumexp'] is None     # valid JSON


def _clear(scores, below, rel=1e-5):
  """The images whose score is not within ``rel`` of the threshold: another batching (the fit's
  sharded eval batches, predict's padded ones) may round their logits by an ulp, which can move
  only those across it, on some CPUs."""
  return np.abs(np.asarray(scores, np.float64) - below) > rel * max(1.0, abs(below))


@pytest.fixture(scope='module')
def gated(tmp_path_factory, tfds_dir):
  """A digits run trained briefly on 80% of its training split; the temperature and a gate
  keeping 95% of the other 20% fitted at the end of training."""
  c = small_digits_config(tfds_dir)
  c.data.train_split = 'train[:80%]'
  c.evaluate.temperature_split = 'train[80%:]'
  c.evaluate.unknown_keep = 0.95
  workdir = str(tmp_path_factory.mktemp('gated'))
  train.train_and_evaluate(c, workdir)
  return c, workdir


@pytest.fixture(scope='module')
def photos(tmp_path_factory):
  """30 crops of scikit-learn's sample photographs: none of the digits."""
  from sklearn.datasets import load_sample_images
  root = tmp_path_factory.mktemp('photos')
  rng = np.random.default_rng(0)
  for k, photo in enumerate(load_sample_images().images):
    for i in range(15):
      y, x = rng.integers(0, photo.shape[0] - 64), rng.integers(0, photo.shape[1] - 64)
      Image.fromarray(photo[y:y + 64, x:x + 64]).save(root / f'p{k}_{i}.png')
  return str(root)


def test_the_gate_keeps_its_share_of_the_held_out_split_by_the_served_logits(gated, tfds_dir):
  _, workdir = gated
  trained = inference.load(workdir)
  x, _ = _digits(tfds_dir, 'train[80%:]')
  logits = inference.classifier(trained).predict_arrays(x)['logits']
  below = _oracle_below(logits, 0.95)
  u = trained.unknown
  assert u['below'] == pytest.approx(below, rel=1e-5) and trained.unknown_below == u['below']
  assert trained.unknown_keep == 0.95 and u['kept'] >= 0.95
  scores = _scores(logits)
  near = (~_clear(scores, u['below'])).sum()          # none on this machine
  assert abs(u['kept'] - np.mean(scores >= np.float32(u['below']))) <= near / len(x)
  assert u['examples'] == len(x) and u['split'] == 'train[80%:]' and u['score'] == 'logsumexp'
  # Predicting the held-out split marks the share the fit left out.
  clf = inference.classifier(trained)
  out = clf.predict_arrays(x)
  unknown = [answers.answer_gates(trained, p, lg)['unknown']
             for p, lg in zip(out['probabilities'], out['logits'])]
  assert abs(1 - np.mean(unknown) - u['kept']) <= near / len(x)


def test_predict_and_serve_mark_exactly_the_images_below_the_gate(gated, tfds_dir, photos,
                                                                   tmp_path, caplog):
  config, workdir = gated
  clf = inference.classifier(inference.load(workdir))
  below = clf.trained.unknown_below
  x, _ = _digits(tfds_dir, 'test[:60]')
  digit_dir = tmp_path / 'digits'
  digit_dir.mkdir()
  for i, img in enumerate(x):
    Image.fromarray(img[:, :, 0]).save(digit_dir / f'd{i:02d}.png')
  files = image_files.list_inputs(f'{digit_dir},{photos}')
  results, skipped = predict.predict_files(clf, files, top=2)
  assert not skipped and len(results) == 90
  logits = clf.predict_arrays(np.stack([clf.prepare(f) for f in files]))['logits']
  want = _scores(logits) < np.float32(below)
  clear = _clear(_scores(logits), below)             # every image, on this machine
  got = np.array([r['unknown'] for r in results])
  np.testing.assert_array_equal(got[clear], want[clear])
  np.testing.assert_allclose([r['logsumexp'] for r in results], _scores(logits), rtol=1e-6)
  assert all(r['unknown_below'] == below for r in results)
  assert 0 < want.sum() < len(want)              # both kinds of answer occur
  # The mode itself (--mode=predict): the JSON lines it writes, and its count of the unknown.
  with caplog.at_level(logging.INFO):
    written = predict.predict(None, workdir, {'predict.inputs': f'{digit_dir},{photos}',
                                              'predict.output': str(tmp_path / 'p.jsonl')})
  lines = [json.loads(line) for line in open(tmp_path / 'p.jsonl')]
  assert [r['unknown'] for r in lines] == [r['unknown'] for r in written]
  np.testing.assert_array_equal(np.array([r['unknown'] for r in written])[clear], want[clear])
  assert (f"Unknown: {sum(r['unknown'] for r in written)} of 90 image(s), their logits' "
          f"log-sum-exp below the run's gate {below:.4f}.") in caplog.text
  out = io.StringIO()
  predict.write(results, out, 'csv')
  rows = out.getvalue().splitlines()
  assert rows[0] == 'file,rank,class,index,probability,unknown'
  assert sum(r.endswith(',1') for r in rows[1:]) == 2 * got.sum()   # top=2: two rows each
  # The service answers the same, and says where its gate is.
  with local_service(clf, config) as call:
    assert call('GET', '/v1/model')[1]['unknown_below'] == below
    for i in (0, 1, 2, 60, 61, 62, *np.flatnonzero(want)[:3]):
      status, answer = call('POST', '/v1/classify', open(files[i], 'rb').read(),
                            {'Content-Type': 'image/png'})
      assert status == 200, files[i]
      assert answer['unknown'] == bool(want[i]) or not clear[i], files[i]
      assert answer['logsumexp'] == pytest.approx(results[i]['logsumexp'], rel=1e-6)
  # The export carries the gate for its clients.
  pytest.importorskip('tensorflow')
  assert export_description(config, workdir, str(tmp_path / 'export'))['unknown_below'] == below


def test_calibrate_refits_remembers_and_drops_the_gate(gated, tfds_dir, tmp_path_factory,
                                                       capsys):
  import shutil
  _, source = gated
  workdir = str(tmp_path_factory.mktemp('gated_copy') / 'run')
  shutil.copytree(source, workdir)
  x, _ = _digits(tfds_dir, 'train[80%:]')

  def fit(**flags):
    calibrate.calibrate(None, workdir, {'evaluate.temperature_split': 'train[80%:]',
                                        **{f'evaluate.{k}': v for k, v in flags.items()}})
    return capsys.readouterr().out, inference.load(workdir)

  out, trained = fit(unknown_keep=0.8)
  logits = inference.classifier(trained).predict_arrays(x)['logits']
  assert trained.unknown_below == pytest.approx(_oracle_below(logits, 0.8), rel=1e-5)
  assert trained.unknown_keep == 0.8
  assert f"log-sum-exp is below {trained.unknown_below:.4f} are unknown" in out
  _, again = fit()                       # remembered: refitted at 0.8 with the new temperature
  assert again.unknown_keep == 0.8 and again.unknown_below == trained.unknown_below
  out, dropped = fit(unknown_keep=0)
  assert dropped.unknown is None and dropped.unknown_below is None
  assert 'the unknown-input gate is removed' in out
  x_test, _ = _digits(tfds_dir, 'test[:4]')
  out = inference.classifier(dropped).predict_arrays(x_test)
  assert not any('unknown' in answers.answer_gates(dropped, p, lg)
                 for p, lg in zip(out['probabilities'], out['logits']))
  with pytest.raises(UserError, match=r'config\.evaluate\.unknown_keep=1\.5 must be the share '):
    fit(unknown_keep=1.5)


def test_a_gate_without_a_held_out_split_is_refused_before_training(tfds_dir, tmp_path):
  c = small_digits_config(tfds_dir)
  c.evaluate.unknown_keep = 0.9
  with pytest.raises(UserError, match=r'unknown_keep is fitted with the temperature .* set '
                                      r'temperature_split to a held-out split'):
    train.train_and_evaluate(c, str(tmp_path / 'run'))
  assert not (tmp_path / 'run' / 'checkpoints').exists()


def test_the_evaluation_report_measures_the_runs_gate(gated, tfds_dir, photos, tmp_path):
  """--mode=evaluate with out-of-distribution images on a gated run: the report's gate row is
  the share of the split and of the images the served logits keep."""
  _, workdir = gated
  rep = evaluate.evaluate(None, workdir, {'evaluate.ood_inputs': photos,
                                          'evaluate.output_dir': str(tmp_path / 'report')})
  o = rep['out_of_distribution']
  clf = inference.classifier(inference.load(workdir))
  below = np.float32(clf.trained.unknown_below)
  x, _ = _digits(tfds_dir, 'test')
  s_split = _scores(clf.predict_arrays(x)['logits'])
  files = image_files.list_inputs(photos)
  s_ood = _scores(clf.predict_arrays(np.stack([clf.prepare(f) for f in files]))['logits'])
  g = o['at_unknown_below']
  assert g['threshold'] == float(below)
  # The evaluation's sharded batches against predict's: equal but for images within an ulp's
  # reach of the threshold (none on this machine).
  for got, s in ((g['answered_split'], s_split), (g['answered_ood'], s_ood)):
    assert abs(got - np.mean(s >= below)) <= (~_clear(s, below)).sum() / len(s)
  md = open(tmp_path / 'report' / 'report.md').read()
  assert (f"| the run's unknown-input gate (log-sum-exp of the logits, one view as predict and "
          f"serve score, fitted to keep 95.00% of 'train[80%:]'): {below:.4f} | "
          f"{100 * g['answered_split']:.2f}% | {100 * g['answered_ood']:.2f}% |") in md
  assert (f"the run's unknown-input gate keeps {g['answered_split']:.2%} of the split"
          in ood.headline(o))


def test_the_ood_benchmark_prints_every_score_and_the_gates(gated, monkeypatch, capsys):
  """``benchmarks/ood_scores.py`` (small): a row per set and score, the best one marked per set,
  and the gates' shares (no Fashion-MNIST row for an 8x8 digits run)."""
  import re
  import sys
  from benchmarks import ood_scores
  _, workdir = gated
  monkeypatch.setattr(sys, 'argv', ['ood_scores', f'--workdir={workdir}', '--count=20', '--tta='])
  ood_scores.main()
  out = capsys.readouterr().out
  rows = re.findall(r'^\| (digits|photos) \(20\) \| ([^|]+?) \| ([0-9.]+) \| ([0-9.]+)% \|$', out,
                    re.M)
  assert len(rows) == 6 and sum('(best)' in r[1] for r in rows) == 2, out
  assert all(0 <= float(r[2]) <= 1 and 0 <= float(r[3]) <= 100 for r in rows)
  gates = re.findall(r'^\| (digits|photos) \(20\) \| ([0-9.]+)% \| ([0-9.]+)% \| ([0-9.]+)% \|$',
                     out, re.M)
  assert [g[0] for g in gates] == ['digits', 'photos'] and 'Fashion-MNIST' not in out, out
