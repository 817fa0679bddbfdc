"""Augmentation inside the jitted train step (``config.data.device_preprocess``) and the
translate + flip test-time views (``config.evaluate.tta='flip_translate'``).

Ops act on the uint8 batch before normalisation, are joined by ``'|'`` and run in the order given:

* ``flip_lr``: each example mirrored left-right with probability 1/2, keyed by (seed, step);
* ``flip_alternate``: derandomized flips (airbench): each example is mirrored in alternate epochs;
  whether it is in its first epoch is a per-example coin keyed by (seed, the example's pixels).
  The epoch of each row is its position in the training stream (``data/pipeline.py``: every slice
  of the split fills ``epoch_chunk`` rows of each global batch and has ``epoch_examples`` examples
  per epoch). The pixels identify the example, so it comes first, after no random host op (a
  training run refuses either: they change the pixels every epoch, and the flips would be
  random);
* ``translate(pad=N, mode=constant|reflect)``: a random crop of the image padded by N pixels
  (zeros = black, or reflected), i.e. a shift by -N..N pixels per axis and example, keyed by
  (seed, step);
* ``erase(prob=P, area_min=A, area_max=B, fill=noise|zero)``: Random Erasing (Zhong et al.
  2020, as the host op ``random_erasing``): with probability P one rectangle per example, of area
  fraction uniform in A..B and log-uniform aspect ratio in 0.3..3.3 (clipped to the image), is
  filled with uniform per-pixel noise or zeros, keyed by (seed, step); after ``flip_alternate``,
  which identifies examples by their pixels.

Everything is per example and element-wise over the batch, so the result does not depend on how
the batch is split over devices. No TensorFlow, no config objects: specs are parsed to hashable
tuples that ``steps.StepConfig`` carries.

Adding an op is one ``OPS`` entry (``DeviceOp``: its function, its arguments and their check)
and its function; the parser, ``apply`` and the error message's list of ops all read the table.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from imgcls_jax.errors import UserError

# fold_in data of the per-step key (steps.py owns MIX_STREAM; FLIP_STREAM is shared with it).
FLIP_STREAM = 0x0F11
TRANSLATE_STREAM = 0x7A45
ALTERNATE_STREAM = 0xA17E            # folded into the run key (not the step key): fixed per run
ERASE_STREAM = 0xE7A5
PAD_MODES = ('constant', 'reflect')
ERASE_FILLS = ('noise', 'zero')
ERASE_RATIO = (0.3, 1 / 0.3)         # aspect ratio range (height / width), log-uniform
TTA_MODES = ('', 'flip', 'flip_translate')
Op = tuple  # (name, *parameters): ('flip_lr',) | ('flip_alternate',) | ('translate', pad, mode)
#             | ('erase', prob, area_min, area_max, fill)


class Context(NamedTuple):
  """What an op may draw on besides the batch (``apply``'s arguments)."""
  step_key: jax.Array          # fold_in(run key, step): fold in the op's own stream
  run_key: jax.Array
  step: jax.Array
  epoch_chunk: int             # ``epoch_layout``: which epoch each row comes from
  epoch_examples: int


@dataclasses.dataclass(frozen=True)
class DeviceOp:
  """One op of the ``OPS`` table.

  ``run(ctx, images_BxHxWxC, *parameters) -> images`` (uint8 in and out, traced in the step);
  ``args``: its argument names -> default values as written in a spec; ``check(**values)`` turns
  them into the parameters (a tuple), or None when one is bad, and then ``needs`` says what it
  takes; ``usage`` shows its arguments in the list of ops. Ops sharing an ``exclusive`` tag
  appear at most once in all. ``shift(*parameters)``, for an op that moves the image content,
  names how far (the warning when the host shifts them too); ``mirrors``: it flips images.
  """
  run: Callable[..., jax.Array]
  args: dict[str, str] = dataclasses.field(default_factory=dict)
  check: Callable[..., tuple | None] | None = None
  needs: str = ''
  usage: str = ''
  exclusive: str = ''
  shift: Callable[..., str] | None = None
  mirrors: bool = False


def _bad(spec: str, why: str) -> UserError:
  listed = ', '.join(n + (f'({op.usage})' if op.usage else '') for n, op in OPS.items())
  return UserError(f"config.data.device_preprocess='{spec}' is not a device-side op spec ({why}); "
                   f"use '' or ops among {listed} joined by '|' (other augmentations go in "
                   'config.data.train_preprocess).')


def _fraction(text: str) -> float | None:
  try:
    v = float(text)
  except ValueError:
    return None
  return v if 0.0 <= v <= 1.0 else None


def _together(names: list[str]) -> str:
  return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def parse(spec: str) -> tuple[Op, ...]:
  """``'flip_alternate|translate(pad=2)'`` -> ``(('flip_alternate',), ('translate', 2,
  'constant'))``; raises UserError naming what is wrong."""
  ops: list[Op] = []
  for part in [p.strip() for p in (spec or '').split('|') if p.strip()]:
    m = re.fullmatch(r'(\w+)\s*(?:\((.*)\))?', part)
    if not m or m.group(1) not in OPS:
      raise _bad(spec, f"'{part}' is not one of {', '.join(OPS)}")
    name, args = m.group(1), {}
    for arg in [a.strip() for a in (m.group(2) or '').split(',') if a.strip()]:
      key, _, value = arg.partition('=')
      args[key.strip()] = value.strip().strip('\'"')
    entry = OPS[name]
    if not entry.args:
      if args:
        raise _bad(spec, f'{name} takes no arguments')
      ops.append((name,))
      continue
    values = None if set(args) - set(entry.args) else entry.check(
        **{k: args.get(k, default) for k, default in entry.args.items()})
    if values is None:
      raise _bad(spec, f'{name} takes {entry.needs}')
    ops.append((name, *values))
  names = [op[0] for op in ops]
  for tag in dict.fromkeys(op.exclusive for op in OPS.values() if op.exclusive):
    members = [n for n, op in OPS.items() if op.exclusive == tag]
    if sum(names.count(n) for n in members) > 1:
      raise _bad(spec, f'{members[0]} at most once' if len(members) == 1 else
                 f'at most one of {_together(members)}')
  return tuple(ops)


def mirroring(ops: tuple[Op, ...]) -> str:
  """The name of the first op of ``ops`` that flips images ('' when none does)."""
  return next((op[0] for op in ops if OPS[op[0]].mirrors), '')


def check_alternation(spec: str, ops: tuple[Op, ...], random_host_ops: list[str] = ()) -> None:
  """At training: UserError when ``flip_alternate`` (in ``ops``, parsed from ``spec``) comes after
  another device op, or ``random_host_ops`` (``train_preprocess``'s ops whose output changes with
  the seed) run before it. Its per-image coin hashes the pixels, which those change every epoch:
  its flips would be random, not alternating (a run saved so still loads)."""
  names = [op[0] for op in ops]
  if 'flip_alternate' not in names:
    return
  if names[0] != 'flip_alternate':
    parts = [p.strip() for p in spec.split('|') if p.strip()]
    first = [p for p in parts if p.startswith('flip_alternate')]
    raise UserError(f"config.data.device_preprocess='{spec}' puts flip_alternate after "
                    f"{', '.join(names[:names.index('flip_alternate')])}: it must come first (its "
                    "per-image coin is drawn from the image's pixels, which a random op before it "
                    "changes every epoch, so its flips would not alternate), e.g. "
                    f"'{'|'.join(first + [p for p in parts if p not in first])}'.")
  if random_host_ops:
    raise UserError(f"config.data.device_preprocess's flip_alternate draws each image's coin from "
                    f"its pixels, which config.data.train_preprocess's random "
                    f"{', '.join(random_host_ops)} change every epoch (its flips would be random, "
                    'not alternating); use flip_lr instead, or an augmentation on the device '
                    "after it (e.g. 'flip_alternate|translate(pad=2)').")


def twice_shifted(train_preprocess: str, ops: tuple[Op, ...]) -> str | None:
  """The warning to log when the host shifts the images (an ``op_traits.SHIFTS`` op in
  ``train_preprocess``) and ``ops`` translate them again on the device, else None. A config
  started from configs/default.py keeps its digits' one-pixel device shift under one's own
  ``train_preprocess`` unless ``device_preprocess`` is set too."""
  from imgcls_jax.data import op_traits   # (TensorFlow-free)
  host = op_traits.shifting(train_preprocess or '')
  device = next((op for op in ops if OPS[op[0]].shift is not None), None)
  if not host or device is None:
    return None
  return (f"config.data.train_preprocess shifts the images on the host ({', '.join(host)}) and "
          'config.data.device_preprocess translates them again on the device '
          f'({OPS[device[0]].shift(*device[1:])}); '
          "set --config.data.device_preprocess='' unless you want both (configs/default.py's "
          'one-pixel device shift is for its digits).')


# ---------------------------------------------------------------------------- the ops

def random_flip(key: jax.Array, images_BxHxWxC: jax.Array) -> jax.Array:
  """Each image mirrored left-right with probability 1/2 (one draw per example from ``key``)."""
  flip_B = jax.random.bernoulli(key, 0.5, images_BxHxWxC.shape[:1])
  return jnp.where(flip_B[:, None, None, None], images_BxHxWxC[:, :, ::-1, :], images_BxHxWxC)


def _fmix32(h: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finaliser (uint32 in, uint32 out): every input bit moves every output
  bit."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def example_coins(run_key: jax.Array, images_BxHxWxC: jax.Array) -> jax.Array:
  """A fixed pseudo-random bit per example (bool ``B``): a hash of its pixels keyed by the run.

  The hash is a sum of pixels times random odd uint32 weights, modulo 2^32 (exact in any order,
  so on any device split), then mixed by ``_fmix32``.
  """
  weights = jax.random.bits(jax.random.fold_in(run_key, ALTERNATE_STREAM),
                            images_BxHxWxC.shape[1:], jnp.uint32) | jnp.uint32(1)
  h = jnp.sum(images_BxHxWxC.astype(jnp.uint32) * weights, axis=(1, 2, 3), dtype=jnp.uint32)
  return (_fmix32(h) >> 31).astype(jnp.bool_)


def row_epochs(step: jax.Array, batch: int, chunk: int, examples: int) -> jax.Array:
  """The epoch (int32 ``B``) each row of global batch ``step`` comes from: row r is position
  ``step * chunk + r % chunk`` of its slice's stream, whose epochs hold ``examples`` examples.
  Computed without forming ``step * chunk`` (int32-safe for long runs)."""
  step = jnp.asarray(step, jnp.int32)
  within = jnp.arange(batch, dtype=jnp.int32) % chunk
  return (step // examples) * chunk + ((step % examples) * chunk + within) // examples


def alternate_flip(run_key: jax.Array, images_BxHxWxC: jax.Array, step: jax.Array, *, chunk: int,
                   examples: int) -> jax.Array:
  """Example i mirrored iff ``coin_i XOR (epoch_i is odd)``: flipped in every other epoch."""
  b = images_BxHxWxC.shape[0]
  odd_B = row_epochs(step, b, chunk, examples) % 2 == 1
  flip_B = jnp.logical_xor(example_coins(run_key, images_BxHxWxC), odd_B)
  return jnp.where(flip_B[:, None, None, None], images_BxHxWxC[:, :, ::-1, :], images_BxHxWxC)


def translate_offsets(key: jax.Array, batch: int, pad: int) -> tuple[jax.Array, jax.Array]:
  """(dy_B, dx_B): the crop corner in the padded image per example, each uniform in 0..2*pad."""
  k_y, k_x = jax.random.split(key)
  return (jax.random.randint(k_y, (batch,), 0, 2 * pad + 1),
          jax.random.randint(k_x, (batch,), 0, 2 * pad + 1))


def _select_window(x: jax.Array, offset_B: jax.Array, size: int, axis: int, pad: int) -> jax.Array:
  """Per example, ``size`` entries of ``axis`` from ``offset``: a chain of selects over the
  2 * pad + 1 possible windows (exact; cheaper than a gather on XLA:CPU for small pads)."""
  def window(s):
    return jax.lax.slice_in_dim(x, s, s + size, axis=axis)
  out = window(0)
  for s in range(1, 2 * pad + 1):
    out = jnp.where((offset_B == s)[:, None, None, None], window(s), out)
  return out


def translate(key: jax.Array, images_BxHxWxC: jax.Array, pad: int,
              mode: str = 'constant') -> jax.Array:
  """Random crops (``translate_offsets``) of the images padded by ``pad`` pixels: the image
  shifted by -pad..pad pixels on each axis, the uncovered border zero (black) or reflected."""
  b, h, w, _ = images_BxHxWxC.shape
  dy, dx = translate_offsets(key, b, pad)
  padded = jnp.pad(images_BxHxWxC, ((0, 0), (pad, pad), (pad, pad), (0, 0)),
                   mode='constant' if mode == 'constant' else 'reflect')
  return _select_window(_select_window(padded, dy, h, 1, pad), dx, w, 2, pad)


def erase(key: jax.Array, images_BxHxWxC: jax.Array, prob: float, area_min: float,
          area_max: float, fill: str = 'noise') -> jax.Array:
  """Random Erasing on a uint8 batch: with probability ``prob`` per example, a rectangle of
  area fraction uniform in ``area_min..area_max`` and aspect ratio log-uniform in
  ``ERASE_RATIO`` (each side clipped to the image), placed uniformly, is filled with uniform
  noise (0..255 per pixel and channel) or zeros."""
  b, h, w, _ = images_BxHxWxC.shape
  k_apply, k_area, k_ratio, k_top, k_left, k_noise = jax.random.split(key, 6)
  area = jax.random.uniform(k_area, (b,), minval=area_min, maxval=area_max) * (h * w)
  ratio = jnp.exp(jax.random.uniform(k_ratio, (b,), minval=math.log(ERASE_RATIO[0]),
                                     maxval=math.log(ERASE_RATIO[1])))
  eh = jnp.clip(jnp.round(jnp.sqrt(area * ratio)), 1, h).astype(jnp.int32)
  ew = jnp.clip(jnp.round(jnp.sqrt(area / ratio)), 1, w).astype(jnp.int32)
  top = jnp.floor(jax.random.uniform(k_top, (b,)) * (h - eh + 1)).astype(jnp.int32)
  left = jnp.floor(jax.random.uniform(k_left, (b,)) * (w - ew + 1)).astype(jnp.int32)
  apply_B = jax.random.bernoulli(k_apply, prob, (b,))
  rows = jnp.arange(h)[None, :, None]
  cols = jnp.arange(w)[None, None, :]
  inside = ((rows >= top[:, None, None]) & (rows < (top + eh)[:, None, None])
            & (cols >= left[:, None, None]) & (cols < (left + ew)[:, None, None])
            & apply_B[:, None, None])[..., None]
  if fill == 'noise':
    value = jax.random.randint(k_noise, images_BxHxWxC.shape, 0, 256).astype(images_BxHxWxC.dtype)
  else:
    value = jnp.zeros_like(images_BxHxWxC)
  return jnp.where(inside, value, images_BxHxWxC)


def epoch_layout(batch_size: int, read_shards: int, epoch_examples: int) -> dict[str, int]:
  """``epoch_chunk`` / ``epoch_examples`` of the training stream (``data/pipeline.py``): each of
  the ``read_shards`` slices fills ``batch_size / read_shards`` rows of every global batch and
  holds ``epoch_examples / read_shards`` examples per epoch (``epoch_examples``: the global
  epoch, as one process reads it; not the processes' shares times their count, which drops the
  remainder of a split their count does not divide)."""
  return {'epoch_chunk': batch_size // read_shards,
          'epoch_examples': max(1, epoch_examples // read_shards)}


def _flip_alternate(c: Context, x: jax.Array) -> jax.Array:
  if c.epoch_chunk <= 0 or c.epoch_examples <= 0:
    raise ValueError('flip_alternate needs epoch_chunk and epoch_examples (run.setup).')
  return alternate_flip(c.run_key, x, c.step, chunk=c.epoch_chunk, examples=c.epoch_examples)


def _translate_args(pad: str, mode: str) -> tuple | None:
  return (int(pad), mode) if pad.isdigit() and 1 <= int(pad) <= 64 and mode in PAD_MODES else None


def _erase_args(prob: str, area_min: str, area_max: str, fill: str) -> tuple | None:
  p, lo, hi = _fraction(prob), _fraction(area_min), _fraction(area_max)
  ok = p is not None and lo is not None and hi is not None and 0 < lo <= hi
  return (p, lo, hi, fill) if ok and fill in ERASE_FILLS else None


# The device ops by name, in the order the error message lists them.
OPS: dict[str, DeviceOp] = {
    'flip_lr': DeviceOp(
        lambda c, x: random_flip(jax.random.fold_in(c.step_key, FLIP_STREAM), x),
        exclusive='flip', mirrors=True),
    'flip_alternate': DeviceOp(_flip_alternate, exclusive='flip', mirrors=True),
    'translate': DeviceOp(
        lambda c, x, pad, mode: translate(jax.random.fold_in(c.step_key, TRANSLATE_STREAM), x,
                                          pad, mode),
        args={'pad': '2', 'mode': 'constant'}, check=_translate_args,
        needs='pad (1..64 pixels) and mode (constant or reflect)',
        usage='pad=N, mode=constant|reflect', exclusive='translate',
        shift=lambda pad, mode: f'pad={pad}'),
    'erase': DeviceOp(
        lambda c, x, *params: erase(jax.random.fold_in(c.step_key, ERASE_STREAM), x, *params),
        args={'prob': '0.5', 'area_min': '0.02', 'area_max': '0.33', 'fill': 'noise'},
        check=_erase_args,
        needs='prob (0..1), 0 < area_min <= area_max <= 1 and fill (noise or zero)',
        usage='prob=P, area_min=A, area_max=B, fill=noise|zero', exclusive='erase'),
}


def apply(ops: tuple[Op, ...], images_BxHxWxC: jax.Array, *, step_key: jax.Array,
          run_key: jax.Array, step: jax.Array, epoch_chunk: int = 0,
          epoch_examples: int = 0) -> jax.Array:
  """``ops`` in order on a uint8 batch. ``step_key`` = fold_in(run key, step); ``epoch_chunk``
  and ``epoch_examples`` place rows in epochs (``flip_alternate``)."""
  ctx = Context(step_key, run_key, step, epoch_chunk, epoch_examples)
  x = images_BxHxWxC
  for op in ops:
    if op[0] not in OPS:
      raise ValueError(f'unknown device op {op!r}')
    x = OPS[op[0]].run(ctx, x, *op[1:])
  return x


# ------------------------------------------------------------------- test-time views

def shift_views(images_BxHxWxC: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The images shifted by one pixel down-right and up-left (crops at (0, 0) and (2, 2) of the
  image reflect-padded by 1), as airbench's test-time augmentation."""
  _, h, w, _ = images_BxHxWxC.shape
  padded = jnp.pad(images_BxHxWxC, ((0, 0), (1, 1), (1, 1), (0, 0)), mode='reflect')
  return padded[:, :h, :w], padded[:, 2:h + 2, 2:w + 2]


def tta_views(images_BxHxWxC: jax.Array, tta: str) -> list[tuple[float, jax.Array]]:
  """(weight, images) of each test-time view; the prediction is the weighted mean of their
  probabilities. ``flip``: the image and its mirror, 1/2 each. ``flip_translate`` (airbench): the
  image and its mirror 1/4 each, both one-pixel shifts and their mirrors 1/8 each."""
  mirror = lambda x: x[:, :, ::-1, :]  # noqa: E731
  x = images_BxHxWxC
  if tta == '':
    return [(1.0, x)]
  if tta == 'flip':
    return [(0.5, x), (0.5, mirror(x))]
  if tta == 'flip_translate':
    a, b = shift_views(x)
    return [(0.25, x), (0.25, mirror(x)), (0.125, a), (0.125, mirror(a)), (0.125, b),
            (0.125, mirror(b))]
  raise ValueError(f'unknown test-time augmentation {tta!r}')


def mean_log_probs(log_probs_fn: Any, images_BxHxWxC: jax.Array, tta: str) -> jax.Array:
  """``log(sum_v w_v p_v)`` over ``tta_views``, from ``log_probs_fn(images) -> BxK``."""
  views = tta_views(images_BxHxWxC, tta)
  stacked = jnp.stack([log_probs_fn(v) for _, v in views])
  log_w = jnp.log(jnp.asarray([w for w, _ in views], jnp.float32))
  return jax.nn.logsumexp(stacked + log_w[:, None, None], axis=0)
