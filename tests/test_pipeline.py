"""The core tfds pipeline: the embedded digits builder, batches, exact-once eval, mock ImageNet."""
import collections
import json
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from imgcls_jax.data import digits, info as info_lib, pipeline, sources
from imgcls_jax.errors import UserError
from tests.conftest import REPO, subprocess_env


def test_digits_split_is_sklearns_stratified_holdout(digits_config):
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split
  x = load_digits()
  _, _, y_tr, y_te = train_test_split(x.images, x.target, test_size=0.25, stratify=x.target,
                                      random_state=0)
  info = sources.describe(digits_config.data)
  assert info.num_examples == {'train': 1347, 'test': 450}
  assert info.num_classes == 10 and info.channels == 1
  assert info.image_shape == (8, 8, 1) and not info.mirror_safe  # a flipped digit is another digit
  ev = pipeline.EvalData(digits_config.data, 'test', local_batch_size=450)
  (batch,) = list(ev.batches())
  # tfds stores examples in its own (hashed) order: compare (image, label) multisets.
  served = collections.Counter((im.tobytes(), int(l)) for im, l in zip(batch['image'], batch['label']))
  x_te, y_te_arr = digits.load_arrays('test')
  expected = collections.Counter((im.tobytes(), int(l)) for im, l in zip(x_te, y_te_arr))
  assert served == expected
  np.testing.assert_array_equal(y_te_arr, y_te)
  np.testing.assert_array_equal(digits.load_arrays('train')[1], y_tr)


def test_train_batches_shapes_dtypes_and_value_range(digits_config):
  ds, n = pipeline.train_dataset(digits_config.data, seed=0, local_batch_size=32)
  assert n == 1347
  batch = next(ds.as_numpy_iterator())
  assert batch['image'].shape == (32, 8, 8, 1) and batch['image'].dtype == np.uint8
  assert batch['label'].shape == (32,) and batch['label'].dtype == np.int32
  assert batch['image'].max() == 255 and batch['image'].min() == 0
  assert set(batch['label']) <= set(range(10))


def test_training_order_is_a_function_of_seed_and_step(digits_config):
  def batches(seed, start, k):
    ds, _ = pipeline.train_dataset(digits_config.data, seed=seed, local_batch_size=100,
                                   start_step=start)
    return [b for _, b in zip(range(k), ds.as_numpy_iterator())]
  full = batches(0, 0, 30)          # 3000 examples: crosses two epoch boundaries (1347 each)
  resumed = batches(0, 25, 5)
  for a, b in zip(full[25:], resumed):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  other = batches(1, 0, 1)[0]
  assert not np.array_equal(other['label'], full[0]['label'])
  # Each epoch is a permutation of the split: epoch 0 sees every example once.
  epoch0 = np.concatenate([b['label'] for b in full])[:1347]
  assert collections.Counter(epoch0) == collections.Counter(digits.load_arrays('train')[1])


@pytest.mark.parametrize('batch', [64, 450, 512])
def test_eval_covers_every_example_exactly_once(digits_config, batch):
  ev = pipeline.EvalData(digits_config.data, 'test', local_batch_size=batch, split_size=450)
  out = list(ev.batches())
  assert len(out) == -(-450 // batch)
  assert all(b['image'].shape[0] == batch for b in out)
  masked = np.concatenate([b['mask'] for b in out])
  assert masked.sum() == 450 and masked[:450].all()
  images = np.concatenate([b['image'][b['mask']] for b in out]).reshape(450, -1)
  assert len({im.tobytes() for im in images}) == len({im.tobytes() for im in
                                                      digits.load_arrays('test')[0]})


def test_partial_evaluations_leave_the_cached_split_whole(digits_config):
  """config.eval_subset's first batches, then a full pass, several times over (as training
  evaluates): every full pass still covers all 450 examples, and the head is the full pass's start.
  (Reading a partial pass of the cached stream could leave tf.data a partial cache: a full pass
  then counted 17 of 64 examples in one run.)"""
  assert digits_config.data.cache
  ev = pipeline.EvalData(digits_config.data, 'test', local_batch_size=64, split_size=450)
  for _ in range(4):
    head = list(ev.head_batches(2))
    full = list(ev.batches())
    assert len(head) == 2 and sum(int(b['mask'].sum()) for b in full) == 450
    for h, f in zip(head, full):
      np.testing.assert_array_equal(h['image'], f['image'])
      np.testing.assert_array_equal(h['label'], f['label'])


def test_eval_pads_to_the_same_batch_count_on_every_process(digits_config):
  # 450 examples over 4 processes: slices of 113/113/112/112 -> 2 batches of 64 each.
  counts = []
  for p in range(4):
    ev = pipeline.EvalData(digits_config.data, 'test', local_batch_size=64, process_index=p,
                           process_count=4, split_size=450)
    out = list(ev.batches())
    counts.append((len(out), int(sum(b['mask'].sum() for b in out))))
  assert [c[0] for c in counts] == [2, 2, 2, 2]
  assert sum(c[1] for c in counts) == 450


def test_flip_is_refused_for_digits(digits_config):
  digits_config.data.train_preprocess = 'pad_crop(pad=1)|flip_lr'
  with pytest.raises(UserError, match='flip'):
    pipeline.train_dataset(digits_config.data, seed=0, local_batch_size=8)


def test_device_preprocess_is_checked(digits_config):
  digits_config.data.device_preprocess = 'flip_lr'
  with pytest.raises(UserError, match='device_preprocess'):   # digits: a flip changes the label
    pipeline.train_dataset(digits_config.data, seed=0, local_batch_size=8)
  digits_config.data.device_preprocess = 'pad_crop'
  with pytest.raises(UserError, match="not a device-side op"):
    pipeline.train_dataset(digits_config.data, seed=0, local_batch_size=8)


def test_without_train_preprocess_batches_hold_the_raw_images_in_the_same_order(digits_config):
  """No per-example op: the stream batches first (cheap), in the order the augmented one uses."""
  def first(spec, k=3):
    digits_config.data.train_preprocess = spec
    ds, _ = pipeline.train_dataset(digits_config.data, seed=0, local_batch_size=500)
    return [b for _, b in zip(range(k), ds.as_numpy_iterator())]
  plain, padded = first(''), first('pad_crop(pad=1)')
  raw = {im.tobytes() for im in digits.load_arrays('train')[0]}
  for a, b in zip(plain, padded):           # 1500 examples: crosses the epoch boundary (1347)
    np.testing.assert_array_equal(a['label'], b['label'])
    assert a['image'].shape == b['image'].shape == (500, 8, 8, 1)
    assert all(im.tobytes() in raw for im in a['image'])


def test_missing_dataset_and_split_are_clear_errors(digits_config):
  digits_config.data.name = 'no_such_dataset_xyz'
  with pytest.raises(UserError, match="'no_such_dataset_xyz' is not a tfds dataset"):
    sources.describe(digits_config.data)
  digits_config.data.name = 'sklearn_digits'
  with pytest.raises(UserError, match="Split 'validation' does not exist.*test, train"):
    pipeline.EvalData(digits_config.data, 'validation', local_batch_size=8)


def _mock_imagenet_config(tmp_path) -> ml_collections.ConfigDict:
  from configs import imagenet_resnet50
  c = imagenet_resnet50.get_config()
  c.data.data_dir = str(tmp_path)
  c.data.train_preprocess = 'random_resized_crop(size=32)|flip_lr'
  c.data.eval_preprocess = 'center_crop(size=32)'
  return c


def test_mock_imagenet_batches_have_fixed_size(tmp_path):
  c = _mock_imagenet_config(tmp_path)
  with tfds.testing.mock_data(num_examples=20):
    info = sources.describe(c.data)
    assert info.num_classes == 1000 and info.num_examples['train'] is None
    assert info.image_shape == (None, None, 3) and info.mirror_safe  # JPEGs of any size
    ds, n = pipeline.train_dataset(c.data, seed=0, local_batch_size=8)
    assert n == 20
    batch = next(ds.as_numpy_iterator())
    assert batch['image'].shape == (8, 32, 32, 3) and batch['image'].dtype == np.uint8
    ev = pipeline.EvalData(c.data, 'validation', local_batch_size=8)
    out = list(ev.batches())
    assert sum(b['mask'].sum() for b in out) == 20
    assert all(b['image'].shape == (8, 32, 32, 3) for b in out)


def test_dataset_info_round_trips_through_plain_json(digits_config):
  described = sources.describe(digits_config.data)
  folder = info_lib.DatasetInfo(name='image_folder:/data/pets', num_classes=2,
                                class_names=('cat', 'dog'), image_shape=(None, None, 3),
                                num_examples={'train': 12, 'test': None})
  for original in (described, folder):
    text = json.dumps(original.to_json())   # only plain JSON types, or this raises
    back = info_lib.DatasetInfo.from_json(json.loads(text))
    assert back == original
    assert isinstance(back.class_names, tuple) and isinstance(back.image_shape, tuple)
  assert json.loads(json.dumps(described.to_json())) == {
      'name': 'sklearn_digits', 'num_classes': 10, 'class_names': [str(i) for i in range(10)],
      'image_shape': [8, 8, 1], 'num_examples': {'train': 1347, 'test': 450},
      'mirror_safe': False, 'multilabel': False, 'split_digests': {}}
  assert folder.channels == 3 and folder.mirror_safe


def test_check_flips_refuses_flips_that_change_the_label(digits_config):
  data = digits_config.data
  info_lib.check_flips(data)                 # the default digits config: no flip anywhere
  with pytest.raises(UserError, match=r"^config\.evaluate\.tta='mirror' must be '' \(none\), "
                                      r"'flip' or 'flip_translate'\.$"):
    info_lib.check_flips(data, 'mirror')
  with pytest.raises(UserError, match="change the meaning of 'sklearn_digits' images; leave "
                                      'config.evaluate.tta empty'):
    info_lib.check_flips(data, 'flip')
  data.train_preprocess = 'pad_crop(pad=1)|flip_lr'
  with pytest.raises(UserError, match='remove flip_lr from config.data.train_preprocess'):
    info_lib.check_flips(data)
  data.train_preprocess = 'flip_lr'
  for name in ('sklearn_digits:1.0.0', 'mnist:3.0.1', 'kmnist:3.*.*', 'emnist/letters',
               'arrays:svhn_cropped:3.1.0'):   # a version or builder config named: refused too
    data.name = name
    with pytest.raises(UserError, match='remove flip_lr from config.data.train_preprocess'):
      info_lib.check_flips(data)
  data.name = 'fashion_mnist'                # mirror-safe: every flip is allowed
  data.device_preprocess = 'flip_lr'
  info_lib.check_flips(data, 'flip')
  data.name = 'fashion_mnist:3.0.1'
  info_lib.check_flips(data, 'flip')
  for name in ('arrays:mnist/fashion_aug.npz', 'arrays:/data/svhn_cropped/mine.npz'):
    data.name = name                         # one's own file: its folder's name says nothing
    info_lib.check_flips(data, 'flip')
  data.device_preprocess = 'flip_lr|pad_crop'
  with pytest.raises(UserError, match="device_preprocess='flip_lr\\|pad_crop' is not a device-side"):
    info_lib.check_flips(data)


def test_dataset_info_module_does_not_import_tensorflow():
  code = "import sys, imgcls_jax.data.info; print(sorted(m for m in sys.modules if 'tensorflow' in m))"
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=REPO,
                       env=subprocess_env(), timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == '[]'


def test_the_data_modules_and_the_exporter_import_tensorflow_without_keras():
  """TensorFlow's own import would load Keras (and scikit-learn) for ~3 s; ours skips it
  (data/tf_import.py), leaves TF_USE_LEGACY_KERAS as it found it, and tf.keras still works."""
  import importlib.util
  if importlib.util.find_spec('tf_keras') is not None:
    pytest.skip('tf_keras is installed: then the import is a plain one (data/tf_import.py)')
  code = '''
import os, sys
before = os.environ.get('TF_USE_LEGACY_KERAS')
import imgcls_jax.data.pipeline, imgcls_jax.data.folds
from imgcls_jax.export import formats
assert formats._tf() is sys.modules['tensorflow']
print(sorted(m.split('.')[0] for m in sys.modules if m.split('.')[0] in ('keras', 'sklearn')))
print(os.environ.get('TF_USE_LEGACY_KERAS') == before)
import tensorflow as tf
print(all(isinstance(p, str) for p in tf.__path__), tf.keras.layers.Dense(3).units)
'''
  for preset in (None, '0'):
    env = subprocess_env()
    env.pop('TF_USE_LEGACY_KERAS', None)
    if preset is not None:
      env['TF_USE_LEGACY_KERAS'] = preset
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=REPO,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split('\n')[:3] == ['[]', 'True', 'True 3'], out.stdout
