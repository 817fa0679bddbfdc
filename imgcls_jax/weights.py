"""Named weight arrays: a model's parameters and statistics as ``{dotted name: array}``.

Checkpoints of this project (``checkpoint_files.read_weights``) and torchvision/timm files
(``torch_import.load``) both produce a ``Weights``; ``merge`` puts such arrays into a model's tree
by name, naming the first parameter that is missing, extra, or of another shape.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import jax
import numpy as np

from imgcls_jax.errors import UserError

FlatArrays = dict[str, np.ndarray]


@dataclasses.dataclass
class Weights:
  """Named arrays from some source, in this project's naming (``layer1.0.conv1.kernel``)."""
  params: FlatArrays
  batch_stats: FlatArrays
  origin: str                              # for messages: 'checkpoint 300 of /runs/a'
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)


def non_finite(weights: Weights) -> list[str]:
  """Names of the floating-point arrays of ``weights`` holding a NaN or an infinity."""
  named = {**weights.params, **{f'batch_stats:{k}': v for k, v in weights.batch_stats.items()}}
  return [k for k, v in named.items()
          if np.issubdtype(np.asarray(v).dtype, np.inexact) and not np.isfinite(v).all()]


def check_finite(weights: Weights, fix: str) -> Weights:
  """``weights``, or a UserError naming the arrays with NaN / inf values (a damaged file, or one
  saved after training diverged) and ``fix``: inference on them answers NaN, training from them
  diverges at once."""
  bad = non_finite(weights)
  if bad:
    more = f' and {len(bad) - 3} more' if len(bad) > 3 else ''
    raise UserError(f"{weights.origin} holds NaN or infinite values ({', '.join(bad[:3])}{more}): "
                    f'it is damaged, or was saved after its training diverged; {fix}.')
  return weights


def path_name(path: tuple[Any, ...]) -> str:
  """``(DictKey('layer1'), DictKey(0), DictKey('conv1'), ...)`` -> ``'layer1.0.conv1...'``."""
  parts = []
  for k in path:
    for attr in ('key', 'idx', 'name'):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return '.'.join(parts)


def flatten(tree: Any) -> dict[str, Any]:
  """A pytree of arrays as ``{dotted name: leaf}``."""
  return {path_name(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def map_named(fn: Callable[[str, Any], Any], tree: Any) -> Any:
  """``tree`` with each leaf replaced by ``fn(dotted name, leaf)``."""
  return jax.tree_util.tree_map_with_path(lambda p, v: fn(path_name(p), v), tree)


def merge(target: Any, source: FlatArrays, *, origin: str,
          skip: Callable[[str], bool] = lambda _: False, kind: str = 'Parameter',
          hint: Callable[[str], str] = lambda _: '',
          fix: str = 'match config.model to the run that wrote them') -> tuple[Any, int]:
  """``target`` with every leaf that is not ``skip``-ped replaced by the same-named numpy array.

  ``target`` is a pytree of arrays or ``ShapeDtypeStruct``s; skipped leaves are kept as they are.
  Returns (the pytree, how many leaves came from ``source``). Raises UserError naming the first
  parameter that is missing from ``source``, extra in it, or of another shape; ``fix`` says what
  to do when the weights are of another architecture, ``hint(name)`` what else may fix a shape.
  """
  names = flatten(target)
  wanted = {n for n in names if not skip(n)}
  missing = sorted(wanted - set(source))
  if missing:
    more = f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''
    raise UserError(f"{kind} '{missing[0]}'{more} of this model is not in {origin}; the weights "
                    f'are from another architecture: {fix}.')
  extra = sorted(n for n in source if n not in names and not skip(n))
  if extra:
    more = f' (and {len(extra) - 1} more)' if len(extra) > 1 else ''
    raise UserError(f"{kind} '{extra[0]}'{more} in {origin} does not exist in this model; the "
                    f'weights are from another architecture: {fix}.')
  for n in sorted(wanted):
    want, got = tuple(names[n].shape), tuple(np.shape(source[n]))
    if want != got:
      channels = (len(want) == 4 and len(got) == 4 and want[:2] + want[3:] == got[:2] + got[3:]
                  and {want[2], got[2]} <= {1, 3, 4})   # the image-facing convolution's
      raise UserError(f"{kind} '{n}' has shape {got} in {origin} but {want} in this model; "
                      + (f'the weights take {got[2]}-channel images and this data has {want[2]} '
                         '(only 1 <-> 3 channels are adapted); convert the images to '
                         f'{got[2]} channels' if channels else
                         'match config.model to the weights') + f'{hint(n)}.')
  merged = map_named(lambda n, leaf: np.asarray(source[n], dtype=leaf.dtype) if n in wanted
                     else leaf, target)
  return merged, len(wanted)


def adapt_input_channels(weights: Weights, target: dict[str, Any]) -> Weights:
  """``weights`` fitted to a model whose first convolution takes 1 image channel where theirs takes
  3 (summed over the colours) or 3 where theirs takes 1 (repeated, divided by 3), as timm's
  ``adapt_input_conv`` does: grey images then give the features their colour versions gave.
  ``target`` is ``{name: array or shape struct}``; any other mismatch is left to ``merge``."""
  adapted = {}   # (only the image-facing convolution: one such kernel, or none is adapted)
  for name, value in weights.params.items():
    have = np.shape(value)
    want = tuple(target[name].shape) if name in target else None
    if (want is None or len(have) != 4 or len(want) != 4 or have == want
        or have[:2] + have[3:] != want[:2] + want[3:] or {have[2], want[2]} != {1, 3}):
      continue
    value = np.asarray(value)
    adapted[name] = (value.sum(axis=2, keepdims=True) if want[2] == 1
                     else np.repeat(value, 3, axis=2) / 3.0).astype(value.dtype)
  if len(adapted) != 1:
    return weights
  (name, value), = adapted.items()
  logging.info("Adapted '%s' of %s from %d to %d input channels (%s, as timm's "
               'adapt_input_conv).', name, weights.origin, np.shape(weights.params[name])[2],
               value.shape[2], 'summed over the colours' if value.shape[2] == 1
               else 'repeated, divided by 3')
  return dataclasses.replace(weights, params={**weights.params, **adapted})


def place(values: Any, like: Any) -> Any:
  """Numpy leaves as global arrays with the shardings of ``like`` (works across processes)."""
  def put(v, ref):
    if isinstance(v, jax.Array):
      return v
    v = np.asarray(v)
    return jax.make_array_from_callback(v.shape, ref.sharding, lambda idx: v[idx])
  return jax.tree.map(put, values, like)
