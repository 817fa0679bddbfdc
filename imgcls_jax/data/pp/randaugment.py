"""RandAugment (Cubuk et al. 2020) and TrivialAugment-Wide (Mueller & Hutter 2021), with
torchvision's magnitude scales.

Each op of ``RANDAUGMENT_OPS`` / ``TRIVIAL_AUGMENT_WIDE_OPS`` maps (image float32 HxWxC in
[0, 255], signed magnitude fraction m in [-1, 1], fill) -> image; the fraction is
bin / (num_bins - 1), negated with probability 1/2 for signed ops. The registered op
``randaugment`` applies ``num_ops`` ops drawn uniformly at one fixed magnitude;
``trivial_augment_wide`` applies one op drawn uniformly at a magnitude bin drawn uniformly.
"""
from __future__ import annotations

from typing import Callable


from imgcls_jax.data.tf_import import tf
from imgcls_jax.data.pp.ops_image import rotate_image
from imgcls_jax.data.pp.registry import (PIXEL, Op, bad_args, check_number, image_hw, register,
                                         split_seed, uniform)


def _grey(image: tf.Tensor) -> tf.Tensor:
  """Luma HxWx1 (ITU-R 601-2, as PIL) of an RGB image; a grey image itself."""
  if image.shape[-1] == 3:
    return tf.image.rgb_to_grayscale(image)
  return tf.reduce_mean(image, axis=-1, keepdims=True)


def _blend(degenerate: tf.Tensor, image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """PIL ImageEnhance: ``degenerate + factor * (image - degenerate)``, clipped to [0, 255]."""
  return tf.clip_by_value(degenerate + factor * (image - degenerate), 0.0, 255.0)


def _affine(image: tf.Tensor, transform: tf.Tensor, fill: float) -> tf.Tensor:
  """Output pixel (x, y) samples input (a0 x + a1 y + a2, b0 x + b1 y + b2) (nearest, ``fill``)."""
  h, w = image_hw(image)
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=tf.reshape(tf.cast(transform, tf.float32), [1, 8]),
      output_shape=tf.stack([h, w]), fill_value=tf.constant(fill, tf.float32),
      interpolation='NEAREST', fill_mode='CONSTANT')
  return tf.ensure_shape(out[0], image.shape)


def _ra_rotate(image, m, fill):
  return rotate_image(image, m * 30.0, fill, 'nearest')


def _ra_shear_x(image, m, fill):
  return _affine(image, tf.stack([1.0, 0.3 * m, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]), fill)


def _ra_shear_y(image, m, fill):
  return _affine(image, tf.stack([1.0, 0.0, 0.0, 0.3 * m, 1.0, 0.0, 0.0, 0.0]), fill)


def _ra_translate_x(image, m, fill):
  shift = m * (150.0 / 331.0) * tf.cast(image_hw(image)[1], tf.float32)
  return _affine(image, tf.stack([1.0, 0.0, shift, 0.0, 1.0, 0.0, 0.0, 0.0]), fill)


def _ra_translate_y(image, m, fill):
  shift = m * (150.0 / 331.0) * tf.cast(image_hw(image)[0], tf.float32)
  return _affine(image, tf.stack([1.0, 0.0, 0.0, 0.0, 1.0, shift, 0.0, 0.0]), fill)


def _ra_brightness(image, m, fill):
  return _blend(tf.zeros_like(image), image, 1.0 + 0.9 * m)


def _ra_color(image, m, fill):
  return _blend(tf.broadcast_to(_grey(image), tf.shape(image)), image, 1.0 + 0.9 * m)


def _ra_contrast(image, m, fill):
  mean = tf.reduce_mean(_grey(image))
  return _blend(tf.fill(tf.shape(image), mean), image, 1.0 + 0.9 * m)


def _ra_sharpness(image, m, fill):
  """PIL's SMOOTH filter (centre weight 5 of 13) inside, the border kept, blended by factor."""
  kernel = tf.constant([[1., 1., 1.], [1., 5., 1.], [1., 1., 1.]]) / 13.0
  c = image.shape[-1]
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, c, 1])
  smooth = tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], 'VALID')[0]
  smooth = tf.clip_by_value(tf.round(smooth), 0.0, 255.0)
  degenerate = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
  h, w = image_hw(image)
  inside = tf.pad(tf.ones([h - 2, w - 2, 1]), [[1, 1], [1, 1], [0, 0]])
  degenerate = inside * degenerate + (1.0 - inside) * image
  return _blend(degenerate, image, 1.0 + 0.9 * m)


def _ra_posterize(image, m, fill):
  bits = 8 - tf.cast(tf.round(4.0 * tf.abs(m)), tf.int32)
  shift = tf.cast(8 - bits, tf.uint8)
  as_int = tf.cast(image, tf.uint8)
  return tf.cast(tf.bitwise.left_shift(tf.bitwise.right_shift(as_int, shift), shift), tf.float32)


def _ra_solarize(image, m, fill):
  threshold = 255.0 * (1.0 - tf.abs(m))
  return tf.where(image >= threshold, 255.0 - image, image)


def _ra_auto_contrast(image, m, fill):
  lo = tf.reduce_min(image, axis=[0, 1], keepdims=True)
  hi = tf.reduce_max(image, axis=[0, 1], keepdims=True)
  scale = tf.where(hi > lo, 255.0 / tf.maximum(hi - lo, 1e-6), 1.0)
  return tf.where(hi > lo, (image - lo) * scale, image)


def _equalize_channel(channel: tf.Tensor) -> tf.Tensor:
  """PIL ImageOps.equalize on one HxW channel of integer values 0..255."""
  histo = tf.histogram_fixed_width(channel, [0, 255], nbins=256)
  nonzero = tf.gather(histo, tf.where(histo > 0)[:, 0])
  step = (tf.reduce_sum(nonzero) - nonzero[-1]) // 255

  def lut():
    table = (tf.cumsum(histo) + step // 2) // tf.maximum(step, 1)
    table = tf.clip_by_value(tf.concat([[0], table[:-1]], 0), 0, 255)
    return tf.gather(table, channel)
  return tf.cond(step > 0, lut, lambda: channel)


def _ra_equalize(image, m, fill):
  as_int = tf.cast(image, tf.int32)
  channels = [_equalize_channel(as_int[:, :, i]) for i in range(image.shape[-1])]
  return tf.cast(tf.stack(channels, axis=-1), tf.float32)


def _ra_identity(image, m, fill):
  return image


# name -> (op, signed: the magnitude's sign is random)
RANDAUGMENT_OPS: dict[str, tuple[Callable[..., tf.Tensor], bool]] = {
    'identity': (_ra_identity, False),
    'auto_contrast': (_ra_auto_contrast, False),
    'equalize': (_ra_equalize, False),
    'rotate': (_ra_rotate, True),
    'solarize': (_ra_solarize, False),
    'color': (_ra_color, True),
    'posterize': (_ra_posterize, False),
    'contrast': (_ra_contrast, True),
    'brightness': (_ra_brightness, True),
    'sharpness': (_ra_sharpness, True),
    'shear_x': (_ra_shear_x, True),
    'shear_y': (_ra_shear_y, True),
    'translate_x': (_ra_translate_x, True),
    'translate_y': (_ra_translate_y, True),
}


def _check_common(op: str, num_bins: int, fill: int, ops: str,
                  table: dict[str, tuple[Callable[..., tf.Tensor], bool]]) -> list[str]:
  """Checks the arguments RandAugment and TrivialAugment-Wide share; returns the op names."""
  check_number(op, 'num_bins', num_bins, '31', lo=2, whole=True)
  check_number(op, 'fill', fill, '128', lo=0, hi=255, whole=True, what=PIXEL)
  names_ = [n.strip() for n in ops.split(',') if n.strip()] if isinstance(ops, str) else None
  unknown = [n for n in names_ if n not in table] if names_ is not None else [ops]
  if unknown:
    raise bad_args(op, {'ops': ops}, f"ops must be comma-separated names of {op}'s ops "
                   f"({', '.join(table)}) or '' for all, got {ops!r} (unknown: "
                   f"{', '.join(map(str, unknown))})", "ops='rotate,solarize'")
  return names_ or list(table)


@register('randaugment')
def randaugment(num_ops: int = 2, magnitude: float = 9, num_bins: int = 31, fill: int = 128,
                ops: str = '') -> Op:
  """RandAugment(N=num_ops, M=magnitude): ``num_ops`` ops drawn uniformly, each at ``magnitude``.

  ``magnitude`` is on torchvision's scale 0..``num_bins - 1`` (rotate up to 30 degrees, shear 0.3,
  translate 45% of the size, enhance factors 1 +- 0.9, posterize to 4 bits, solarize at 0);
  ``fill`` fills pixels moved in from outside; ``ops`` (comma-separated names) restricts the set.
  """
  check_number('randaugment', 'num_ops', num_ops, '2', lo=0, whole=True,
               note='(0 applies none)')
  names_ = _check_common('randaugment', num_bins, fill, ops, RANDAUGMENT_OPS)
  check_number('randaugment', 'magnitude', magnitude, '9', lo=0, hi=num_bins - 1)
  table = [RANDAUGMENT_OPS[n] for n in names_]
  fraction = float(magnitude) / float(num_bins - 1)

  def op(image, seed):
    dtype = image.dtype
    x = tf.cast(image, tf.float32)
    for s in tf.unstack(split_seed(seed, num_ops)):
      pick_seed, sign_seed = tf.unstack(split_seed(s, 2))
      index = tf.random.stateless_uniform([], pick_seed, 0, len(table), dtype=tf.int32)
      negate = uniform(sign_seed) < 0.5

      def branch(fn=None, signed=False):
        m = tf.where(negate, -fraction, fraction) if signed else tf.constant(fraction)
        return lambda: fn(x, m, float(fill))
      x = tf.switch_case(index, [branch(fn, signed) for fn, signed in table])
      x = tf.ensure_shape(x, image.shape)
    return tf.cast(tf.clip_by_value(tf.round(x), 0, 255), dtype)
  return op


def _scaled(fn: Callable[..., tf.Tensor], factor: float) -> Callable[..., tf.Tensor]:
  """``fn`` with its magnitude fraction multiplied by ``factor`` (a wider range)."""
  return lambda image, m, fill: fn(image, m * factor, fill)


def _ta_translate_x(image, m, fill):
  return _affine(image, tf.stack([1.0, 0.0, 32.0 * m, 0.0, 1.0, 0.0, 0.0, 0.0]), fill)


def _ta_translate_y(image, m, fill):
  return _affine(image, tf.stack([1.0, 0.0, 0.0, 0.0, 1.0, 32.0 * m, 0.0, 0.0]), fill)


# torchvision's TrivialAugmentWide ranges: shear 0.99, translate 32 px, rotate 135 degrees,
# enhance factors 1 +- 0.99, posterize 8 -> 2 bits, solarize 255 -> 0. name -> (op, signed).
TRIVIAL_AUGMENT_WIDE_OPS: dict[str, tuple[Callable[..., tf.Tensor], bool]] = {
    'identity': (_ra_identity, False),
    'shear_x': (_scaled(_ra_shear_x, 0.99 / 0.3), True),
    'shear_y': (_scaled(_ra_shear_y, 0.99 / 0.3), True),
    'translate_x': (_ta_translate_x, True),
    'translate_y': (_ta_translate_y, True),
    'rotate': (_scaled(_ra_rotate, 135.0 / 30.0), True),
    'brightness': (_scaled(_ra_brightness, 0.99 / 0.9), True),
    'color': (_scaled(_ra_color, 0.99 / 0.9), True),
    'contrast': (_scaled(_ra_contrast, 0.99 / 0.9), True),
    'sharpness': (_scaled(_ra_sharpness, 0.99 / 0.9), True),
    'posterize': (_scaled(_ra_posterize, 1.5), False),   # 8 - round(6 m) bits
    'solarize': (_ra_solarize, False),
    'auto_contrast': (_ra_auto_contrast, False),
    'equalize': (_ra_equalize, False),
}


@register('trivial_augment_wide')
def trivial_augment_wide(num_bins: int = 31, fill: int = 0, ops: str = '') -> Op:
  """TrivialAugment-Wide: one op drawn uniformly from ``TRIVIAL_AUGMENT_WIDE_OPS`` at a magnitude
  bin drawn uniformly from 0..``num_bins - 1`` (sign random for signed ops), as torchvision's
  ``TrivialAugmentWide``; ``fill`` fills pixels moved in from outside; ``ops`` (comma-separated
  names) restricts the set."""
  names_ = _check_common('trivial_augment_wide', num_bins, fill, ops, TRIVIAL_AUGMENT_WIDE_OPS)
  table = [TRIVIAL_AUGMENT_WIDE_OPS[n] for n in names_]

  def op(image, seed):
    pick_seed, bin_seed, sign_seed = tf.unstack(split_seed(seed, 3))
    index = tf.random.stateless_uniform([], pick_seed, 0, len(table), dtype=tf.int32)
    level = tf.random.stateless_uniform([], bin_seed, 0, num_bins, dtype=tf.int32)
    m = tf.cast(level, tf.float32) / float(num_bins - 1)
    signed_m = tf.where(uniform(sign_seed) < 0.5, -m, m)
    x = tf.cast(image, tf.float32)

    def branch(fn, signed):
      return lambda: fn(x, signed_m if signed else m, float(fill))
    x = tf.switch_case(index, [branch(fn, signed) for fn, signed in table])
    x = tf.ensure_shape(x, image.shape)
    return tf.cast(tf.clip_by_value(tf.round(x), 0, 255), image.dtype)
  return op
