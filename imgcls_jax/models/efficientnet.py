"""EfficientNet B0-B3 (Tan & Le 2019), torchvision's layout: MBConv blocks with squeeze-excitation
and SiLU, compound scaling of widths (``width_mult``, rounded to multiples of 8) and depths
(``depth_mult``, rounded up), stochastic depth growing to ``drop_path_rate`` over the blocks
(torchvision's rule ``rate * i / n``), dropout before the linear ``head``.

Parameters: ``stem`` (3x3/2 conv-BN-SiLU), ``blocks.<i>`` (``expand``, ``dwconv``, ``se``,
``project``), ``head_conv`` (1x1 conv-BN-SiLU to 4x the last width), ``head``.
``small_inputs=True`` makes the stem stride 1, for 8-32 px images.
"""
from __future__ import annotations

import math
import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from imgcls_jax.models import layers

# The B0 stages: (expand ratio, kernel, stride, in channels, out channels, blocks).
B0_STAGES = ((1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2),
             (6, 3, 2, 40, 80, 3), (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4),
             (6, 3, 1, 192, 320, 1))
# name -> (width_mult, depth_mult, dropout before the head); torchvision's values.
SIZES = {'efficientnet_b0': (1.0, 1.0, 0.2), 'efficientnet_b1': (1.0, 1.1, 0.2),
         'efficientnet_b2': (1.1, 1.2, 0.3), 'efficientnet_b3': (1.2, 1.4, 0.3)}


class EfficientNet(nnx.Module):
  """EfficientNet scaled by ``width_mult`` / ``depth_mult`` from B0."""

  def __init__(self, *, num_classes: int, in_channels: int, rngs: nnx.Rngs,
               width_mult: float = 1.0, depth_mult: float = 1.0, dropout: float = 0.2,
               drop_path_rate: float = 0.2, small_inputs: bool = False, dtype: Any = 'float32'):
    layers.check_drop_path_rate(drop_path_rate)   # as given (each block's is scaled down)
    layers.check_positive(width_mult=width_mult, depth_mult=depth_mult)
    dtype = layers.as_dtype(dtype)
    ch = lambda c: layers.make_divisible(c * width_mult, 8)  # noqa: E731
    stages = [(e, k, s, ch(cin), ch(cout), int(math.ceil(n * depth_mult)))
              for e, k, s, cin, cout, n in B0_STAGES]
    total = sum(st[-1] for st in stages)
    self.stem = layers.ConvNormAct(in_channels, stages[0][3], 3, stride=1 if small_inputs else 2,
                                   act='silu', dtype=dtype, rngs=rngs)
    blocks = []
    for expand, kernel, stride, cin, cout, n in stages:
      for j in range(n):
        block_in = cin if j == 0 else cout
        blocks.append(layers.InvertedResidual(
            block_in, layers.make_divisible(block_in * expand, 8), cout, kernel,
            stride if j == 0 else 1, act='silu', se_ch=max(1, block_in // 4), se_act='silu',
            se_gate='sigmoid', bn_eps=1e-5, bn_momentum=0.9,
            drop_path_rate=drop_path_rate * len(blocks) / total, dtype=dtype, rngs=rngs))
    self.blocks = nnx.List(blocks)
    last = stages[-1][4]
    self.head_conv = layers.ConvNormAct(last, 4 * last, 1, act='silu', dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.head = layers.dense(4 * last, num_classes, dtype=dtype, rngs=rngs)

  def features(self, x_BxHxWxC: jax.Array, *, train: bool = False) -> jax.Array:
    """Pooled penultimate features ``feat_BxD``."""
    x = self.stem(x_BxHxWxC, train)
    for block in self.blocks:
      x = block(x, train)
    return layers.global_avg_pool(self.head_conv(x, train))

  def __call__(self, x_BxHxWxC: jax.Array, *, train: bool = False) -> jax.Array:
    x = self.dropout(self.features(x_BxHxWxC, train=train), deterministic=not train)
    return self.head(x).astype(jnp.float32)


_BLOCK_PARAM = re.compile(r'^blocks\.(\d+)\.')


def block_of(name: str) -> int | None:
  """The index of the block holding a parameter ``blocks.<i>...`` (None outside blocks)."""
  m = _BLOCK_PARAM.match(name)
  return int(m.group(1)) if m else None


def layer_depths(names: list[str]) -> tuple[dict[str, int], int]:
  """Layer-decay depths: ``stem`` 0, block ``i`` at ``i + 1``; ``head_conv`` and ``head`` on top."""
  return layers.block_depths(names, block_of, stem=('stem',))
