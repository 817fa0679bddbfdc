"""ResNet v1.5 (torchvision layout): stride on the 3x3 conv, last BN of each block zero-initialised.

Attribute names follow torchvision (conv1, bn1, layer1..layer4, downsample, fc) so that weights
published in that layout map one to one. ``small_inputs=True`` swaps the 7x7/2 stem and max-pool for
a 3x3/1 stem, for 8-32 px images.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from imgcls_jax.errors import UserError
from imgcls_jax.models import layers


class Downsample(nnx.Module):
  """Projection shortcut: 1x1 conv (strided) + BN."""

  def __init__(self, in_ch: int, out_ch: int, stride: int, *, dtype: Any, rngs: nnx.Rngs):
    self.conv = layers.conv(in_ch, out_ch, 1, stride=stride, dtype=dtype, rngs=rngs)
    self.bn = layers.batch_norm(out_ch, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    return self.bn(self.conv(x), use_running_average=not train)


class _ResidualBlock(nnx.Module):
  """``relu(layers(x) + shortcut(x))``: conv-BN layers ``conv1, bn1, conv2, bn2, ...`` with a ReLU
  between them; the last BN's scale starts at zero, so a new block computes relu(shortcut(x))."""
  expansion = 1

  @staticmethod
  def layer_specs(in_ch: int, width: int, out_ch: int,
                  stride: int) -> list[tuple[int, int, int, int]]:
    """(in channels, out channels, kernel, stride) of each conv layer."""
    raise NotImplementedError

  def __init__(self, in_ch: int, width: int, stride: int, *, dtype: Any, rngs: nnx.Rngs,
               drop_path_rate: float = 0.0):
    out_ch = width * self.expansion
    specs = self.layer_specs(in_ch, width, out_ch, stride)
    for i, (cin, cout, kernel, s) in enumerate(specs, start=1):
      setattr(self, f'conv{i}', layers.conv(cin, cout, kernel, stride=s, dtype=dtype, rngs=rngs))
      setattr(self, f'bn{i}', layers.batch_norm(cout, dtype=dtype, rngs=rngs,
                                                zero_scale=i == len(specs)))
    self.num_layers = len(specs)
    self.downsample = (Downsample(in_ch, out_ch, stride, dtype=dtype, rngs=rngs)
                       if stride != 1 or in_ch != out_ch else None)
    self.drop_path = layers.drop_path(drop_path_rate, ndim=4, rngs=rngs)

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    y = x
    for i in range(1, self.num_layers + 1):
      y = getattr(self, f'bn{i}')(getattr(self, f'conv{i}')(y), use_running_average=not train)
      if i < self.num_layers:
        y = nnx.relu(y)
    shortcut = x if self.downsample is None else self.downsample(x, train)
    return nnx.relu(layers.apply_drop_path(self.drop_path, y, train) + shortcut)


class BasicBlock(_ResidualBlock):
  """Two 3x3 convs (ResNet-18/34)."""
  expansion = 1

  @staticmethod
  def layer_specs(in_ch: int, width: int, out_ch: int,
                  stride: int) -> list[tuple[int, int, int, int]]:
    return [(in_ch, width, 3, stride), (width, out_ch, 3, 1)]


class Bottleneck(_ResidualBlock):
  """1x1 reduce, 3x3 (strided: v1.5), 1x1 expand x4 (ResNet-50 and deeper)."""
  expansion = 4

  @staticmethod
  def layer_specs(in_ch: int, width: int, out_ch: int,
                  stride: int) -> list[tuple[int, int, int, int]]:
    return [(in_ch, width, 1, 1), (width, width, 3, stride), (width, out_ch, 1, 1)]


_BLOCKS = {'basic': BasicBlock, 'bottleneck': Bottleneck}


class ResNet(nnx.Module):
  """ResNet v1.5 with ``stage_sizes`` blocks per stage at widths ``width * 2**i``; stochastic
  depth on each residual branch rising linearly from 0 to ``drop_path_rate`` over the blocks."""

  def __init__(self, *, num_classes: int, in_channels: int, rngs: nnx.Rngs,
               stage_sizes: Sequence[int], block: str, width: int = 64,
               small_inputs: bool = False, drop_path_rate: float = 0.0,
               dtype: Any = 'float32'):
    if block not in _BLOCKS:
      raise UserError(f"config.model.block={block!r} is not one of {', '.join(_BLOCKS)}.")
    dtype = layers.as_dtype(dtype)
    block_cls = _BLOCKS[block]
    rates = iter(layers.drop_path_rates(drop_path_rate, sum(stage_sizes)))
    self.small_inputs = small_inputs
    stem_kernel, stem_stride = (3, 1) if small_inputs else (7, 2)
    self.conv1 = layers.conv(in_channels, width, stem_kernel, stride=stem_stride, dtype=dtype,
                             rngs=rngs)
    self.bn1 = layers.batch_norm(width, dtype=dtype, rngs=rngs)
    ch = width
    for i, n in enumerate(stage_sizes):
      blocks = []
      for j in range(n):
        stride = 2 if (i > 0 and j == 0) else 1
        blocks.append(block_cls(ch, width * 2**i, stride, dtype=dtype, rngs=rngs,
                                drop_path_rate=next(rates)))
        ch = width * 2**i * block_cls.expansion
      setattr(self, f'layer{i + 1}', nnx.List(blocks))
    self.num_stages = len(stage_sizes)
    self.fc = layers.dense(ch, num_classes, dtype=dtype, rngs=rngs)

  def features(self, x_BxHxWxC: jax.Array, *, train: bool = False) -> jax.Array:
    """Pooled penultimate features ``feat_BxD``."""
    x = nnx.relu(self.bn1(self.conv1(x_BxHxWxC), use_running_average=not train))
    if not self.small_inputs:
      x = layers.max_pool_3x3_s2(x)
    for i in range(self.num_stages):
      for blk in getattr(self, f'layer{i + 1}'):
        x = blk(x, train)
    return layers.global_avg_pool(x)

  def __call__(self, x_BxHxWxC: jax.Array, *, train: bool = False) -> jax.Array:
    return self.fc(self.features(x_BxHxWxC, train=train)).astype(jnp.float32)


_BLOCK_PARAM = re.compile(r'^layer(\d+)\.(\d+)\.')


def layer_depths(names: list[str]) -> tuple[dict[str, int], int]:
  """Layer-decay depths: stem (``conv1``, ``bn1``) 0, the blocks of ``layer1..4`` 1..n in order,
  ``fc`` at the top depth n + 1."""
  def block_of(name: str) -> tuple[int, int] | None:
    m = _BLOCK_PARAM.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None
  return layers.block_depths(names, block_of, stem=('conv1', 'bn1'))
