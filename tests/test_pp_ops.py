"""Preprocessing-op arguments that cannot work are one-sentence user errors when the spec is
parsed (or, when they cannot work on the images' size, when the pipeline is built), not
TensorFlow errors in the input pipeline."""
import re

import numpy as np
import pytest
import tensorflow as tf

from imgcls_jax.data import pp
from imgcls_jax.errors import UserError


def test_bad_pad_crop_arguments_are_user_errors():
  for spec, why in (('pad_crop(pad=-3)', 'pad must be a whole number of pixels >= 0, got -3'),
                    ('pad_crop(pad=2.5)', 'pad must be a whole number of pixels >= 0, got 2.5'),
                    ("pad_crop(mode='wrap')",
                     "mode must be one of constant, reflect, symmetric, got 'wrap'")):
    with pytest.raises(UserError, match=re.escape(f"Bad arguments for preprocessing op '{spec}': "
                                                  f'{why}.')):
      pp.parse(spec)
  # What works still parses: no padding, and tf.pad's other modes in either case.
  assert len(pp.parse("pad_crop(pad=0)|pad_crop(pad=2, mode='reflect')|"
                      "pad_crop(mode='SYMMETRIC')")) == 3


@pytest.mark.parametrize('key, spec, why', [
    ('train_preprocess', 'pad_crop(pad=-3)', "Bad arguments for preprocessing op 'pad_crop"),
    ('eval_preprocess', 'center_crop(size=32', "Cannot parse preprocessing op 'center_crop"),
    ('eval_preprocess', 'sharpen', "Unknown preprocessing op 'sharpen'"),
])
def test_run_setup_checks_the_specs_before_any_work(digits_config, key, spec, why):
  """Found by run.setup (before the model summary, the state and the streams), naming the key."""
  from imgcls_jax import run
  digits_config.data[key] = spec
  with pytest.raises(UserError, match=re.escape(f'config.data.{key}: {why}')):
    run.setup(digits_config)


def _in_dataset(spec: str, image: np.ndarray) -> np.ndarray:
  """``spec`` applied to ``image`` inside tf.data (traced once, with the image's static shape)."""
  op = pp.compose(spec)
  ds = tf.data.Dataset.from_tensors(image).map(lambda x: op(x, tf.constant([1, 2], tf.int64)))
  return next(ds.as_numpy_iterator())


@pytest.mark.parametrize('pad, mode, most', [(8, 'reflect', 7), (9, 'symmetric', 8),
                                             (30, 'REFLECT', 7)])
def test_a_mirror_pad_wider_than_the_image_is_refused_when_the_pipeline_is_built(pad, mode, most):
  # tf.pad's REFLECT mirrors at most size - 1 pixels, SYMMETRIC at most size.
  spec = f"pad_crop(pad={pad}, mode='{mode}')"
  image = np.arange(8 * 10, dtype=np.uint8).reshape(8, 10, 1)
  with pytest.raises(UserError, match=re.escape(
      f"pad_crop(pad={pad}, mode='{mode}') cannot pad 8x10 images by {pad} pixels "
      f"('{mode.lower()}' padding mirrors at most {most}); set pad <= {most} or use "
      "mode='constant'.")):
    _in_dataset(spec, image)
  with pytest.raises(UserError, match='cannot pad 8x10 images'):
    pp.output_shape(spec, (8, 10), 1)   # eagerly, too


@pytest.mark.parametrize('pad, mode', [(7, 'reflect'), (8, 'symmetric'), (20, 'constant')])
def test_the_widest_mirror_pad_still_works(pad, mode):
  image = np.arange(8 * 10, dtype=np.uint8).reshape(8, 10, 1)
  out = _in_dataset(f"pad_crop(pad={pad}, mode='{mode}')", image)
  padded = np.pad(image, [(pad, pad), (pad, pad), (0, 0)], mode=mode)
  windows = [padded[i:i + 8, j:j + 10] for i in range(2 * pad + 1) for j in range(2 * pad + 1)]
  assert out.shape == (8, 10, 1) and any(np.array_equal(out, w) for w in windows)


def test_the_training_stream_refuses_a_mirror_pad_wider_than_the_images(digits_config):
  from imgcls_jax.data import reader
  digits_config.data.train_preprocess = "pad_crop(pad=8, mode='reflect')"   # digits are 8x8
  with pytest.raises(UserError, match=re.escape(
      "pad_crop(pad=8, mode='reflect') cannot pad 8x8 images by 8 pixels")):
    reader.train_batches(digits_config.data, seed=0, local_batch_size=64)
  digits_config.data.train_preprocess = "pad_crop(pad=7, mode='reflect')"
  batch = next(reader.train_batches(digits_config.data, seed=0, local_batch_size=64))
  assert batch['image'].shape == (64, 8, 8, 1)


def test_setup_refuses_a_mirror_pad_wider_than_the_images_before_any_model(digits_config):
  from imgcls_jax import run
  digits_config.data.eval_preprocess = "pad_crop(pad=9, mode='symmetric')"
  with pytest.raises(UserError, match=re.escape(
      "config.data.eval_preprocess: pad_crop(pad=9, mode='symmetric') cannot pad 8x8")):
    run.setup(digits_config)
  digits_config.data.eval_preprocess = "pad_crop(pad=8, mode='symmetric')"
  assert run.setup(digits_config).info.image_shape == (8, 8, 1)
