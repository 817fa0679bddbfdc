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
from typing import Any, Callable

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
  """Inception-style crop: random area fraction and aspect ratio, resized to size x size."""
  def op(image, seed):
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]),
        seed=seed, min_object_covered=0.0, aspect_ratio_range=(ratio_min, ratio_max),
        area_range=(area_min, area_max), max_attempts=10, use_image_if_no_bounding_boxes=True)
    crop = tf.slice(image, begin, crop_size)
    return _to_uint8(tf.image.resize(crop, (size, size), method=method))
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
    return _to_uint8(resized[top:top + size, left:left + size, :])
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


def compose(spec: str) -> Op:
  """One op applying every op of ``spec`` in order, each with its own sub-seed of ``seed``."""
  chain = parse(spec)

  def op(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    if not chain:
      return image
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=len(chain))
    for i, (_, fn) in enumerate(chain):
      image = fn(image, seeds[i])
    return image
  return op
