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
    example = "mode='reflect'" if 'mode' in spec else 'pad=4'
    with pytest.raises(UserError, match=re.escape(f'{spec}: {why}; e.g. pad_crop({example}).')):
      pp.parse(spec)
  # What works still parses: no padding, and tf.pad's other modes in either case.
  assert len(pp.parse("pad_crop(pad=0)|pad_crop(pad=2, mode='reflect')|"
                      "pad_crop(mode='SYMMETRIC')")) == 3


@pytest.mark.parametrize('key, spec, why', [
    ('train_preprocess', 'pad_crop(pad=-3)', 'pad_crop(pad=-3): pad must be a whole number'),
    ('train_preprocess', 'random_erasing(value=300)', 'random_erasing(value=300): value must be'),
    ('eval_preprocess', 'center_crop(size=32, crop_fraction=0)',
     'center_crop(crop_fraction=0): crop_fraction must be'),
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


# ---- every op's arguments, checked when the spec is parsed (not when the op first runs) ----

_PIXELS = 'a pixel value from 0 to 255'
_FRACTION = 'a fraction > 0 and <= 1'
_RA_OPS = ('identity, auto_contrast, equalize, rotate, solarize, color, posterize, contrast, '
           'brightness, sharpness, shear_x, shear_y, translate_x, translate_y')
_TA_OPS = ('identity, shear_x, shear_y, translate_x, translate_y, rotate, brightness, color, '
           'contrast, sharpness, posterize, solarize, auto_contrast, equalize')
_METHODS = 'bilinear, nearest, bicubic, area, lanczos3, lanczos5, gaussian, mitchellcubic'


@pytest.mark.parametrize('spec, message', [
    # Silently wrong before: a wrapped fill value, swapped ranges, a probability above 1.
    ('random_erasing(value=300)', f'random_erasing(value=300): value must be {_PIXELS}, got 300; '
     'e.g. random_erasing(value=0).'),
    ('random_erasing(value=-1)', f'random_erasing(value=-1): value must be {_PIXELS}, got -1; '
     'e.g. random_erasing(value=0).'),
    ('random_resized_crop(area_min=0.5, area_max=0.1)',
     'random_resized_crop(area_min=0.5, area_max=0.1): area_min must be <= area_max, got 0.5 > '
     '0.1; e.g. random_resized_crop(area_min=0.1, area_max=0.5).'),
    ('random_erasing(area_min=0.5, area_max=0.1)',
     'random_erasing(area_min=0.5, area_max=0.1): area_min must be <= area_max, got 0.5 > 0.1; '
     'e.g. random_erasing(area_min=0.1, area_max=0.5).'),
    ('random_erasing(prob=1.5)', 'random_erasing(prob=1.5): prob must be a probability from 0 to '
     '1, got 1.5; e.g. random_erasing(prob=0.5).'),
    # Raw tracebacks before (some only once the op first ran on data).
    ('rotate(degrees=(10,))', 'rotate(degrees=(10,)): degrees must be a number >= 0 or a pair '
     '(lo, hi) of numbers with lo <= hi, got (10,); e.g. rotate(degrees=(-10, 10)).'),
    ('random_erasing(attempts=0)', 'random_erasing(attempts=0): attempts must be a whole number '
     '>= 1, got 0; e.g. random_erasing(attempts=10).'),
    ('randaugment(num_bins=1, magnitude=0)', 'randaugment(num_bins=1): num_bins must be a whole '
     'number >= 2, got 1; e.g. randaugment(num_bins=31).'),
    ('center_crop(crop_fraction=0)', f'center_crop(crop_fraction=0): crop_fraction must be '
     f'{_FRACTION}, got 0; e.g. center_crop(crop_fraction=0.875).'),
    ('random_erasing(ratio_min=0)', 'random_erasing(ratio_min=0): ratio_min must be an aspect '
     'ratio > 0, got 0; e.g. random_erasing(ratio_min=0.75).'),
    ('randaugment(num_ops=-1)', 'randaugment(num_ops=-1): num_ops must be a whole number >= 0 '
     '(0 applies none), got -1; e.g. randaugment(num_ops=2).'),
    ('random_resized_crop(size=0)', 'random_resized_crop(size=0): size must be a whole number of '
     'pixels >= 1, got 0; e.g. random_resized_crop(size=224).'),
    ('resize(size=-3)', 'resize(size=-3): size must be a whole number of pixels >= 1, got -3; '
     'e.g. resize(size=224).'),
    # One or more per op and argument.
    ('random_resized_crop(area_max=1.5)', f'random_resized_crop(area_max=1.5): area_max must be '
     f'{_FRACTION}, got 1.5; e.g. random_resized_crop(area_max=1.0).'),
    ('random_resized_crop(area_min=0)', f'random_resized_crop(area_min=0): area_min must be '
     f'{_FRACTION}, got 0; e.g. random_resized_crop(area_min=0.08).'),
    ('random_resized_crop(ratio_min=2, ratio_max=0.5)',
     'random_resized_crop(ratio_min=2, ratio_max=0.5): ratio_min must be <= ratio_max, got 2 > '
     '0.5; e.g. random_resized_crop(ratio_min=0.5, ratio_max=2).'),
    ('random_resized_crop(ratio_max=-1)', 'random_resized_crop(ratio_max=-1): ratio_max must be '
     'an aspect ratio > 0, got -1; e.g. random_resized_crop(ratio_max=1.33).'),
    ("random_resized_crop(method='cubic')", f"random_resized_crop(method='cubic'): method must be "
     f"one of {_METHODS}, got 'cubic'; e.g. random_resized_crop(method='bilinear')."),
    ('resize(size=2.5)', 'resize(size=2.5): size must be a whole number of pixels >= 1, got 2.5; '
     'e.g. resize(size=224).'),
    ("resize(method='BILINEAR')", f"resize(method='BILINEAR'): method must be one of {_METHODS}, "
     "got 'BILINEAR'; e.g. resize(method='bilinear')."),
    ('center_crop(size=0)', 'center_crop(size=0): size must be a whole number of pixels >= 1, got '
     '0; e.g. center_crop(size=224).'),
    ('center_crop(crop_fraction=1.5)', f'center_crop(crop_fraction=1.5): crop_fraction must be '
     f'{_FRACTION}, got 1.5; e.g. center_crop(crop_fraction=0.875).'),
    ("center_crop(method='cubic')", f"center_crop(method='cubic'): method must be one of "
     f"{_METHODS}, got 'cubic'; e.g. center_crop(method='bilinear')."),
    ('random_erasing(prob=-0.1)', 'random_erasing(prob=-0.1): prob must be a probability from 0 '
     'to 1, got -0.1; e.g. random_erasing(prob=0.5).'),
    ('random_erasing(area_max=2)', f'random_erasing(area_max=2): area_max must be {_FRACTION}, '
     'got 2; e.g. random_erasing(area_max=1.0).'),
    ('random_erasing(ratio_min=5, ratio_max=2)', 'random_erasing(ratio_min=5, ratio_max=2): '
     'ratio_min must be <= ratio_max, got 5 > 2; e.g. random_erasing(ratio_min=2, ratio_max=5).'),
    ("random_erasing(value='blue')", f"random_erasing(value='blue'): value must be 'random' or "
     f"{_PIXELS}, got 'blue'; e.g. random_erasing(value='random')."),
    ('random_erasing(value=1.5)', f'random_erasing(value=1.5): value must be {_PIXELS}, got 1.5; '
     'e.g. random_erasing(value=0).'),
    ('random_erasing(attempts=2.0)', 'random_erasing(attempts=2.0): attempts must be a whole '
     'number >= 1, got 2.0; e.g. random_erasing(attempts=10).'),
    ('rotate(degrees=-5)', 'rotate(degrees=-5): degrees must be a number >= 0 or a pair (lo, hi) '
     'of numbers with lo <= hi, got -5; e.g. rotate(degrees=(-10, 10)).'),
    ('rotate(degrees=(1, 2, 3))', 'rotate(degrees=(1, 2, 3)): degrees must be a number >= 0 or a '
     'pair (lo, hi) of numbers with lo <= hi, got (1, 2, 3); e.g. rotate(degrees=(-10, 10)).'),
    ("rotate(degrees='ab')", "rotate(degrees='ab'): degrees must be a number >= 0 or a pair (lo, "
     "hi) of numbers with lo <= hi, got 'ab'; e.g. rotate(degrees=(-10, 10))."),
    ('rotate(fill=256)', f'rotate(fill=256): fill must be {_PIXELS}, got 256; '
     'e.g. rotate(fill=0).'),
    ("rotate(interpolation='cubic')", "rotate(interpolation='cubic'): interpolation must be one of "
     "nearest, bilinear, got 'cubic'; e.g. rotate(interpolation='bilinear')."),
    ('randaugment(magnitude=40)', 'randaugment(magnitude=40): magnitude must be a number from 0 '
     'to 30, got 40; e.g. randaugment(magnitude=9).'),
    ('randaugment(num_bins=11, magnitude=10.5)', 'randaugment(magnitude=10.5): magnitude must be '
     'a number from 0 to 10, got 10.5; e.g. randaugment(magnitude=9).'),
    ('randaugment(fill=-1)', f'randaugment(fill=-1): fill must be {_PIXELS}, got -1; '
     'e.g. randaugment(fill=128).'),
    ("randaugment(ops='rotate, blur')", f"randaugment(ops='rotate, blur'): ops must be "
     f"comma-separated names of randaugment's ops ({_RA_OPS}) or '' for all, got 'rotate, blur' "
     "(unknown: blur); e.g. randaugment(ops='rotate,solarize')."),
    ('randaugment(ops=3)', f"randaugment(ops=3): ops must be comma-separated names of "
     f"randaugment's ops ({_RA_OPS}) or '' for all, got 3 (unknown: 3); "
     "e.g. randaugment(ops='rotate,solarize')."),
    ('trivial_augment_wide(num_bins=1)', 'trivial_augment_wide(num_bins=1): num_bins must be a '
     'whole number >= 2, got 1; e.g. trivial_augment_wide(num_bins=31).'),
    ('trivial_augment_wide(fill=300)', f'trivial_augment_wide(fill=300): fill must be {_PIXELS}, '
     'got 300; e.g. trivial_augment_wide(fill=128).'),
    ("trivial_augment_wide(ops='blur')", f"trivial_augment_wide(ops='blur'): ops must be "
     f"comma-separated names of trivial_augment_wide's ops ({_TA_OPS}) or '' for all, got 'blur' "
     "(unknown: blur); e.g. trivial_augment_wide(ops='rotate,solarize')."),
])
def test_bad_op_arguments_are_one_sentence_when_parsed(spec, message):
  with pytest.raises(UserError, match=f'^{re.escape(message)}$'):
    pp.parse(f'flip_lr|{spec}')


@pytest.mark.parametrize('good, bad', [
    ('pad_crop(pad=0)', 'pad_crop(pad=-1)'),
    ('random_resized_crop(size=1, area_min=1.0, area_max=1.0)', 'random_resized_crop(size=1, '
     'area_min=1.0, area_max=1.01)'),
    ('random_resized_crop(ratio_min=1, ratio_max=1)', 'random_resized_crop(ratio_min=1.01, '
     'ratio_max=1)'),
    ("resize(size=1, method='nearest')", "resize(size=0, method='nearest')"),
    ('center_crop(size=5, crop_fraction=1)', 'center_crop(size=5, crop_fraction=1.01)'),
    ('random_erasing(prob=1, value=255, attempts=1, area_min=0.1, area_max=0.1)',
     'random_erasing(prob=1, value=256, attempts=1, area_min=0.1, area_max=0.1)'),
    ('random_erasing(prob=0, value=0)', 'random_erasing(prob=0, value=0, attempts=0)'),
    ('rotate(degrees=0, fill=255)', 'rotate(degrees=-0.5, fill=255)'),
    ('rotate(degrees=[5, 5])', 'rotate(degrees=[5, 4])'),
    ('randaugment(num_ops=0)', 'randaugment(num_ops=-1)'),
    ('randaugment(num_bins=2, magnitude=1, fill=0)', 'randaugment(num_bins=2, magnitude=1.5)'),
    ("trivial_augment_wide(num_bins=2, fill=255, ops='solarize')",
     "trivial_augment_wide(num_bins=2, fill=256, ops='solarize')"),
])
def test_the_argument_checks_stop_at_the_edge_of_what_works(good, bad):
  image = tf.constant(np.arange(12 * 14 * 3, dtype=np.uint8).reshape(12, 14, 3))
  out = pp.compose(good)(image, tf.constant([1, 2], tf.int64)).numpy()
  assert out.dtype == np.uint8 and out.shape[-1] == 3
  name = bad.partition('(')[0]
  with pytest.raises(UserError, match=rf'^{name}\(\w+=[^)]*\): \w+ must be '):
    pp.parse(bad)


def test_a_value_error_from_an_op_factory_is_one_sentence(monkeypatch):
  from imgcls_jax.data.pp import registry

  def factory(width=1):
    raise ValueError(f'width {width} is too wide.')
  monkeypatch.setitem(registry._OPS, 'strict_op', factory)
  with pytest.raises(UserError, match=re.escape(
      "Bad arguments for preprocessing op 'strict_op(width=9)': width 9 is too wide.") + '$'):
    pp.parse('flip_lr|strict_op(width=9)')
