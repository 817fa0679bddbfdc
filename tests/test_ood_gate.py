"""The unknown-input gate (``config.evaluate.unknown_keep``, imgcls_jax/ood.py): fitted with the
temperature on the held-out split, checked against numpy on the served logits; predict and serve
mark exactly the images below it; calibrate refits, remembers and drops it; bad values refused in
one line."""
import io

import numpy as np
import pytest
import scipy.special
from PIL import Image

from imgcls_jax import calibrate, inference, predict, train
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
  """The highest score at or above which at least ``keep`` of the rows lie."""
  s = np.sort(_scores(logits))[::-1]
  k = int(np.ceil(keep * len(s) - 1e-9))
  assert (k / len(s) >= keep) and ((k - 1) / len(s) < keep)
  return float(s[k - 1])


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
  assert u['below'] == below and trained.unknown_below == below and trained.unknown_keep == 0.95
  assert u['kept'] == np.mean(_scores(logits) >= np.float32(below)) >= 0.95
  assert u['examples'] == len(x) and u['split'] == 'train[80%:]' and u['score'] == 'logsumexp'


def test_predict_and_serve_mark_exactly_the_images_below_the_gate(gated, tfds_dir, photos,
                                                                   tmp_path):
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
  got = np.array([r['unknown'] for r in results])
  np.testing.assert_array_equal(got, want)
  np.testing.assert_allclose([r['logsumexp'] for r in results], _scores(logits), rtol=1e-6)
  assert all(r['unknown_below'] == below for r in results)
  assert 0 < want.sum() < len(want)              # both kinds of answer occur
  out = io.StringIO()
  predict.write(results, out, 'csv')
  rows = out.getvalue().splitlines()
  assert rows[0] == 'file,rank,class,index,probability,unknown'
  assert sum(r.endswith(',1') for r in rows[1:]) == 2 * want.sum()   # top=2: two rows each
  # The service answers the same, and says where its gate is.
  with local_service(clf, config) as call:
    assert call('GET', '/v1/model')[1]['unknown_below'] == below
    for i in (0, 1, 2, 60, 61, 62, *np.flatnonzero(want)[:3]):
      status, answer = call('POST', '/v1/classify', open(files[i], 'rb').read(),
                            {'Content-Type': 'image/png'})
      assert status == 200 and answer['unknown'] == bool(want[i]), files[i]
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
  assert trained.unknown_below == _oracle_below(logits, 0.8) and trained.unknown_keep == 0.8
  assert f"log-sum-exp is below {trained.unknown_below:.4f} are unknown" in out
  _, again = fit()                       # remembered: refitted at 0.8 with the new temperature
  assert again.unknown_keep == 0.8 and again.unknown_below == trained.unknown_below
  out, dropped = fit(unknown_keep=0)
  assert dropped.unknown is None and dropped.unknown_below is None
  assert 'the unknown-input gate is removed' in out
  x_test, _ = _digits(tfds_dir, 'test[:4]')
  out = inference.classifier(dropped).predict_arrays(x_test)
  assert not any('unknown' in inference.answer_gates(dropped, p, lg)
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
