"""A small CNN built to train fast on CPUs (XLA:CPU), for the Fashion-MNIST 5-minute recipe.

Same maths as a plain conv-BN-ReLU network; these choices make its training step about 1.5x
cheaper on XLA:CPU than ``cnn.CNN`` at equal width (measured on 2 cores, see README "Real data"):

- an optional space-to-depth stem (``stem='s2d'``): the 2x2 pixel blocks of the input become
  channels, so no layer runs at full resolution (a 3x3 conv on them sees 6x6 input pixels);
- BatchNorm applied as one per-channel affine map ``x * scale + shift`` (``AffineBatchNorm``): the
  statistics are the usual batch mean and variance, but XLA:CPU differentiates this form several
  times faster than ``(x - mean) * rsqrt(var + eps)``;
- 2x2 max-pooling as a reshape and max, whose gradient is much cheaper on XLA:CPU than
  ``reduce_window``'s select-and-scatter (ties split the gradient instead of routing it to one);
  exports trace the ``reduce_window`` form (``layers.export_forms``).
- optionally (``conv='im2col'``) every 3x3 convolution as im2col patches + one matmul: XLA:CPU's
  filter-gradient convolution is up to 2x slower than the matmul ``patches^T @ dy`` this form
  differentiates into (``benchmarks/conv_paths.py``; benchmarks/NOTES.md, "session 14").

``widths`` lists stages of conv widths, e.g. ``((32, 64), (128,))``: a 2x2 max-pool follows every
stage but the last (and the last too with ``final_pool``); the head flattens (``head='flatten'``)
or averages globally (``head='gap'``), then applies an optional ``hidden``-unit ReLU layer,
dropout and the linear classifier. With ``residual=True`` every conv whose input and output widths
match adds its input back (``x + relu(bn(conv(x)))``, an identity skip), so e.g.
``((16,), (48, 48), (96, 96), (192,))`` has a residual conv after the widening one in its second
and third stages.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from imgcls_jax.errors import UserError
from imgcls_jax.models import layers


class AffineBatchNorm(nnx.Module):
  """BatchNorm (batch statistics in training, running averages in inference) as one affine map.

  Parameters and statistics match ``nnx.BatchNorm`` (``scale``, ``bias``; ``mean``, ``var`` with
  ``running = momentum * running + (1 - momentum) * batch``). The variance is
  ``E[x^2] - E[x]^2`` in float32, as flax's default fast variance. In training it skips the rows
  ``layers.batch_rows`` masks out, as ``layers.batch_norm`` does.
  """

  def __init__(self, ch: int, *, momentum: float = 0.9, epsilon: float = 1e-5):
    self.scale = nnx.Param(jnp.ones((ch,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((ch,), jnp.float32))
    self.mean = nnx.BatchStat(jnp.zeros((ch,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((ch,), jnp.float32))
    self.momentum = momentum
    self.epsilon = epsilon

  def __call__(self, x: jax.Array, *, use_running_average: bool) -> jax.Array:
    if use_running_average:
      mean, var = self.mean[...], self.var[...]
    else:
      # Within layers.batch_rows, over its valid rows only (the running averages stay when a
      # batch has none); otherwise over every row, with no ``where`` traced.
      rows = layers.batch_rows_of(x)
      where, any_valid = rows if rows is not None else (None, None)
      axes = tuple(range(x.ndim - 1))
      xf = x.astype(jnp.float32)
      mean = jnp.mean(xf, axes, where=where)
      var = jnp.maximum(jnp.mean(jnp.square(xf), axes, where=where) - jnp.square(mean), 0.0)
      m = self.momentum
      new_mean = m * self.mean[...] + (1.0 - m) * jax.lax.stop_gradient(mean)
      new_var = m * self.var[...] + (1.0 - m) * jax.lax.stop_gradient(var)
      if rows is not None:
        new_mean = jnp.where(any_valid, new_mean, self.mean[...])
        new_var = jnp.where(any_valid, new_var, self.var[...])
      self.mean[...], self.var[...] = new_mean, new_var
    scale = self.scale[...] * jax.lax.rsqrt(var + self.epsilon)
    shift = self.bias[...] - mean * scale
    return x * scale.astype(x.dtype) + shift.astype(x.dtype)


def max_pool_2x2(x_BxHxWxC: jax.Array) -> jax.Array:
  """2x2 / stride-2 max-pool (a last odd row / column is dropped, as VALID pooling does). Within
  ``layers.export_forms`` it is ``reduce_window`` (the same values), which converters map to their
  max-pool kernel (TFLite's MAX_POOL_2D) rather than a RESHAPE + REDUCE_MAX."""
  if layers.exporting():
    return nnx.max_pool(x_BxHxWxC, (2, 2), strides=(2, 2), padding='VALID')
  b, h, w, c = x_BxHxWxC.shape
  # lax.slice, not x[:, :h - 1]: under a symbolic batch (export) indexing becomes a dynamic
  # gather, which the TFLite converter rejects ('vhlo.dynamic_gather_v1 ... not part of the vhlo
  # support').
  x = jax.lax.slice_in_dim(x_BxHxWxC, 0, h // 2 * 2, axis=1) if h % 2 else x_BxHxWxC
  x = jax.lax.slice_in_dim(x, 0, w // 2 * 2, axis=2) if w % 2 else x
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def space_to_depth(x_BxHxWxC: jax.Array) -> jax.Array:
  """2x2 pixel blocks to channels: BxHxWxC -> Bx(H/2)x(W/2)x4C."""
  b, h, w, c = x_BxHxWxC.shape
  x = x_BxHxWxC.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h // 2, w // 2, 4 * c)


def whitening_stem(x_NxHxWxC: np.ndarray, model: Mapping[str, Any]) -> np.ndarray:
  """The stem patch whitening sees the images through (``models.FirstConv``): space-to-depth
  when ``config.model.stem`` is 's2d' (the default), in numpy (float64 stays float64)."""
  return space_to_depth(x_NxHxWxC) if model.get('stem', 's2d') == 's2d' else x_NxHxWxC


class FastCNN(nnx.Module):
  """Stages of 3x3 conv-BN-ReLU with 2x2 max-pools between them; flatten (or GAP) head."""

  def __init__(self, *, num_classes: int, in_channels: int, rngs: nnx.Rngs,
               widths: Sequence[Sequence[int]] = ((32, 64), (128,)), stem: str = 's2d',
               final_pool: bool = False, head: str = 'flatten', hidden: int = 0,
               dropout: float = 0.0, image_size: int = 28, conv: str = 'xla',
               residual: bool = False, dtype: Any = 'float32'):
    if stem not in ('s2d', 'none'):
      raise UserError(f"fast_cnn stem must be 's2d' or 'none', got '{stem}'; set "
                      'config.model.stem.')
    if head not in ('flatten', 'gap'):
      raise UserError(f"fast_cnn head must be 'flatten' or 'gap', got '{head}'; set "
                      'config.model.head.')
    if conv not in ('xla', 'im2col'):
      raise UserError(f"fast_cnn conv must be 'xla' or 'im2col', got '{conv}'; set "
                      'config.model.conv.')
    dtype = layers.as_dtype(dtype)
    stages = [tuple(s) if isinstance(s, (tuple, list)) else (int(s),) for s in widths]
    self.stem, self.head_kind, self.image_size = stem, head, image_size
    ch, size = (in_channels * 4, image_size // 2) if stem == 's2d' else (in_channels, image_size)
    convs, norms, self.plan = [], [], []
    for i, stage in enumerate(stages):
      for width in stage:
        convs.append(layers.conv(ch, width, 3, dtype=dtype, rngs=rngs, im2col=conv == 'im2col'))
        norms.append(AffineBatchNorm(width))
        self.plan.append('res' if residual and ch == width else 'conv')
        ch = width
      if i < len(stages) - 1 or final_pool:
        self.plan.append('pool')
        size //= 2
    if size < 1:
      raise UserError(f'fast_cnn pools {image_size}-pixel images below 1 pixel; use fewer stages '
                      'or set config.model.image_size to the real input size.')
    self.convs = nnx.List(convs)
    self.norms = nnx.List(norms)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    features = ch * size * size if head == 'flatten' else ch
    self.hidden = layers.dense(features, hidden, dtype=dtype, rngs=rngs) if hidden else None
    self.fc = layers.dense(hidden or features, num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, x_BxHxWxC: jax.Array, *, train: bool = False) -> jax.Array:
    if self.head_kind == 'flatten' and x_BxHxWxC.shape[1:3] != (self.image_size,) * 2:
      raise UserError(f'This fast_cnn was built for {self.image_size}x{self.image_size} images '
                      f'(its flatten head) but got {x_BxHxWxC.shape[1]}x{x_BxHxWxC.shape[2]}; set '
                      "config.model.image_size to the input size (or config.model.head='gap').")
    x = space_to_depth(x_BxHxWxC) if self.stem == 's2d' else x_BxHxWxC
    i = 0
    for step in self.plan:
      if step in ('conv', 'res'):
        y = nnx.relu(self.norms[i](self.convs[i](x), use_running_average=not train))
        x = x + y if step == 'res' else y
        i += 1
      else:
        x = max_pool_2x2(x)
    x = x.reshape(x.shape[0], -1) if self.head_kind == 'flatten' else layers.global_avg_pool(x)
    if self.hidden is not None:
      x = nnx.relu(self.hidden(x))
    x = self.dropout(x, deterministic=not train)
    return self.fc(x).astype(jnp.float32)


def layer_depths(names: list[str]) -> tuple[dict[str, int], int]:
  """Layer-decay depths: conv layer ``i`` (``convs.i``, ``norms.i``) at ``i + 1``; the ``hidden``
  layer and ``fc`` at the top depth (the s2d stem has no parameters)."""
  return layers.block_depths(names, lambda n: layers.list_index(n, ('convs', 'norms')))
