"""Preprocessing ops: every op eagerly and inside tf.data, seed determinism, PIL-equivalence of the
RandAugment ops, rotation against PIL and scipy, TrivialAugment-Wide's ranges, random erasing
geometry, and spec parsing errors."""
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageOps

from imgcls_jax.data import pp
from imgcls_jax.errors import UserError

# One spec per registered op, with arguments that make it do visible work.
SPECS = {
    'pad_crop': 'pad_crop(pad=4)',
    'flip_lr': 'flip_lr',
    'random_resized_crop': 'random_resized_crop(size=20, area_min=0.3)',
    'resize': 'resize(size=20)',
    'center_crop': 'center_crop(size=20)',
    'randaugment': 'randaugment(num_ops=2, magnitude=15)',
    'random_erasing': 'random_erasing(prob=1.0)',
    'rotate': 'rotate(degrees=30)',
    'trivial_augment_wide': 'trivial_augment_wide',
}
RANDOM = {'pad_crop', 'flip_lr', 'random_resized_crop', 'randaugment', 'random_erasing', 'rotate',
          'trivial_augment_wide'}


def _image(h=28, w=32, c=3, seed=0):
  """A smooth image with texture (so crops, flips and enhancements all change it)."""
  rng = np.random.RandomState(seed)
  yy, xx = np.mgrid[0:h, 0:w]
  base = 128 + 60 * np.sin(xx / 3.0 + yy / 5.0)[..., None] + rng.randint(-40, 40, (h, w, c))
  return np.clip(base, 0, 255).astype(np.uint8)


def test_every_registered_op_is_covered():
  assert set(SPECS) == set(pp.names())


@pytest.mark.parametrize('name', sorted(SPECS))
@pytest.mark.parametrize('channels', [1, 3])
def test_op_is_seed_deterministic_eagerly_and_in_tf_data(name, channels):
  op = pp.compose(SPECS[name])
  image = tf.constant(_image(c=channels))
  seeds = [tf.constant([7, k], tf.int64) for k in range(8)]
  eager = [op(image, s).numpy() for s in seeds]
  again = [op(image, s).numpy() for s in seeds]
  for a, b in zip(eager, again):
    np.testing.assert_array_equal(a, b)
  ds = tf.data.Dataset.from_tensor_slices(tf.stack(seeds)).map(
      lambda s: op(image, s), num_parallel_calls=4, deterministic=True)
  for a, b in zip(eager, ds.as_numpy_iterator()):
    np.testing.assert_array_equal(a, b)
  out = eager[0]
  assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[-1] == channels
  if name in RANDOM:  # different seeds give different outputs
    assert len({e.tobytes() for e in eager}) > 1
  if name not in ('resize', 'center_crop', 'random_resized_crop'):
    assert out.shape == image.shape


@pytest.mark.parametrize('name', sorted(SPECS))
def test_op_keeps_a_static_shape_in_graphs(name):
  op = pp.compose(SPECS[name])
  fn = tf.function(lambda x: op(x, tf.constant([1, 2], tf.int64)),
                   input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)])
  shape = fn.get_concrete_function().structured_outputs.shape
  assert shape[-1] == 3
  if name in ('resize', 'center_crop', 'random_resized_crop'):
    assert shape.as_list() == [20, 20, 3]


def test_pad_crop_is_a_shift_with_zero_fill():
  image = _image(c=1)
  for k in range(6):
    out = pp.compose('pad_crop(pad=3)')(tf.constant(image), tf.constant([0, k])).numpy()
    padded = np.pad(image, ((3, 3), (3, 3), (0, 0)))
    hits = [(dy, dx) for dy in range(7) for dx in range(7)
            if np.array_equal(padded[dy:dy + 28, dx:dx + 32], out)]
    assert hits


def test_flip_is_mirror_or_identity():
  image = _image()
  outs = [pp.compose('flip_lr')(tf.constant(image), tf.constant([0, k])).numpy() for k in range(16)]
  assert all(np.array_equal(o, image) or np.array_equal(o, image[:, ::-1]) for o in outs)
  assert any(np.array_equal(o, image[:, ::-1]) for o in outs)
  assert any(np.array_equal(o, image) for o in outs)


# ---- RandAugment: each op against PIL (the reference its definition comes from) ----

def _ra(name, image, m, fill=128.0):
  fn, _ = pp.RANDAUGMENT_OPS[name]
  out = fn(tf.constant(image, tf.float32), tf.constant(m, tf.float32), fill)
  return np.clip(np.round(out.numpy()), 0, 255).astype(np.int32)


def _pil(image):
  return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def _arr(pil_image, channels):
  a = np.asarray(pil_image).astype(np.int32)
  return a[..., None] if channels == 1 else a


@pytest.mark.parametrize('channels', [1, 3])
def test_randaugment_pointwise_ops_match_pil(channels):
  image = _image(c=channels, seed=3)
  pil = _pil(image)
  np.testing.assert_array_equal(_ra('equalize', image, 0.0), _arr(ImageOps.equalize(pil), channels))
  np.testing.assert_array_equal(_ra('posterize', image, 0.5),   # 8 - round(4 * 0.5) = 6 bits
                                _arr(ImageOps.posterize(pil, 6), channels))
  np.testing.assert_array_equal(_ra('solarize', image, 0.25),   # threshold 255 * 0.75
                                _arr(ImageOps.solarize(pil, 191.25), channels))
  auto = _ra('auto_contrast', image, 0.0)
  assert np.abs(auto - _arr(ImageOps.autocontrast(pil), channels)).max() <= 1
  assert auto.min() == 0 and auto.max() == 255
  np.testing.assert_array_equal(_ra('identity', image, 0.7), image.astype(np.int32))


@pytest.mark.parametrize('channels', [1, 3])
@pytest.mark.parametrize('m', [-0.8, 0.5])
def test_randaugment_enhance_ops_match_pil(channels, m):
  image = _image(c=channels, seed=4)
  pil = _pil(image)
  factor = 1.0 + 0.9 * m
  for name, enhancer, tol in [('brightness', ImageEnhance.Brightness, 1),
                              ('color', ImageEnhance.Color, 2),
                              ('contrast', ImageEnhance.Contrast, 2),
                              ('sharpness', ImageEnhance.Sharpness, 1)]:
    ours = _ra(name, image, m)
    ref = _arr(enhancer(pil).enhance(factor), channels)
    assert np.abs(ours - ref).max() <= tol, name


def test_randaugment_geometry():
  image = _image(h=15, w=15, c=1, seed=5)
  # 3 x 30 degrees about the centre is an exact quarter turn (counter-clockwise).
  np.testing.assert_array_equal(_ra('rotate', image, 3.0), np.rot90(image, 1).astype(np.int32))
  np.testing.assert_array_equal(_ra('rotate', image, 0.0), image.astype(np.int32))
  # Translations move content by m * 150/331 of the size and fill the rest.
  shift = 331 / 150 * 4 / 15            # m for exactly 4 pixels on a 15-pixel image
  moved = _ra('translate_x', image, shift, fill=7.0)
  np.testing.assert_array_equal(moved[:, :11], image[:, 4:].astype(np.int32))
  assert (moved[:, 11:] == 7).all()
  moved = _ra('translate_y', image, -shift, fill=7.0)
  np.testing.assert_array_equal(moved[4:], image[:11].astype(np.int32))
  assert (moved[:4] == 7).all()
  sheared = _ra('shear_x', image, 1 / 0.3)  # output (x, y) samples input (x + y, y)
  for y in range(15):
    np.testing.assert_array_equal(sheared[y, :15 - y], image[y, y:].astype(np.int32))


def test_randaugment_with_one_op_applies_exactly_that_op():
  image = tf.constant(_image(seed=6))
  out = pp.compose("randaugment(num_ops=1, magnitude=30, ops='solarize')")(image, tf.constant([1, 1]))
  np.testing.assert_array_equal(out.numpy(), 255 - _image(seed=6))  # threshold 0: all inverted
  out = pp.compose("randaugment(num_ops=3, magnitude=9, ops='identity')")(image, tf.constant([1, 1]))
  np.testing.assert_array_equal(out.numpy(), _image(seed=6))


def test_randaugment_uses_every_op():
  image = tf.constant(_image(seed=7))
  outs = set()
  op = pp.compose('randaugment(num_ops=1, magnitude=20)')
  for k in range(120):
    outs.add(op(image, tf.constant([3, k])).numpy().tobytes())
  # 14 ops, 9 of them signed: well over 14 distinct results, identity among them.
  assert len(outs) >= 14
  assert _image(seed=7).tobytes() in outs


def test_randaugment_bad_arguments_are_user_errors():
  with pytest.raises(UserError, match='randaugment'):
    pp.parse('randaugment(magnitude=40)')
  with pytest.raises(UserError, match=r"randaugment\(ops='blur'\): .*\(unknown: blur\)"):
    pp.parse("randaugment(ops='blur')")


# ---- random erasing ----

def test_random_erasing_erases_one_rectangle_of_bounded_area():
  image = np.full((40, 30, 3), 255, np.uint8)
  op = pp.compose('random_erasing(prob=1.0, value=0)')
  areas = []
  for k in range(40):
    out = op(tf.constant(image), tf.constant([5, k])).numpy()
    erased = np.argwhere((out == 0).all(-1))
    assert len(erased)
    (y0, x0), (y1, x1) = erased.min(0), erased.max(0)
    assert (out[y0:y1 + 1, x0:x1 + 1] == 0).all()  # a filled rectangle ...
    assert (out == 0).all(-1).sum() == (y1 - y0 + 1) * (x1 - x0 + 1)  # ... and nothing else
    areas.append(len(erased) / (40 * 30))
  assert 0.01 < min(areas) and max(areas) < 0.40
  assert len(set(areas)) > 10


def test_random_erasing_probability_and_noise_fill():
  image = np.full((32, 32, 1), 200, np.uint8)
  never = pp.compose('random_erasing(prob=0.0)')
  assert all(np.array_equal(never(tf.constant(image), tf.constant([0, k])).numpy(), image)
             for k in range(10))
  noisy = pp.compose('random_erasing(prob=1.0)')(tf.constant(image), tf.constant([0, 1])).numpy()
  changed = noisy != image
  assert changed.sum() > 10 and len(np.unique(noisy[changed])) > 10


def test_random_erasing_rate_follows_prob():
  image = tf.constant(np.full((16, 16, 1), 9, np.uint8))
  op = pp.compose('random_erasing(prob=0.5, value=0)')
  hits = sum(bool((op(image, tf.constant([2, k])).numpy() == 0).any()) for k in range(200))
  assert 70 < hits < 130


# ---- spec parsing ----

def test_compose_chains_ops_with_independent_seeds():
  image = tf.constant(_image())
  both = pp.compose('pad_crop(pad=2)|flip_lr')
  a = both(image, tf.constant([1, 2])).numpy()
  np.testing.assert_array_equal(a, both(image, tf.constant([1, 2])).numpy())
  assert pp.compose('')(image, tf.constant([0, 0])) is image


@pytest.mark.parametrize('spec, match', [
    ('flip_lr|no_such_op', "Unknown preprocessing op 'no_such_op'"),
    ('pad_crop(pad=4', 'Cannot parse'),
    ('pad_crop(padding=4)', "Bad arguments for preprocessing op 'pad_crop"),
    ("random_erasing(value='blue')", "value must be 'random' or a pixel value"),
])
def test_bad_specs_are_user_errors(spec, match):
  with pytest.raises(UserError, match=match):
    pp.parse(spec)


# ---- decoding fused with the first op (uncached training streams) ----

def test_random_resized_crop_fuses_with_decoding_to_the_same_crop():
  image = _image(h=75, w=100, seed=8)
  spec = 'random_resized_crop(size=24, area_min=0.2)|flip_lr'
  assert pp.fuses_with_decoding(spec) and not pp.fuses_with_decoding('flip_lr|resize(size=9)')
  fused, plain = pp.compose(spec, decode_channels=3), pp.compose(spec)
  for encoded, exact in [(tf.io.encode_png(image), True), (tf.io.encode_jpeg(image, quality=95), False)]:
    decoded = pp.decode_image(encoded, 3)
    for k in range(6):
      a = fused(encoded, tf.constant([4, k])).numpy()
      b = plain(decoded, tf.constant([4, k])).numpy()
      assert a.shape == (24, 24, 3)
      if exact:
        np.testing.assert_array_equal(a, b)
      else:  # the same window; JPEG's block-aligned crop decoding differs at the window's edge
        assert np.abs(a.astype(int) - b).mean() < 1.5
  grey = pp.compose('flip_lr', decode_channels=1)(tf.io.encode_png(image[..., :1]), tf.constant([0, 0]))
  assert grey.shape[-1] == 1


# ---- rotation: against PIL's Image.rotate and scipy.ndimage.rotate ----

def _inside(shape_hw, degrees):
  """Output pixels at least 2 pixels away from any that samples outside the image (where the
  libraries' edge handling differs): PIL's nearest rotation of a white image, eroded."""
  import scipy.ndimage
  white = Image.fromarray(np.full(shape_hw, 255, np.uint8))
  inside = np.asarray(white.rotate(degrees, resample=Image.NEAREST)) == 255
  return scipy.ndimage.binary_erosion(inside, iterations=2)


@pytest.mark.parametrize('degrees', [17.0, -40.0, 123.4])
@pytest.mark.parametrize('hw', [(23, 30), (16, 16)])
def test_rotate_image_matches_pil_and_scipy(degrees, hw):
  import scipy.ndimage
  image = _image(h=hw[0], w=hw[1], seed=9)
  nearest = pp.rotate_image(tf.constant(image), degrees, 7.0, 'nearest').numpy()
  pil = np.asarray(Image.fromarray(image).rotate(degrees, resample=Image.NEAREST,
                                                 fillcolor=(7, 7, 7)))
  # Same sampling points as PIL; only a source point exactly between two pixels (a tie) may
  # round the other way.
  assert (nearest != pil).any(-1).mean() <= 0.01
  assert (nearest == 7).all(-1).mean() > 0.05  # corners came from outside: filled
  bilinear = pp.rotate_image(tf.constant(image), degrees, 0.0, 'bilinear').numpy()
  ref = scipy.ndimage.rotate(image.astype(np.float64), degrees, axes=(1, 0), reshape=False,
                             order=1, mode='constant', cval=0.0)
  inside = _inside(hw, degrees)
  assert inside.mean() > 0.3
  # float32 against float64 bilinear weights on values <= 255.
  np.testing.assert_allclose(bilinear[inside], ref[inside], atol=1e-3)


def test_rotate_op_draws_angles_in_range_and_fixed_angle_equals_pil():
  image = _image(h=21, w=21, seed=10)
  fixed = pp.compose('rotate(degrees=(25, 25), fill=3)')(tf.constant(image), tf.constant([0, 1]))
  pil = Image.fromarray(image).rotate(25, resample=Image.NEAREST, fillcolor=(3, 3, 3))
  assert (fixed.numpy() != np.asarray(pil)).any(-1).mean() <= 0.01
  # Random angles in [-10, 10]: each output is the rotation by one of them (searched on a grid).
  op = pp.compose('rotate(degrees=10)')
  grid = np.arange(-10.0, 10.01, 0.05)
  rotations = np.stack([pp.rotate_image(tf.constant(image), a).numpy() for a in grid])
  found = []
  for k in range(6):
    out = op(tf.constant(image), tf.constant([2, k])).numpy()
    err = np.abs(rotations - out).reshape(len(grid), -1).mean(1)
    assert err.min() < 3.0, err.min()  # a neighbour on the 0.05-degree grid
    found.append(grid[err.argmin()])
  assert len(set(found)) > 3 and max(found) - min(found) > 5


def test_bad_rotate_arguments_are_user_errors():
  with pytest.raises(UserError, match='degrees must be'):
    pp.parse('rotate(degrees=(10, -10))')
  with pytest.raises(UserError, match='interpolation must be one of nearest, bilinear'):
    pp.parse("rotate(interpolation='cubic')")


# ---- TrivialAugment-Wide: torchvision's wide ranges, one op per image ----

def test_trivial_augment_wide_solarize_uses_all_31_thresholds():
  image = np.arange(256, dtype=np.uint8).reshape(16, 16, 1)
  op = pp.compose("trivial_augment_wide(ops='solarize')")
  thresholds = set()
  for k in range(150):
    out = op(tf.constant(image), tf.constant([4, k])).numpy()
    # PIL solarize(threshold) inverts every value >= threshold; find the threshold used.
    matches = [t for t in np.linspace(255.0, 0.0, 31)
               if np.array_equal(out, np.asarray(ImageOps.solarize(Image.fromarray(image[..., 0]),
                                                                   t))[..., None])]
    assert matches, k
    thresholds.add(float(matches[0]))
  assert len(thresholds) >= 26  # 150 draws of 31 bins: each bin missed with p ~ 0.007


def test_trivial_augment_wide_rotates_up_to_135_degrees_both_ways():
  image = _image(h=15, w=15, c=1, seed=11)
  op = pp.compose("trivial_augment_wide(ops='rotate', fill=5)")
  candidates = {a: pp.rotate_image(tf.constant(image), a, 5.0).numpy().astype(np.uint8)
                for a in np.linspace(-135.0, 135.0, 61)}
  seen = set()
  for k in range(60):
    out = op(tf.constant(image), tf.constant([6, k])).numpy()
    hits = [a for a, c in candidates.items() if np.array_equal(c, out)]
    assert hits, k  # always a multiple of 135 / 30 degrees
    seen.update(hits)
  assert min(seen) <= -90 and max(seen) >= 90


def test_trivial_augment_wide_posterize_reaches_2_bits():
  image = _image(seed=12)
  op = pp.compose("trivial_augment_wide(ops='posterize')")
  bits = set()
  for k in range(80):
    out = op(tf.constant(image), tf.constant([8, k])).numpy()
    bits.add(next(b for b in range(8, 0, -1)
                  if np.array_equal(out, np.asarray(ImageOps.posterize(Image.fromarray(image), b)))))
  assert bits == {2, 3, 4, 5, 6, 7, 8}


def test_trivial_augment_wide_applies_one_op_and_uses_them_all():
  image = tf.constant(_image(seed=13))
  op = pp.compose('trivial_augment_wide')
  outs = {op(image, tf.constant([9, k])).numpy().tobytes() for k in range(100)}
  assert len(outs) >= 40
  assert _image(seed=13).tobytes() in outs  # identity (or magnitude 0) among them
  with pytest.raises(UserError, match=r"trivial_augment_wide\(ops='blur'\): .*\(unknown: blur\)"):
    pp.parse("trivial_augment_wide(ops='blur')")


def test_the_random_ops_are_the_seed_dependent_ones():
  """This file's RANDOM is exactly the ops whose output changes with the seed (``seed_dependent``,
  which the trainer's exact-resume and the eval warning use): a new random op left out of RANDOM
  would silently skip the different-seeds check above."""
  from imgcls_jax.data.pp import registry
  assert {n for n in SPECS if registry.seed_dependent(SPECS[n], 3)} == RANDOM


def test_a_random_op_in_eval_preprocess_is_warned_about(caplog):
  """Evaluation, predict and serve run eval_preprocess at one fixed seed: a random op there is a
  fixed distortion, so the check before training says so (and nothing for deterministic ops)."""
  import logging

  import ml_collections

  from imgcls_jax.data import reader
  from imgcls_jax.data.info import DatasetInfo
  info = DatasetInfo(name='fashion_mnist', num_classes=2, class_names=('a', 'b'),
                     image_shape=(28, 28, 1), num_examples={'train': 10, 'test': 10})
  for spec, warned in (('resize(size=20)', False), ('rotate(degrees=30)|resize(size=20)', True),
                       # each op probed on what the ops before it make (a 45-pixel mirror pad
                       # of a 28x28 image is refused; of the 96x96 the resize makes, not)
                       ("resize(size=96)|rotate(degrees=30)|pad_crop(pad=45, mode='reflect')",
                        True)):
    data = ml_collections.ConfigDict({'name': 'fashion_mnist', 'train_preprocess': '',
                                      'eval_preprocess': spec})
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      reader.check_preprocess(data, info)
    said = [r.getMessage() for r in caplog.records if 'eval_preprocess has random ops' in
            r.getMessage()]
    ops = 'rotate, pad_crop' if 'pad_crop' in spec else 'rotate'
    assert said == ([f"config.data.eval_preprocess has random ops ({ops}): evaluation, predict "
                     "and serve apply them at one fixed seed, the same distortion for every run "
                     "of an image; move them to config.data.train_preprocess."] if warned else [])
