"""A small VGG-style CNN: stages of (conv3x3-BN-ReLU) x depth, 2x2 max-pool between stages."""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from imgcls_jax.models import layers


class CNN(nnx.Module):
  """Stages of ``convs_per_stage`` 3x3 convolutions at ``widths``; global average pool; linear head."""

  def __init__(self, *, num_classes: int, in_channels: int, rngs: nnx.Rngs,
               widths: Sequence[int] = (32, 64, 128), convs_per_stage: int = 2,
               dropout: float = 0.0, dtype: Any = 'float32'):
    dtype = layers.as_dtype(dtype)
    if not widths or convs_per_stage < 1 or min(widths) < 1:
      raise ValueError(f'widths={tuple(widths)} and convs_per_stage={convs_per_stage} must give '
                       'at least one convolution of at least one channel per stage')
    convs, norms = [], []
    ch = in_channels
    for width in widths:
      for _ in range(convs_per_stage):
        convs.append(layers.conv(ch, width, 3, dtype=dtype, rngs=rngs))
        norms.append(layers.batch_norm(width, dtype=dtype, rngs=rngs))
        ch = width
    self.convs = nnx.List(convs)
    self.norms = nnx.List(norms)
    self.convs_per_stage = convs_per_stage
    self.num_stages = len(widths)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.head = layers.dense(ch, num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, x_BxHxWxC: jax.Array, *, train: bool = False) -> jax.Array:
    x = x_BxHxWxC
    for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
      x = nnx.relu(norm(conv(x), use_running_average=not train))
      last_in_stage = (i + 1) % self.convs_per_stage == 0
      stage = i // self.convs_per_stage
      if last_in_stage and stage < self.num_stages - 1 and min(x.shape[1:3]) >= 2:
        x = nnx.max_pool(x, (2, 2), strides=(2, 2))
    x = layers.global_avg_pool(x)
    x = self.dropout(x, deterministic=not train)
    return self.head(x).astype(jnp.float32)


def layer_depths(names: list[str]) -> tuple[dict[str, int], int]:
  """Layer-decay depths: conv layer ``i`` (``convs.i``, ``norms.i``) at ``i + 1``; head on top."""
  return layers.block_depths(names, lambda n: layers.list_index(n, ('convs', 'norms')))
