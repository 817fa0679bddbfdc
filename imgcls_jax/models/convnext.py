"""ConvNeXt (Liu et al. 2022), torchvision's layout: a 4x4/4 patchify stem, four stages of blocks
(7x7 depthwise conv -> LayerNorm -> 4x MLP -> layer scale, under drop-path) with LayerNorm +
2x2/2 conv downsampling between stages, final LayerNorm and linear ``head``.

``stem_patch`` (4 in the paper) may be lowered for small images: at 28 px, 2 gives a 14x14 first
stage and 1x1 last stage. Weights import from torchvision / timm files (``torch_import.convnext``).
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from imgcls_jax.errors import UserError
from imgcls_jax.models import layers

_trunc = nnx.initializers.truncated_normal(0.02)


def _conv(in_ch: int, out_ch: int, kernel: int, stride: int, *, groups: int = 1, pad: int = 0,
          dtype: Any, rngs: nnx.Rngs) -> nnx.Conv:
  return nnx.Conv(in_ch, out_ch, (kernel, kernel), strides=(stride, stride),
                  padding=((pad, pad), (pad, pad)), feature_group_count=groups, use_bias=True,
                  kernel_init=_trunc, dtype=dtype, param_dtype=jnp.float32,
                  conv_general_dilated=layers.conv_general_dilated, rngs=rngs)


def _linear(in_f: int, out_f: int, *, dtype: Any, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(in_f, out_f, kernel_init=_trunc, dtype=dtype, param_dtype=jnp.float32,
                    rngs=rngs)


class Block(nnx.Module):
  """``x + drop_path(layer_scale * pwconv2(gelu(pwconv1(norm(dwconv(x))))))``."""

  def __init__(self, ch: int, drop_path_rate: float, layer_scale: float, *, dtype: Any,
               rngs: nnx.Rngs):
    self.dwconv = _conv(ch, ch, 7, 1, groups=ch, pad=3, dtype=dtype, rngs=rngs)
    self.norm = layers.layer_norm(ch, dtype=dtype, rngs=rngs)
    self.pwconv1 = _linear(ch, 4 * ch, dtype=dtype, rngs=rngs)
    self.pwconv2 = _linear(4 * ch, ch, dtype=dtype, rngs=rngs)
    self.layer_scale = nnx.Param(jnp.full((ch,), layer_scale, jnp.float32))
    self.drop_path = layers.drop_path(drop_path_rate, ndim=4, rngs=rngs)

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    y = layers.linear(self.pwconv1, self.norm(self.dwconv(x)))
    y = layers.linear(self.pwconv2, layers.gelu(y))
    y = y * self.layer_scale[...].astype(y.dtype)
    return x + layers.apply_drop_path(self.drop_path, y, train)


class NormConv(nnx.Module):
  """LayerNorm then a strided conv (``stem``: conv then norm, ``norm_first=False``)."""

  def __init__(self, in_ch: int, out_ch: int, kernel: int, *, norm_first: bool, dtype: Any,
               rngs: nnx.Rngs):
    self.norm_first = norm_first
    self.norm = layers.layer_norm(in_ch if norm_first else out_ch, dtype=dtype, rngs=rngs)
    self.conv = _conv(in_ch, out_ch, kernel, kernel, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(self.norm(x)) if self.norm_first else self.norm(self.conv(x))


class ConvNeXt(nnx.Module):
  """ConvNeXt with ``depths[i]`` blocks of ``widths[i]`` channels in stage ``i``."""

  def __init__(self, *, num_classes: int, in_channels: int, rngs: nnx.Rngs,
               depths: Sequence[int], widths: Sequence[int], drop_path_rate: float = 0.0,
               layer_scale: float = 1e-6, stem_patch: int = 4, dtype: Any = 'float32'):
    if len(depths) != len(widths) or not depths:
      raise UserError(f'config.model.depths {tuple(depths)} and widths {tuple(widths)} must be '
                      'non-empty and of equal length (one per stage).')
    if stem_patch < 1:
      raise UserError(f'config.model.stem_patch={stem_patch} must be >= 1.')
    dtype = layers.as_dtype(dtype)
    self.stem = NormConv(in_channels, widths[0], stem_patch, norm_first=False, dtype=dtype,
                         rngs=rngs)
    rates = iter(layers.drop_path_rates(drop_path_rate, sum(depths)))
    self.stages = nnx.List([
        nnx.List([Block(w, next(rates), layer_scale, dtype=dtype, rngs=rngs) for _ in range(n)])
        for n, w in zip(depths, widths)])
    self.downsample = nnx.List([
        NormConv(widths[i], widths[i + 1], 2, norm_first=True, dtype=dtype, rngs=rngs)
        for i in range(len(widths) - 1)])
    self.norm = layers.layer_norm(widths[-1], dtype=dtype, rngs=rngs)
    self.head = _linear(widths[-1], num_classes, dtype=dtype, rngs=rngs)

  def features(self, x_BxHxWxC: jax.Array, *, train: bool = False) -> jax.Array:
    """Pooled, normalised features ``feat_BxD``."""
    x = self.stem(x_BxHxWxC)
    for i, stage in enumerate(self.stages):
      if i > 0:
        if min(x.shape[1:3]) < 2:
          raise UserError(f'The input is too small for {len(self.stages)} ConvNeXt stages (stage '
                          f'{i + 1} gets {x.shape[1]}x{x.shape[2]}); lower '
                          'config.model.stem_patch or use larger images.')
        x = self.downsample[i - 1](x)
      for block in stage:
        x = block(x, train)
    return self.norm(layers.global_avg_pool(x))

  def __call__(self, x_BxHxWxC: jax.Array, *, train: bool = False) -> jax.Array:
    return self.head(self.features(x_BxHxWxC, train=train)).astype(jnp.float32)


# name -> (depths, widths, torchvision's default stochastic-depth rate)
SIZES = {
    'convnext_tiny': ((3, 3, 9, 3), (96, 192, 384, 768), 0.1),
    'convnext_small': ((3, 3, 27, 3), (96, 192, 384, 768), 0.4),
    'convnext_base': ((3, 3, 27, 3), (128, 256, 512, 1024), 0.5),
}

_BLOCK = re.compile(r'^stages\.(\d+)\.(\d+)\.')
_DOWN = re.compile(r'^downsample\.(\d+)\.')


def layer_depths(names: list[str]) -> tuple[dict[str, int], int]:
  """Layer-decay depths: ``stem`` 0, then downsampling layers and blocks in network order
  (one depth each), the final ``norm`` and ``head`` at the top."""
  def block_of(name: str) -> tuple[int, int] | None:
    if m := _BLOCK.match(name):
      return int(m.group(1)), int(m.group(2))
    if m := _DOWN.match(name):
      return int(m.group(1)) + 1, -1
    return None
  return layers.block_depths(names, block_of, stem=('stem',))
