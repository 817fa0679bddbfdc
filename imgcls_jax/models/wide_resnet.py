"""WideResNet-d-k (Zagoruyko & Komodakis 2016): pre-activation blocks, 3 groups of (d-4)/6 blocks."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from imgcls_jax.errors import UserError
from imgcls_jax.models import layers


class WideBlock(nnx.Module):
  """BN-ReLU-conv3x3-(dropout)-BN-ReLU-conv3x3 with an identity or 1x1 projection shortcut."""

  def __init__(self, in_ch: int, out_ch: int, stride: int, dropout: float, *, dtype: Any,
               rngs: nnx.Rngs):
    self.bn1 = layers.batch_norm(in_ch, dtype=dtype, rngs=rngs)
    self.conv1 = layers.conv(in_ch, out_ch, 3, stride=stride, dtype=dtype, rngs=rngs)
    self.bn2 = layers.batch_norm(out_ch, dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.conv2 = layers.conv(out_ch, out_ch, 3, dtype=dtype, rngs=rngs)
    self.shortcut = (layers.conv(in_ch, out_ch, 1, stride=stride, dtype=dtype, rngs=rngs)
                     if stride != 1 or in_ch != out_ch else None)

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    ura = not train
    o = nnx.relu(self.bn1(x, use_running_average=ura))
    y = self.conv1(o)
    y = nnx.relu(self.bn2(y, use_running_average=ura))
    y = self.dropout(y, deterministic=not train)
    y = self.conv2(y)
    shortcut = x if self.shortcut is None else self.shortcut(o)
    return y + shortcut


class WideResNet(nnx.Module):
  """WRN-``depth``-``width``; ``depth`` = 6n + 4."""

  def __init__(self, *, num_classes: int, in_channels: int, rngs: nnx.Rngs, depth: int = 28,
               width: int = 10, dropout: float = 0.0, dtype: Any = 'float32'):
    if (depth - 4) % 6 != 0 or depth < 10:
      raise UserError(f'WideResNet depth must be 6n+4 (10, 16, 22, 28, 40, ...), got {depth}; '
                      'set config.model.depth accordingly.')
    dtype = layers.as_dtype(dtype)
    n = (depth - 4) // 6
    widths = (16 * width, 32 * width, 64 * width)
    self.stem = layers.conv(in_channels, 16, 3, dtype=dtype, rngs=rngs)
    blocks = []
    ch = 16
    for g, w in enumerate(widths):
      for j in range(n):
        blocks.append(WideBlock(ch, w, 2 if (g > 0 and j == 0) else 1, dropout, dtype=dtype,
                                rngs=rngs))
        ch = w
    self.blocks = nnx.List(blocks)
    self.bn = layers.batch_norm(ch, dtype=dtype, rngs=rngs)
    self.fc = layers.dense(ch, num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, x_BxHxWxC: jax.Array, *, train: bool = False) -> jax.Array:
    x = self.stem(x_BxHxWxC)
    for blk in self.blocks:
      x = blk(x, train)
    x = nnx.relu(self.bn(x, use_running_average=not train))
    return self.fc(layers.global_avg_pool(x)).astype(jnp.float32)


def layer_depths(names: list[str]) -> tuple[dict[str, int], int]:
  """Layer-decay depths: ``stem`` 0, block ``i`` at ``i + 1``; final ``bn`` and ``fc`` on top."""
  return layers.block_depths(names, lambda n: layers.list_index(n, ('blocks',)), stem=('stem',))
