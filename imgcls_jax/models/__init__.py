"""The model table: name -> constructor.

Adding a model family is one new file in this package and one line per name in ``_TABLE``.
Every constructor takes ``num_classes``, ``in_channels``, ``dtype``, ``rngs`` plus its own keyword
arguments (from ``config.model``), and returns an ``nnx.Module`` called as ``model(x, train=...)``
on ``x_BxHxWxC`` float images, returning ``logits_BxK``.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Callable

from flax import nnx

from imgcls_jax.errors import UserError
from imgcls_jax.models import cnn, fast_cnn, resnet, wide_resnet

if TYPE_CHECKING:
  import ml_collections

_TABLE: dict[str, Callable[..., nnx.Module]] = {
    'cnn': cnn.CNN,
    'fast_cnn': fast_cnn.FastCNN,
    'resnet18': functools.partial(resnet.ResNet, stage_sizes=(2, 2, 2, 2), block='basic'),
    'resnet34': functools.partial(resnet.ResNet, stage_sizes=(3, 4, 6, 3), block='basic'),
    'resnet50': functools.partial(resnet.ResNet, stage_sizes=(3, 4, 6, 3), block='bottleneck'),
    'resnet101': functools.partial(resnet.ResNet, stage_sizes=(3, 4, 23, 3), block='bottleneck'),
    'resnet152': functools.partial(resnet.ResNet, stage_sizes=(3, 8, 36, 3), block='bottleneck'),
    'resnet200': functools.partial(resnet.ResNet, stage_sizes=(3, 24, 36, 3), block='bottleneck'),
    'wide_resnet': wide_resnet.WideResNet,
}


def names() -> list[str]:
  """All registered model names."""
  return sorted(_TABLE)


def get(name: str, **kwargs: Any) -> nnx.Module:
  """Builds the model registered as ``name`` with constructor ``kwargs``."""
  if name not in _TABLE:
    raise UserError(f"Unknown model '{name}'; set config.model.name to one of: {', '.join(names())}.")
  try:
    return _TABLE[name](**kwargs)
  except TypeError as e:
    raise UserError(f"Bad arguments for model '{name}' ({e}); check the config.model keys.") from None


def from_config(config: ml_collections.ConfigDict, num_classes: int,
                in_channels: int) -> Callable[..., nnx.Module]:
  """``rngs -> model`` for ``config.model`` (every key but ``name`` goes to the constructor)."""
  kwargs = {k: v for k, v in config.model.items() if k != 'name'}
  return functools.partial(get, config.model.name, num_classes=num_classes,
                           in_channels=in_channels, dtype=config.dtype, **kwargs)
