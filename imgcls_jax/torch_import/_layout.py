"""PyTorch -> Flax tensor layouts, shared by the per-family converters.

Convolutions OIHW -> HWIO, linear (out, in) -> (in, out), norm ``weight`` -> ``scale``, BatchNorm
``running_mean`` / ``running_var`` -> batch statistics ``mean`` / ``var``; ``num_batches_tracked``
is dropped.
"""
from __future__ import annotations

import functools
import inspect
import re
from typing import Any, Callable, Hashable

import numpy as np

from imgcls_jax import models
from imgcls_jax.errors import UserError
from imgcls_jax.weights import Weights


class Builder:
  """Collects converted tensors under this project's dotted names."""

  def __init__(self, family: str, origin: str):
    """``family`` names the layout in messages, with its source: 'torchvision/timm ResNet'."""
    self.family, self.origin = family, origin
    self.params: dict[str, np.ndarray] = {}
    self.stats: dict[str, np.ndarray] = {}

  def reject(self, key: str, value: np.ndarray) -> None:
    """Raises the error for a tensor the family does not have."""
    raise UserError(f"Tensor '{key}' {tuple(np.shape(value))} in {self.origin} is not part of a "
                    f'{self.family}; only that layout can be imported.')

  def param(self, name: str, value: np.ndarray) -> None:
    """A raw parameter, kept as it is."""
    self.params[name] = np.asarray(value, np.float32)

  def module(self, ours: str, leaf: str, value: np.ndarray, key: str, *,
             linear_from_1x1: bool = False) -> None:
    """The torch tensor ``<module>.<leaf>`` into our module ``ours`` (conv, linear or norm)."""
    value = np.asarray(value, np.float32)
    if leaf == 'num_batches_tracked':
      return
    if leaf in ('running_mean', 'running_var'):
      self.stats[f'{ours}.{leaf[len("running_"):]}'] = value
    elif leaf == 'bias':
      self.params[f'{ours}.bias'] = value
    elif leaf == 'weight' and value.ndim == 4 and linear_from_1x1 and value.shape[2:] == (1, 1):
      self.params[f'{ours}.kernel'] = value[:, :, 0, 0].T               # 1x1 conv as a linear
    elif leaf == 'weight' and value.ndim == 4:
      self.params[f'{ours}.kernel'] = np.transpose(value, (2, 3, 1, 0))  # OIHW -> HWIO
    elif leaf == 'weight' and value.ndim == 2:
      self.params[f'{ours}.kernel'] = value.T                            # (out, in) -> (in, out)
    elif leaf == 'weight' and value.ndim == 1:
      self.params[f'{ours}.scale'] = value                               # BatchNorm / LayerNorm
    else:
      self.reject(key, value)

  def weights(self, required: str,
              model_name: Callable[[dict[str, np.ndarray]], str | None]) -> Weights:
    """The result; ``required`` (one of our names) must be present. ``meta['model']`` is the
    registered model name (``config.model.name``) the tensors fit, as in a checkpoint's meta;
    absent when none does."""
    if required not in self.params:
      raise UserError(f'{self.origin} has no {required} tensor: it is not a complete '
                      f'{self.family} state dict.')
    try:
      name = model_name(self.params)
    except (KeyError, ValueError):  # a tensor the size is read from is missing or odd: no name
      name = None
    return Weights(params=self.params, batch_stats=self.stats, origin=self.origin,
                   meta={'model': name} if name else {})


def split(key: str) -> tuple[str, str]:
  """``'a.b.weight'`` -> ``('a.b', 'weight')``."""
  module, _, leaf = key.rpartition('.')
  return module, leaf


def count(params: dict[str, np.ndarray], pattern: str) -> int:
  """How many distinct values the group of regex ``pattern`` takes over the names in ``params``
  (e.g. the blocks ``blocks\\.(\\d+)\\.``)."""
  return len({m.group(1) for k in params if (m := re.match(pattern, k))})


def registered_name(constructor: Callable[..., Any], facts: Hashable,
                    facts_of: Callable[[dict[str, Any]], Hashable]) -> str | None:
  """The first registered model name (``imgcls_jax.models``) built by ``constructor`` whose
  keywords (a sized name's, over the constructor's defaults) give ``facts_of(keywords) == facts``;
  None when there is none."""
  for name in models.names():
    fn, bound = models.family(name).constructor, {}
    while isinstance(fn, functools.partial):
      bound = {**fn.keywords, **bound}
      fn = fn.func
    if fn is not constructor:
      continue
    init = fn.__init__ if inspect.isclass(fn) else fn
    keywords = {p.name: p.default for p in inspect.signature(init).parameters.values()
                if p.default is not p.empty}
    try:
      if facts_of({**keywords, **bound}) == facts:
        return name
    except (KeyError, TypeError, ValueError):  # a name that lacks an architecture keyword
      continue
  return None
