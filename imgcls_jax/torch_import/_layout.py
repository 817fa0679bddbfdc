"""PyTorch -> Flax tensor layouts, shared by the per-family converters.

Convolutions OIHW -> HWIO, linear (out, in) -> (in, out), norm ``weight`` -> ``scale``, BatchNorm
``running_mean`` / ``running_var`` -> batch statistics ``mean`` / ``var``; ``num_batches_tracked``
is dropped.
"""
from __future__ import annotations

import numpy as np

from imgcls_jax.errors import UserError
from imgcls_jax.weights import Weights


class Builder:
  """Collects converted tensors under this project's dotted names."""

  def __init__(self, family: str, origin: str):
    self.family, self.origin = family, origin
    self.params: dict[str, np.ndarray] = {}
    self.stats: dict[str, np.ndarray] = {}

  def reject(self, key: str, value: np.ndarray) -> None:
    """Raises the error for a tensor the family does not have."""
    raise UserError(f"Tensor '{key}' {tuple(np.shape(value))} in {self.origin} is not part of a "
                    f'torchvision/timm {self.family}; only that layout can be imported.')

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

  def weights(self, required: str) -> Weights:
    """The result; ``required`` (one of our names) must be present."""
    if required not in self.params:
      raise UserError(f'{self.origin} has no {required} tensor: it is not a complete '
                      f'torchvision/timm {self.family} state dict.')
    return Weights(params=self.params, batch_stats=self.stats, origin=self.origin)


def split(key: str) -> tuple[str, str]:
  """``'a.b.weight'`` -> ``('a.b', 'weight')``."""
  module, _, leaf = key.rpartition('.')
  return module, leaf
