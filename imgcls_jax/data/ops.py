"""Preprocessing ops: a registry of named, composable, seeded image transforms.

A pipeline is a spec string of ops joined by ``|``, each with optional keyword (or positional)
literal arguments, e.g. ``'random_resized_crop(size=224)|flip_lr'`` or ``'pad_crop(pad=4)|flip_lr'``.
Every op maps ``(image_HxWxC uint8, seed int32[2]) -> image uint8`` with stateless TF random ops,
so the same seed always gives the same output, eagerly or inside tf.data. Normalisation to float
happens on the accelerator (see ``steps.normalize``), so the host ships uint8.

Add an op with ``@register('name')`` on a factory ``(**kwargs) -> op``.
"""
from __future__ import annotations

import ast
import math
from typing import Any, Callable

import numpy as np
import tensorflow as tf

from imgcls_jax.errors import UserError

Op = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]
_OPS: dict[str, Callable[..., Op]] = {}


def register(name: str) -> Callable[[Callable[..., Op]], Callable[..., Op]]:
  """Decorator registering an op factory under ``name``."""
  def wrap(factory):
    _OPS[name] = factory
    return factory
  return wrap


def names() -> list[str]:
  return sorted(_OPS)


def _to_uint8(image: tf.Tensor) -> tf.Tensor:
  return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def _hw(image: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  shape = tf.shape(image)
  return shape[0], shape[1]


@register('pad_crop')
def pad_crop(pad: int = 4, mode: str = 'constant') -> Op:
  """Zero- (or reflect-) pad by ``pad`` pixels on each side, then randomly crop back to H x W."""
  def op(image, seed):
    h, w = _hw(image)
    padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]], mode=mode.upper())
    return tf.image.stateless_random_crop(padded, tf.stack([h, w, tf.shape(image)[2]]), seed=seed)
  return op


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
  def window(shape, seed):
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]),
        seed=seed, min_object_covered=0.0, aspect_ratio_range=(ratio_min, ratio_max),
        area_range=(area_min, area_max), max_attempts=10, use_image_if_no_bounding_boxes=True)
    return begin, crop_size

  def finish(crop, channels):
    out = _to_uint8(tf.image.resize(crop, (size, size), method=method))
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
  def op(image, seed):
    del seed
    return _to_uint8(tf.image.resize(image, (size, size), method=method))
  return op


@register('center_crop')
def center_crop(size: int = 224, crop_fraction: float = 0.875, method: str = 'bilinear') -> Op:
  """Resize the shorter side to size / crop_fraction, then take the central size x size crop."""
  def op(image, seed):
    del seed
    h, w = _hw(image)
    scale = (size / crop_fraction) / tf.cast(tf.minimum(h, w), tf.float32)
    new_h = tf.maximum(size, tf.cast(tf.round(tf.cast(h, tf.float32) * scale), tf.int32))
    new_w = tf.maximum(size, tf.cast(tf.round(tf.cast(w, tf.float32) * scale), tf.int32))
    resized = tf.image.resize(image, tf.stack([new_h, new_w]), method=method)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    out = _to_uint8(resized[top:top + size, left:left + size, :])
    return tf.ensure_shape(out, [size, size, image.shape[-1]])
  return op


def _seeds(seed: tf.Tensor, num: int) -> tf.Tensor:
  """``num`` independent stateless seeds (int64[num, 2]) derived from ``seed``."""
  return tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=num)


def _uniform(seed: tf.Tensor, minval: float = 0.0, maxval: float = 1.0,
             shape: tuple[int, ...] = ()) -> tf.Tensor:
  return tf.random.stateless_uniform(shape, seed=seed, minval=minval, maxval=maxval)


# ---- RandAugment (Cubuk et al. 2020), with torchvision's magnitude scale ----
# Each op maps (image float32 HxWxC in [0, 255], signed magnitude fraction m in [-1, 1], fill) ->
# image; the fraction is magnitude / (num_bins - 1), negated with probability 1/2 for signed ops.

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
  h, w = _hw(image)
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=tf.reshape(tf.cast(transform, tf.float32), [1, 8]),
      output_shape=tf.stack([h, w]), fill_value=tf.constant(fill, tf.float32),
      interpolation='NEAREST', fill_mode='CONSTANT')
  return tf.ensure_shape(out[0], image.shape)


def _ra_rotate(image, m, fill):
  angle = m * (30.0 * math.pi / 180.0)
  h, w = _hw(image)
  hf, wf = tf.cast(h, tf.float32) - 1.0, tf.cast(w, tf.float32) - 1.0
  c, s = tf.cos(angle), tf.sin(angle)
  dx = (wf - (c * wf - s * hf)) / 2.0
  dy = (hf - (s * wf + c * hf)) / 2.0
  return _affine(image, tf.stack([c, -s, dx, s, c, dy, 0.0, 0.0]), fill)


def _ra_shear_x(image, m, fill):
  return _affine(image, tf.stack([1.0, 0.3 * m, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]), fill)


def _ra_shear_y(image, m, fill):
  return _affine(image, tf.stack([1.0, 0.0, 0.0, 0.3 * m, 1.0, 0.0, 0.0, 0.0]), fill)


def _ra_translate_x(image, m, fill):
  shift = m * (150.0 / 331.0) * tf.cast(_hw(image)[1], tf.float32)
  return _affine(image, tf.stack([1.0, 0.0, shift, 0.0, 1.0, 0.0, 0.0, 0.0]), fill)


def _ra_translate_y(image, m, fill):
  shift = m * (150.0 / 331.0) * tf.cast(_hw(image)[0], tf.float32)
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
  h, w = _hw(image)
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


@register('randaugment')
def randaugment(num_ops: int = 2, magnitude: float = 9, num_bins: int = 31, fill: int = 128,
                ops: str = '') -> Op:
  """RandAugment(N=num_ops, M=magnitude): ``num_ops`` ops drawn uniformly, each at ``magnitude``.

  ``magnitude`` is on torchvision's scale 0..``num_bins - 1`` (rotate up to 30 degrees, shear 0.3,
  translate 45% of the size, enhance factors 1 +- 0.9, posterize to 4 bits, solarize at 0);
  ``fill`` fills pixels moved in from outside; ``ops`` (comma-separated names) restricts the set.
  """
  names_ = [n.strip() for n in ops.split(',') if n.strip()] or list(RANDAUGMENT_OPS)
  unknown = [n for n in names_ if n not in RANDAUGMENT_OPS]
  if unknown:
    raise TypeError(f"unknown RandAugment ops {unknown}; known: {', '.join(RANDAUGMENT_OPS)}")
  if not 0 <= magnitude <= num_bins - 1:
    raise TypeError(f'magnitude must be in [0, {num_bins - 1}], got {magnitude}')
  table = [RANDAUGMENT_OPS[n] for n in names_]
  fraction = float(magnitude) / float(num_bins - 1)

  def op(image, seed):
    dtype = image.dtype
    x = tf.cast(image, tf.float32)
    for s in tf.unstack(_seeds(seed, num_ops)):
      pick_seed, sign_seed = tf.unstack(_seeds(s, 2))
      index = tf.random.stateless_uniform([], pick_seed, 0, len(table), dtype=tf.int32)
      negate = _uniform(sign_seed) < 0.5

      def branch(fn=None, signed=False):
        m = tf.where(negate, -fraction, fraction) if signed else tf.constant(fraction)
        return lambda: fn(x, m, float(fill))
      x = tf.switch_case(index, [branch(fn, signed) for fn, signed in table])
      x = tf.ensure_shape(x, image.shape)
    return tf.cast(tf.clip_by_value(tf.round(x), 0, 255), dtype)
  return op


@register('random_erasing')
def random_erasing(prob: float = 0.5, area_min: float = 0.02, area_max: float = 1 / 3,
                   ratio_min: float = 0.3, ratio_max: float = 1 / 0.3, value: Any = 'random',
                   attempts: int = 10) -> Op:
  """Random Erasing (Zhong et al. 2020): with probability ``prob`` one rectangle of random area
  fraction and (log-uniform) aspect ratio is filled with per-pixel noise (``value='random'``) or
  the constant ``value``. Of ``attempts`` candidate rectangles the first that fits is used."""
  if value != 'random' and not isinstance(value, (int, float)):
    raise TypeError(f"value must be 'random' or a number, got {value!r}")

  def op(image, seed):
    s_apply, s_area, s_ratio, s_top, s_left, s_noise = tf.unstack(_seeds(seed, 6))
    h, w = _hw(image)
    hf, wf = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
    area = _uniform(s_area, area_min, area_max, (attempts,)) * hf * wf
    ratio = tf.exp(_uniform(s_ratio, math.log(ratio_min), math.log(ratio_max), (attempts,)))
    eh = tf.cast(tf.round(tf.sqrt(area * ratio)), tf.int32)
    ew = tf.cast(tf.round(tf.sqrt(area / ratio)), tf.int32)
    fits = (eh < h) & (ew < w) & (eh > 0) & (ew > 0)
    first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
    eh, ew = eh[first], ew[first]
    apply = (_uniform(s_apply) < prob) & tf.reduce_any(fits)
    top = tf.cast(tf.floor(_uniform(s_top) * tf.cast(h - eh + 1, tf.float32)), tf.int32)
    left = tf.cast(tf.floor(_uniform(s_left) * tf.cast(w - ew + 1, tf.float32)), tf.int32)
    rows = tf.range(h)[:, None, None]
    cols = tf.range(w)[None, :, None]
    inside = (rows >= top) & (rows < top + eh) & (cols >= left) & (cols < left + ew) & apply
    if value == 'random':
      fill = tf.random.stateless_uniform(tf.shape(image), s_noise, 0, 256, dtype=tf.int32)
    else:
      fill = tf.fill(tf.shape(image), tf.constant(int(value), tf.int32))
    return tf.where(inside, tf.cast(fill, image.dtype), image)
  return op


def _parse_one(text: str) -> tuple[str, list[Any], dict[str, Any]]:
  text = text.strip()
  name, _, rest = text.partition('(')
  name = name.strip()
  if not rest:
    return name, [], {}
  if not rest.endswith(')'):
    raise ValueError('missing closing parenthesis')
  call = ast.parse(f'f({rest}', mode='eval').body
  args = [ast.literal_eval(a) for a in call.args]
  kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
  return name, args, kwargs


def parse(spec: str) -> list[tuple[str, Op]]:
  """Parses ``'op1(k=v)|op2'`` into ``[(name, op), ...]``; an empty spec is no ops."""
  result = []
  for part in filter(None, (p.strip() for p in (spec or '').split('|'))):
    try:
      name, args, kwargs = _parse_one(part)
    except (SyntaxError, ValueError) as e:
      raise UserError(f"Cannot parse preprocessing op '{part}' ({e}); write ops as "
                      "name(key=value)|name2, e.g. 'pad_crop(pad=4)|flip_lr'.") from None
    if name not in _OPS:
      raise UserError(f"Unknown preprocessing op '{name}' in '{spec}'; known ops: "
                      f"{', '.join(names())}.")
    try:
      result.append((name, _OPS[name](*args, **kwargs)))
    except TypeError as e:
      raise UserError(f"Bad arguments for preprocessing op '{part}': {e}.") from None
  return result


def decode_image(encoded: tf.Tensor, channels: int) -> tf.Tensor:
  """Encoded JPEG / PNG / GIF / BMP bytes -> uint8 HxWx``channels`` (first frame of a GIF)."""
  image = tf.io.decode_image(encoded, channels=channels, expand_animations=False, dtype=tf.uint8)
  image.set_shape([None, None, channels])
  return image


def compose(spec: str, *, decode_channels: int | None = None) -> Op:
  """One op applying every op of ``spec`` in order, each with its own sub-seed of ``seed``.

  With ``decode_channels`` the op takes encoded image bytes and decodes them first; a leading
  op that can fuse with decoding (``random_resized_crop``: crop-window JPEG decoding) does so,
  with the same sub-seed, so the result is the same crop as decoding then cropping.
  """
  chain = parse(spec)

  def op(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    if not chain:
      return image if decode_channels is None else decode_image(image, decode_channels)
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=len(chain))
    first = 0
    if decode_channels is not None:
      fused = getattr(chain[0][1], 'decode', None)
      if fused is not None:
        image, first = fused(image, seeds[0], decode_channels), 1
      else:
        image = decode_image(image, decode_channels)
    for i in range(first, len(chain)):
      image = chain[i][1](image, seeds[i])
    return image
  return op


def fuses_with_decoding(spec: str) -> bool:
  """True when the first op of ``spec`` decodes faster fused (crop-window JPEG decoding)."""
  chain = parse(spec)
  return bool(chain) and hasattr(chain[0][1], 'decode')


def numpy_op(spec: str) -> Callable[[np.ndarray], np.ndarray] | None:
  """``spec`` as a function on one uint8 HxWxC numpy image (fixed seed: for evaluation-style,
  deterministic ops); None when ``spec`` is empty. Prediction and serving use it."""
  if not spec:
    return None
  op = compose(spec)
  return lambda image: op(tf.convert_to_tensor(image), tf.zeros([2], tf.int64)).numpy()


def output_shape(spec: str, hw: tuple[int, int], channels: int) -> tuple[int, int, int]:
  """The HxWxC that ``spec`` makes of an ``hw`` image with ``channels`` channels."""
  out = compose(spec)(tf.zeros(tuple(hw) + (channels,), tf.uint8), tf.zeros([2], tf.int64))
  return tuple(int(d) for d in out.shape)

