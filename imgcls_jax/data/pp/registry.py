"""The preprocessing-op registry: register ops by name, parse spec strings, compose them.

A pipeline is a spec string of ops joined by ``|``, each with optional keyword (or positional)
literal arguments, e.g. ``'random_resized_crop(size=224)|flip_lr'`` or ``'pad_crop(pad=4)|flip_lr'``.
Every op maps ``(image_HxWxC uint8, seed int32[2]) -> image uint8`` with stateless TF random ops,
so the same seed always gives the same output, eagerly or inside tf.data. Normalisation to float
happens on the accelerator (see ``steps.normalize``), so the host ships uint8.

Add an op with ``@register('name')`` on a factory ``(**kwargs) -> op``; the factory checks its
arguments (``check_number``, ``check_order``, ``check_choice``, ``bad_args``) so that a bad spec is
one sentence when it is parsed, before any work. An op registered from outside the package (e.g.
in the --config file) is recorded with ``registration.code_origin``, so that a run that used it
names the file that registers it to a later mode given ``--workdir`` alone
(``ensure_registered``).
"""
from __future__ import annotations

import ast
import math
from typing import Any, Callable, Mapping

import numpy as np

from imgcls_jax import registration
from imgcls_jax.data import op_traits
from imgcls_jax.data.tf_import import tf
from imgcls_jax.errors import UserError

Op = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]
_OPS: dict[str, Callable[..., Op]] = {}
_ORIGINS: dict[str, dict[str, str]] = {}   # an op registered from outside: registration.code_origin


def register(name: str, *, mirrors: bool = False,
             shifts: bool = False) -> Callable[[Callable[..., Op]], Callable[..., Op]]:
  """Decorator registering an op factory under ``name``; from outside the package, say whether
  the op flips images (``mirrors``: refused on datasets a flip changes) or shifts their content
  as a translation does (``shifts``: warned of beside a device translation); ``op_traits``."""
  def wrap(factory):
    _OPS[name] = factory
    _ORIGINS.pop(name, None)
    if not str(getattr(factory, '__module__', '')).startswith('imgcls_jax.'):
      _ORIGINS[name] = registration.code_origin(factory)
      op_traits.declare(name, mirrors=mirrors, shifts=shifts)
    return factory
  return wrap


def origins(spec: str) -> dict[str, dict[str, str]]:
  """``{op name: where it was registered}`` of the ops of ``spec`` registered from outside the
  package, for a run directory to record."""
  used = {_parse_one(p)[0] for p in (spec or '').split('|') if p.strip()}
  return {name: _ORIGINS[name] for name in sorted(used) if name in _ORIGINS}


def ensure_registered(recorded: Mapping[str, Mapping[str, str]]) -> None:
  """Refuses, naming the code to load (never loading it), an op of a trained run that this
  process does not know (``recorded``: ``origins`` at training)."""
  missing = sorted(name for name in recorded if name not in _OPS)
  if missing:
    raise registration.unregistered(f"Preprocessing op '{missing[0]}' of this run is an op",
                              "the ops of imgcls_jax/data/pp", recorded[missing[0]])


def names() -> list[str]:
  """All registered op names, sorted."""
  return sorted(_OPS)


# ---- helpers shared by the op files ----

def to_uint8(image: tf.Tensor) -> tf.Tensor:
  """Rounds and clips a float image to uint8."""
  return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def image_hw(image: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """Dynamic (height, width) of an HxWxC image."""
  shape = tf.shape(image)
  return shape[0], shape[1]


def split_seed(seed: tf.Tensor, num: int) -> tf.Tensor:
  """``num`` independent stateless seeds (int64[num, 2]) derived from ``seed``."""
  return tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=num)


def uniform(seed: tf.Tensor, minval: float = 0.0, maxval: float = 1.0,
            shape: tuple[int, ...] = ()) -> tf.Tensor:
  """Stateless float32 uniform samples in [minval, maxval)."""
  return tf.random.stateless_uniform(shape, seed=seed, minval=minval, maxval=maxval)


# ---- argument checks for the op factories: one sentence naming the op, the argument, its value,
# the allowed range and an example, raised when the spec is parsed ----

def bad_args(op: str, args: dict[str, Any], rule: str, example: str) -> UserError:
  """The error ``op(k=v, ...): rule; e.g. op(example).`` for arguments ``args`` of op ``op``."""
  shown = ', '.join(f'{k}={v!r}' for k, v in args.items())
  return UserError(f'{op}({shown}): {rule}; e.g. {op}({example}).')


PIXEL = 'a pixel value'   # check_number's ``what`` for a 0-255 fill: 0.0 is read as 0


def is_number(value: Any, whole: bool = False) -> bool:
  """True for a finite int (or, unless ``whole``, float) literal; False for a bool."""
  kinds = int if whole else (int, float)
  return (isinstance(value, kinds) and not isinstance(value, bool)
          and (isinstance(value, int) or math.isfinite(value)))


def check_number(op: str, name: str, value: Any, example: str, *, lo: float | None = None,
                 hi: float | None = None, lo_open: bool = False, whole: bool = False,
                 what: str = '', note: str = '') -> None:
  """Raises ``bad_args`` unless argument ``name`` is a (``whole``) number in [lo, hi] (or
  (lo, hi] with ``lo_open``; either end None for none); ``what`` names it ('a fraction'),
  ``note`` follows the range ('(0 applies none)')."""
  if whole and what == PIXEL and isinstance(value, float) and value.is_integer():
    value = int(value)   # fill=0.0 or value=128.0: a pixel value all the same
  ok = (is_number(value, whole) and (lo is None or value > lo or (value == lo and not lo_open))
        and (hi is None or value <= hi))
  if ok:
    return
  if lo is not None and hi is not None and not lo_open:
    bounds = f'from {lo} to {hi}'
  else:
    bounds = ' and '.join(([f"{'>' if lo_open else '>='} {lo}"] if lo is not None else [])
                          + ([f'<= {hi}'] if hi is not None else []))
  what = what or ('a whole number' if whole else 'a number')
  note = f' {note}' if note else ''
  raise bad_args(op, {name: value}, f'{name} must be {what} {bounds}{note}, got {value!r}',
                 f'{name}={example}')


def check_order(op: str, lo_name: str, lo: float, hi_name: str, hi: float) -> None:
  """Raises ``bad_args`` unless ``lo <= hi`` (both already checked to be numbers)."""
  if lo > hi:
    raise bad_args(op, {lo_name: lo, hi_name: hi}, f'{lo_name} must be <= {hi_name}, got '
                   f'{lo!r} > {hi!r}', f'{lo_name}={hi!r}, {hi_name}={lo!r}')


def check_choice(op: str, name: str, value: Any, choices: tuple[str, ...], example: str, *,
                 any_case: bool = False) -> None:
  """Raises ``bad_args`` unless ``value`` is one of the strings ``choices`` (in either case
  with ``any_case``)."""
  if not isinstance(value, str) or (value.lower() if any_case else value) not in choices:
    raise bad_args(op, {name: value}, f"{name} must be one of {', '.join(choices)}, got "
                   f'{value!r}', f'{name}={example!r}')


# ---- specs ----

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
    except (TypeError, ValueError) as e:   # what a factory's own checks do not name
      why = str(e).rstrip('.')
      raise UserError(f"Bad arguments for preprocessing op '{part}': {why}.") from None
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
    seeds = split_seed(seed, len(chain))
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


def seed_dependent(spec: str, channels: int,
                   hw: tuple[int | None, int | None] | None = None) -> list[str]:
  """The ops of ``spec`` whose output changes with the seed (random ones, at these arguments:
  ``pad_crop(pad=0)`` is not), each run under 16 seeds on what the ops before it make of one fixed
  noise image of size ``hw`` (48x40 when unknown; a coin flip looks fixed under all of them with
  probability 2^-15). An op that cannot run on that image is left out (the spec's own checks
  name it)."""
  h, w = hw if hw and hw[0] and hw[1] else (48, 40)
  image = tf.constant(np.random.default_rng(0).integers(0, 256, (h, w, channels)), tf.uint8)
  found = []
  for name, op in parse(spec):
    try:
      outs = [op(image, tf.constant([s, 7], tf.int64)).numpy() for s in range(16)]
    except (tf.errors.OpError, ValueError, UserError):
      break   # (the ops after it would not see what they see in the pipeline)
    if any(o.shape != outs[0].shape or not np.array_equal(o, outs[0]) for o in outs[1:]):
      found.append(name)
    image = tf.constant(outs[0])
  return found


def output_shape(spec: str, hw: tuple[int, int], channels: int) -> tuple[int, int, int]:
  """The HxWxC that ``spec`` makes of an ``hw`` image with ``channels`` channels."""
  out = compose(spec)(tf.zeros(tuple(hw) + (channels,), tf.uint8), tf.zeros([2], tf.int64))
  return tuple(int(d) for d in out.shape)
