"""Geometric and erasing ops: pad_crop, flip_lr, rotate, random_resized_crop, resize, center_crop,
random_erasing. Each maps ``(image_HxWxC uint8, seed) -> image uint8`` (see registry.py)."""
from __future__ import annotations

import math
from typing import Any


from imgcls_jax.data.tf_import import tf
from imgcls_jax.data.pp.registry import (PIXEL, Op, bad_args, check_choice, check_number,
                                         check_order, decode_image, image_hw, is_number, register,
                                         split_seed, to_uint8, uniform)
from imgcls_jax.errors import UserError


PAD_MODES = ('constant', 'reflect', 'symmetric')   # tf.pad's modes
RESIZE_METHODS = ('bilinear', 'nearest', 'bicubic', 'area', 'lanczos3', 'lanczos5', 'gaussian',
                  'mitchellcubic')   # tf.image.resize's methods


def _check_size(op: str, size: Any, method: str) -> None:
  """The output side length and resize method of ``op``."""
  check_number(op, 'size', size, '224', lo=1, whole=True, what='a whole number of pixels')
  check_choice(op, 'method', method, RESIZE_METHODS, 'bilinear')


def _check_area_ratio(op: str, area_min: Any, area_max: Any, ratio_min: Any,
                      ratio_max: Any) -> None:
  """Area fractions in (0, 1] and aspect ratios > 0, each pair in order."""
  for name, value, example in (('area_min', area_min, '0.08'), ('area_max', area_max, '1.0')):
    check_number(op, name, value, example, lo=0, lo_open=True, hi=1, what='a fraction')
  check_order(op, 'area_min', area_min, 'area_max', area_max)
  for name, value, example in (('ratio_min', ratio_min, '0.75'), ('ratio_max', ratio_max, '1.33')):
    check_number(op, name, value, example, lo=0, lo_open=True, what='an aspect ratio')
  check_order(op, 'ratio_min', ratio_min, 'ratio_max', ratio_max)


@register('pad_crop')
def pad_crop(pad: int = 4, mode: str = 'constant') -> Op:
  """Zero- (or reflect-) pad by ``pad`` pixels on each side, then randomly crop back to H x W."""
  check_number('pad_crop', 'pad', pad, '4', lo=0, whole=True, what='a whole number of pixels')
  check_choice('pad_crop', 'mode', mode, PAD_MODES, 'reflect', any_case=True)

  def op(image, seed):
    _check_mirror_pad(image.shape, pad, mode)
    h, w = image_hw(image)
    padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]], mode=mode.upper())
    return tf.image.stateless_random_crop(padded, tf.stack([h, w, tf.shape(image)[2]]), seed=seed)
  return op


def _check_mirror_pad(shape: tf.TensorShape, pad: int, mode: str) -> None:
  """Raises a UserError when tf.pad cannot mirror ``pad`` pixels of images whose height or width
  is known when the pipeline is built ('reflect' mirrors at most size - 1, 'symmetric' size)."""
  limit = {'reflect': -1, 'symmetric': 0}.get(mode.lower())
  if shape.rank is None:
    return
  sizes = [int(d) for d in shape[:2] if d is not None]
  if limit is None or not sizes or pad <= min(sizes) + limit:
    return
  hw = 'x'.join('?' if d is None else str(int(d)) for d in shape[:2])
  most = min(sizes) + limit
  raise UserError(f"pad_crop(pad={pad}, mode='{mode}') cannot pad {hw} images by {pad} pixels "
                  f"('{mode.lower()}' padding mirrors at most {most}); set pad <= {most} or use "
                  "mode='constant'.")


@register('flip_lr')
def flip_lr() -> Op:
  """Horizontal flip with probability 1/2."""
  return lambda image, seed: tf.image.stateless_random_flip_left_right(image, seed=seed)


@register('random_resized_crop')
def random_resized_crop(size: int = 224, area_min: float = 0.08, area_max: float = 1.0,
                        ratio_min: float = 3 / 4, ratio_max: float = 4 / 3,
                        method: str = 'bilinear') -> Op:
  """Inception-style crop: random area fraction and aspect ratio, resized to size x size.

  As the first op of a training spec over encoded images it is fused into the decoding
  (``compose(..., decode_channels=C)``): JPEGs decode only the crop window.
  """
  _check_size('random_resized_crop', size, method)
  _check_area_ratio('random_resized_crop', area_min, area_max, ratio_min, ratio_max)

  def window(shape, seed):
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]),
        seed=seed, min_object_covered=0.0, aspect_ratio_range=(ratio_min, ratio_max),
        area_range=(area_min, area_max), max_attempts=10, use_image_if_no_bounding_boxes=True)
    return begin, crop_size

  def finish(crop, channels):
    out = to_uint8(tf.image.resize(crop, (size, size), method=method))
    return tf.ensure_shape(out, [size, size, channels])

  def op(image, seed):
    begin, crop_size = window(tf.shape(image), seed)
    return finish(tf.slice(image, begin, crop_size), image.shape[-1])

  def fused(encoded, seed, channels):
    is_jpeg = tf.io.is_jpeg(encoded)

    def jpeg():
      begin, crop_size = window(tf.image.extract_jpeg_shape(encoded), seed)
      crop = tf.image.decode_and_crop_jpeg(
          encoded, tf.stack([begin[0], begin[1], crop_size[0], crop_size[1]]), channels=channels)
      return finish(crop, channels)
    return tf.cond(is_jpeg, jpeg, lambda: op(decode_image(encoded, channels), seed))

  op.decode = fused
  return op


@register('resize')
def resize(size: int = 224, method: str = 'bilinear') -> Op:
  """Resize to size x size (aspect ratio not kept)."""
  _check_size('resize', size, method)

  def op(image, seed):
    del seed
    return to_uint8(tf.image.resize(image, (size, size), method=method))
  return op


@register('center_crop')
def center_crop(size: int = 224, crop_fraction: float = 0.875, method: str = 'bilinear') -> Op:
  """Resize the shorter side to size / crop_fraction, then take the central size x size crop."""
  _check_size('center_crop', size, method)
  check_number('center_crop', 'crop_fraction', crop_fraction, '0.875', lo=0, lo_open=True, hi=1,
               what='a fraction')

  def op(image, seed):
    del seed
    h, w = image_hw(image)
    scale = (size / crop_fraction) / tf.cast(tf.minimum(h, w), tf.float32)
    new_h = tf.maximum(size, tf.cast(tf.round(tf.cast(h, tf.float32) * scale), tf.int32))
    new_w = tf.maximum(size, tf.cast(tf.round(tf.cast(w, tf.float32) * scale), tf.int32))
    resized = tf.image.resize(image, tf.stack([new_h, new_w]), method=method)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    out = to_uint8(resized[top:top + size, left:left + size, :])
    return tf.ensure_shape(out, [size, size, image.shape[-1]])
  return op


@register('random_erasing')
def random_erasing(prob: float = 0.5, area_min: float = 0.02, area_max: float = 1 / 3,
                   ratio_min: float = 0.3, ratio_max: float = 1 / 0.3, value: Any = 'random',
                   attempts: int = 10) -> Op:
  """Random Erasing (Zhong et al. 2020): with probability ``prob`` one rectangle of random area
  fraction and (log-uniform) aspect ratio is filled with per-pixel noise (``value='random'``) or
  the constant ``value``. Of ``attempts`` candidate rectangles the first that fits is used."""
  op_name = 'random_erasing'
  check_number(op_name, 'prob', prob, '0.5', lo=0, hi=1, what='a probability')
  _check_area_ratio(op_name, area_min, area_max, ratio_min, ratio_max)
  if value != 'random' and not is_number(value):
    raise bad_args(op_name, {'value': value}, "value must be 'random' or a pixel value from 0 to "
                   f"255, got {value!r}", "value='random'")
  if value != 'random':
    check_number(op_name, 'value', value, '0', lo=0, hi=255, whole=True, what=PIXEL)
  check_number(op_name, 'attempts', attempts, '10', lo=1, whole=True)

  def op(image, seed):
    s_apply, s_area, s_ratio, s_top, s_left, s_noise = tf.unstack(split_seed(seed, 6))
    h, w = image_hw(image)
    hf, wf = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
    area = uniform(s_area, area_min, area_max, (attempts,)) * hf * wf
    ratio = tf.exp(uniform(s_ratio, math.log(ratio_min), math.log(ratio_max), (attempts,)))
    eh = tf.cast(tf.round(tf.sqrt(area * ratio)), tf.int32)
    ew = tf.cast(tf.round(tf.sqrt(area / ratio)), tf.int32)
    fits = (eh < h) & (ew < w) & (eh > 0) & (ew > 0)
    first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
    eh, ew = eh[first], ew[first]
    apply = (uniform(s_apply) < prob) & tf.reduce_any(fits)
    top = tf.cast(tf.floor(uniform(s_top) * tf.cast(h - eh + 1, tf.float32)), tf.int32)
    left = tf.cast(tf.floor(uniform(s_left) * tf.cast(w - ew + 1, tf.float32)), tf.int32)
    rows = tf.range(h)[:, None, None]
    cols = tf.range(w)[None, :, None]
    inside = (rows >= top) & (rows < top + eh) & (cols >= left) & (cols < left + ew) & apply
    if value == 'random':
      fill = tf.random.stateless_uniform(tf.shape(image), s_noise, 0, 256, dtype=tf.int32)
    else:
      fill = tf.fill(tf.shape(image), tf.constant(int(value), tf.int32))
    return tf.where(inside, tf.cast(fill, image.dtype), image)
  return op


INTERPOLATIONS = ('nearest', 'bilinear')


def rotate_image(image: tf.Tensor, degrees: tf.Tensor | float, fill: float = 0.0,
                 interpolation: str = 'nearest') -> tf.Tensor:
  """``image`` rotated counter-clockwise by ``degrees`` about its centre, same size (PIL's
  ``Image.rotate``); pixels from outside the image are ``fill``. Returns float32."""
  h, w = image_hw(image)
  hf, wf = tf.cast(h, tf.float32) - 1.0, tf.cast(w, tf.float32) - 1.0
  angle = tf.cast(degrees, tf.float32) * (math.pi / 180.0)
  c, s = tf.cos(angle), tf.sin(angle)
  # Output pixel (x, y) samples the input at R (x, y) + t; t keeps the centre fixed.
  dx = (wf - (c * wf - s * hf)) / 2.0
  dy = (hf - (s * wf + c * hf)) / 2.0
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=tf.cast(image, tf.float32)[None],
      transforms=tf.reshape(tf.stack([c, -s, dx, s, c, dy, 0.0, 0.0]), [1, 8]),
      output_shape=tf.stack([h, w]), fill_value=tf.constant(fill, tf.float32),
      interpolation=interpolation.upper(), fill_mode='CONSTANT')
  return tf.ensure_shape(out[0], image.shape)


@register('rotate')
def rotate(degrees: Any = 15, fill: int = 0, interpolation: str = 'nearest') -> Op:
  """Rotation by an angle drawn uniformly from [-degrees, degrees] (or from [lo, hi] for a pair),
  counter-clockwise about the centre, as torchvision's RandomRotation (pixels from outside are
  ``fill``; ``interpolation`` 'nearest' or 'bilinear')."""
  pair = isinstance(degrees, (tuple, list)) and len(degrees) == 2 and all(map(is_number, degrees))
  if not ((is_number(degrees) and degrees >= 0) or (pair and degrees[0] <= degrees[1])):
    raise bad_args('rotate', {'degrees': degrees}, 'degrees must be a number >= 0 or a pair '
                   f'(lo, hi) of numbers with lo <= hi, got {degrees!r}', 'degrees=(-10, 10)')
  lo, hi = (-float(degrees), float(degrees)) if is_number(degrees) else map(float, degrees)
  check_number('rotate', 'fill', fill, '0', lo=0, hi=255, whole=True, what=PIXEL)
  check_choice('rotate', 'interpolation', interpolation, INTERPOLATIONS, 'bilinear')

  def op(image, seed):
    out = rotate_image(image, uniform(seed, lo, hi), float(fill), interpolation)
    return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), image.dtype)
  return op
