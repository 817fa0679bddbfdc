"""MobileNetV3 small / large (Howard et al. 2019), torchvision's layout: inverted residual blocks
with ReLU or hard-swish, optional squeeze-excitation with a hard-sigmoid gate, BatchNorm (eps 1e-3,
PyTorch momentum 0.01), a 1x1 conv to 6x the last width, then ``pre_logits`` (linear + hard-swish
+ dropout) and the linear ``head``.

Parameters: ``stem``, ``blocks.<i>`` (``expand``, ``dwconv``, ``se``, ``project``), ``last_conv``,
``pre_logits``, ``head``. ``width_mult`` scales every width to a multiple of 8 (``scaled``),
the ``pre_logits`` width ``last_channel`` (1024 small, 1280 large) included, as torchvision's
``mobilenet_v3_*(width_mult=...)`` does, so that its weights at any ``width_mult`` import;
``small_inputs=True`` makes the stem stride 1, for 8-32 px images.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from imgcls_jax.errors import UserError
from imgcls_jax.models import efficientnet, layers

# (in, kernel, expanded, out, squeeze-excite, activation, stride) per block; torchvision's tables.
LARGE = ((16, 3, 16, 16, False, 'relu', 1), (16, 3, 64, 24, False, 'relu', 2),
         (24, 3, 72, 24, False, 'relu', 1), (24, 5, 72, 40, True, 'relu', 2),
         (40, 5, 120, 40, True, 'relu', 1), (40, 5, 120, 40, True, 'relu', 1),
         (40, 3, 240, 80, False, 'hardswish', 2), (80, 3, 200, 80, False, 'hardswish', 1),
         (80, 3, 184, 80, False, 'hardswish', 1), (80, 3, 184, 80, False, 'hardswish', 1),
         (80, 3, 480, 112, True, 'hardswish', 1), (112, 3, 672, 112, True, 'hardswish', 1),
         (112, 5, 672, 160, True, 'hardswish', 2), (160, 5, 960, 160, True, 'hardswish', 1),
         (160, 5, 960, 160, True, 'hardswish', 1))
SMALL = ((16, 3, 16, 16, True, 'relu', 2), (16, 3, 72, 24, False, 'relu', 2),
         (24, 3, 88, 24, False, 'relu', 1), (24, 5, 96, 40, True, 'hardswish', 2),
         (40, 5, 240, 40, True, 'hardswish', 1), (40, 5, 240, 40, True, 'hardswish', 1),
         (40, 5, 120, 48, True, 'hardswish', 1), (48, 5, 144, 48, True, 'hardswish', 1),
         (48, 5, 288, 96, True, 'hardswish', 2), (96, 5, 576, 96, True, 'hardswish', 1),
         (96, 5, 576, 96, True, 'hardswish', 1))
# name -> (block table, width of pre_logits at width_mult 1)
SIZES = {'mobilenet_v3_small': ('small', 1024), 'mobilenet_v3_large': ('large', 1280)}
_TABLES = {'small': SMALL, 'large': LARGE}
_BN = dict(bn_eps=1e-3, bn_momentum=0.99)


def scaled(channels: int, width_mult: float) -> int:
  """A width of the tables (or ``last_channel``) at ``width_mult``: torchvision's
  ``adjust_channels``, the nearest multiple of 8."""
  return layers.make_divisible(channels * width_mult, 8)


class MobileNetV3(nnx.Module):
  """MobileNetV3 ``arch`` ('small' or 'large') at ``width_mult``; ``last_channel`` is the
  ``pre_logits`` width before scaling (torchvision's 1024 / 1280 at width_mult 1), so that the
  model at any ``width_mult`` has torchvision's shapes."""

  def __init__(self, *, num_classes: int, in_channels: int, rngs: nnx.Rngs, arch: str,
               last_channel: int, width_mult: float = 1.0, dropout: float = 0.2,
               small_inputs: bool = False, dtype: Any = 'float32'):
    if arch not in _TABLES:
      raise UserError(f"config.model.arch='{arch}' is not one of {', '.join(_TABLES)}.")
    layers.check_positive(width_mult=width_mult, last_channel=last_channel)
    dtype = layers.as_dtype(dtype)
    ch = lambda c: scaled(c, width_mult)  # noqa: E731
    table = _TABLES[arch]
    self.stem = layers.ConvNormAct(in_channels, ch(16), 3, stride=1 if small_inputs else 2,
                                   act='hardswish', dtype=dtype, rngs=rngs, **_BN)
    self.blocks = nnx.List([
        layers.InvertedResidual(ch(cin), ch(exp), ch(cout), kernel, stride, act=act,
                                se_ch=layers.make_divisible(ch(exp) // 4, 8) if se else 0,
                                se_act='relu', se_gate='hardsigmoid', drop_path_rate=0.0,
                                dtype=dtype, rngs=rngs, **_BN)
        for cin, kernel, exp, cout, se, act, stride in table])
    last_in = ch(table[-1][3])
    self.last_conv = layers.ConvNormAct(last_in, 6 * last_in, 1, act='hardswish', dtype=dtype,
                                        rngs=rngs, **_BN)
    self.pre_logits = layers.dense(6 * last_in, ch(last_channel), dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.head = layers.dense(ch(last_channel), num_classes, dtype=dtype, rngs=rngs)

  def features(self, x_BxHxWxC: jax.Array, *, train: bool = False) -> jax.Array:
    """Pooled output of the last conv ``feat_BxD``."""
    x = self.stem(x_BxHxWxC, train)
    for block in self.blocks:
      x = block(x, train)
    return layers.global_avg_pool(self.last_conv(x, train))

  def __call__(self, x_BxHxWxC: jax.Array, *, train: bool = False) -> jax.Array:
    x = jax.nn.hard_swish(self.pre_logits(self.features(x_BxHxWxC, train=train)))
    x = self.dropout(x, deterministic=not train)
    return self.head(x).astype(jnp.float32)


def layer_depths(names: list[str]) -> tuple[dict[str, int], int]:
  """Layer-decay depths: ``stem`` 0, block ``i`` at ``i + 1``; ``last_conv``, ``pre_logits`` and
  ``head`` on top."""
  return layers.block_depths(names, efficientnet.block_of, stem=('stem',))
