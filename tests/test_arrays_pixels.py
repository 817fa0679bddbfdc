"""Training pixels equal serving pixels for runs trained from an arrays file written with
``write_arrays --eval_preprocess``: the file records the ops that made its pixels, the run keeps
them (``DatasetInfo.stored_preprocess``), and ``inference.prepare`` applies them to a raw file.
Before, the run recorded no preprocessing and an input of the stored size, so predict and serve
resized photos with PIL's area filter where the file holds TensorFlow's bilinear resize (on
sklearn's china.jpg at 16x16: 17 grey levels apart on average, up to 129)."""
from __future__ import annotations

import logging
import os

import numpy as np
import pytest
from PIL import Image

from imgcls_jax import inference, train
from imgcls_jax.data import arrays, write_arrays
from tests.conftest import small_digits_config


@pytest.fixture(scope='module')
def photos(tmp_path_factory):
  """Two classes of images of two sizes (40x52, 44x36: smooth shapes plus noise, on which
  resizers differ), as PNG."""
  root = tmp_path_factory.mktemp('photos')
  rng = np.random.default_rng(0)
  for k, name in enumerate(('disc', 'stripe')):
    os.makedirs(root / name)
    yy, xx = np.mgrid[:(40, 44)[k], :(52, 36)[k]]
    for i in range(12):
      shape = ((yy - 20) ** 2 + (xx - 26) ** 2 < (8 + i) ** 2) if k == 0 else (xx // (3 + i) % 2)
      image = (shape[..., None] * rng.integers(100, 256, 3) + rng.integers(0, 60, xx.shape + (3,)))
      Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / name / f'{i}.png')
  return str(root)


@pytest.fixture(scope='module')
def written(photos, tmp_path_factory):
  """The README's command: write_arrays --folder --holdout_fraction --eval_preprocess=resize."""
  out = str(tmp_path_factory.mktemp('npz') / 'ph.npz')
  assert write_arrays.main(['write_arrays', f'--folder={photos}', '--holdout_fraction=0.25',
                            "--eval_preprocess=resize(size=16)", f'--output={out}']) == 0
  return out


def _files(root):
  return sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)


def _stored_rows(path):
  with np.load(path) as z:
    return {im.tobytes() for split in ('train', 'test') for im in z[f'{split}_images']}


@pytest.fixture(scope='module')
def run_dir(written, tmp_path_factory, tfds_dir):
  """A run trained two steps from the arrays file."""
  c = small_digits_config(tfds_dir)
  c.data.name, c.data.train_preprocess, c.data.device_preprocess = f'arrays:{written}', '', ''
  c.batch_size = c.eval_batch_size = 8
  c.num_train_steps = 2
  workdir = str(tmp_path_factory.mktemp('runs') / 'run')
  train.train_and_evaluate(c, workdir)
  return workdir


def test_predict_prepares_a_raw_file_as_the_arrays_file_stores_it(photos, written, run_dir):
  from imgcls_jax.data import images
  trained = inference.load(run_dir, None, overrides={})
  stored = _stored_rows(written)
  prepared = {inference.prepare(trained, f).tobytes() for f in _files(photos)}
  assert prepared == stored                    # each file's row, byte for byte
  assert trained.info.stored_preprocess == 'resize(size=16)'
  # What predict did before (PIL's area filter to the stored size) is another image.
  old = images.decode(_files(photos)[0], channels=3, size_hw=(16, 16))
  assert old.tobytes() not in stored


def test_evaluate_on_a_folder_of_labelled_images_reads_them_as_training_did(photos, written,
                                                                           run_dir, tmp_path):
  """--mode=evaluate --config.data.folder=X of an arrays run said 'add --config.data.name=
  image_folder', which then was 'conflicts with the trained run'. Now the folder is evaluated
  (its images made as the arrays file's were: the same scores as on the stored rows); a size
  fixing eval_preprocess that the pipeline's error asks for is taken when it makes the model's
  input, and one that does not is one line."""
  from imgcls_jax import evaluate
  from imgcls_jax.errors import UserError
  settings = {'evaluate.label_issues': False, 'evaluate.output_dir': str(tmp_path / 'report')}
  rep = evaluate.evaluate(None, run_dir, overrides={'data.folder': photos, **settings})
  clf = inference.classifier(inference.load(run_dir, None, overrides={}))
  with np.load(written) as z:
    x = np.concatenate([z['train_images'], z['test_images']])
    y = np.concatenate([z['train_labels'], z['test_labels']])
  top1 = float(np.mean(clf.predict_arrays(x)['probabilities'].argmax(-1) == y))
  assert rep['num_examples'] == 24 and rep['accuracy'] == pytest.approx(top1)
  rep = evaluate.evaluate(None, run_dir, overrides={
      'data.folder': photos, 'data.name': 'image_folder',
      'data.eval_preprocess': 'resize(size=16)', **settings})
  assert rep['num_examples'] == 24
  with pytest.raises(UserError, match=r"--config.data.eval_preprocess='resize\(size=8\)' makes "
                                      r'8x8 images where the model reads 16x16; give one that '
                                      r"makes that, e.g. 'resize\(size=16\)'"):
    evaluate.evaluate(None, run_dir, overrides={'data.folder': photos,
                                                'data.eval_preprocess': 'resize(size=8)',
                                                **settings})


def test_a_file_without_the_record_still_predicts_and_warns_once(photos, written, tmp_path,
                                                                  caplog):
  """Arrays files written before the record (or by other code): read as before (resized to the
  stored size), with one warning that predict cannot know how their pixels were made."""
  with np.load(written) as z:
    contents = {k: z[k] for k in z.files if k != 'preprocess'}
  old = str(tmp_path / 'old.npz')
  np.savez(old, **contents)
  c = small_digits_config(str(tmp_path))
  c.data.name, c.data.train_preprocess = f'arrays:{old}', ''
  info = arrays.describe(c.data)
  assert getattr(info, 'stored_preprocess', None) is None
  native, shape = inference.input_spec(c.data, info)
  trained = inference.Trained(run=c, info=info, image_shape=shape, native_hw=native,
                              variables=None, step=0, origin=old)
  with caplog.at_level(logging.WARNING):
    for f in _files(photos)[:3]:
      assert inference.prepare(trained, f).shape == (16, 16, 3)
  said = [r.getMessage() for r in caplog.records if 'does not say how its images' in r.getMessage()]
  assert len(said) == 1 and old in said[0] and 'write_arrays' in said[0]


def test_serving_such_a_run_without_tensorflow_stops_at_start_up_in_one_line(run_dir):
  """The recorded ops run on TensorFlow: where it is not installed (the GPU image), the server
  must not start and then answer every request with an error; it stops before serving."""
  from tests.conftest import run_without_tf
  proc = run_without_tf('-m', 'imgcls_jax.main', '--mode=serve', f'--workdir={run_dir}',
                        '--config.serve.port=0', timeout=180)
  assert proc.returncode == 2, proc.stderr[-2000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1 and "made by the ops 'resize(size=16)', which run on TensorFlow" in \
      errors[0], proc.stderr[-2000:]
  assert 'Serving' not in proc.stdout + proc.stderr


def test_a_palette_image_with_transparency_decodes_without_pils_warning():
  """A palette PNG whose transparency is bytes (one alpha per entry): PIL's direct palette -> grey
  conversion warns "Palette images with Transparency expressed in bytes should be converted to
  RGBA images" on every decode (predict, every epoch of an image folder); decode goes through
  RGBA, which gives the same bytes (PIL's luma of the palette colour, alpha dropped) silently."""
  import io
  import warnings

  from PIL import Image

  from imgcls_jax.data import images
  rng = np.random.default_rng(0)
  img = Image.fromarray(rng.integers(0, 256, (9, 7)).astype(np.uint8), 'P')
  img.putpalette(rng.integers(0, 256, 768).astype(np.uint8).tobytes())
  png = io.BytesIO()
  img.save(png, 'PNG', transparency=bytes(rng.integers(0, 256, 256).astype(np.uint8)))
  with Image.open(io.BytesIO(png.getvalue())) as stored:
    assert stored.mode == 'P' and isinstance(stored.info['transparency'], bytes)
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')
      want = {1: np.asarray(stored.convert('L'))[..., None], 3: np.asarray(stored.convert('RGB'))}
  for channels in (1, 3):
    with warnings.catch_warnings():
      warnings.simplefilter('error')
      np.testing.assert_array_equal(images.decode(png.getvalue(), channels=channels),
                                    want[channels])
