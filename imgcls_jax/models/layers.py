"""Small building blocks shared by the model families."""
from __future__ import annotations

import contextlib
import contextvars
import functools
import itertools
from typing import Any, Callable, Collection, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from imgcls_jax.errors import UserError

# He (Kaiming) normal on fan_out, as torchvision initialises ResNet convolutions.
conv_init = nnx.initializers.variance_scaling(2.0, 'fan_out', 'normal')


_EXPORT_FORMS = contextvars.ContextVar('export_forms', default=False)


@contextlib.contextmanager
def export_forms() -> Iterator[None]:
  """Within it, layers written in a form chosen for XLA:CPU training speed are traced in the
  standard form other runtimes have kernels for (same parameters, same maths): convolutions built
  with ``im2col=True`` as ``lax`` convolutions, and fast_cnn's reshape-and-max 2x2 pooling as a
  ``reduce_window`` max-pool. Exports trace inside it, so that the TFLite converter sees one
  CONV_2D per layer (into which it folds the BatchNorm that follows) instead of tens of slices and
  a matmul, and one MAX_POOL_2D instead of RESHAPE + REDUCE_MAX. Forms that would not convert
  change too: the im2col of an input smaller than its kernel ends in a 1x1 convolution, not a
  rank-4 matmul; ``linear`` flattens its input; ``gelu`` takes a select-free erf."""
  token = _EXPORT_FORMS.set(True)
  try:
    yield
  finally:
    _EXPORT_FORMS.reset(token)


def exporting() -> bool:
  """Whether the caller traces inside ``export_forms``."""
  return _EXPORT_FORMS.get()


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None,
                         *, im2col: bool = False, **kwargs) -> jax.Array:
  """``lax.conv_general_dilated``, but a plain stride-1 NHWC conv is computed as im2col patches +
  one matmul when its input is spatially smaller than its kernel (e.g. 3x3 on a 2x2 map), or
  always with ``im2col=True`` (except under a symbolic batch dimension or within
  ``export_forms``, i.e. in an export).

  Same maths (only the summation order differs). XLA:CPU otherwise takes a slow path for the small
  inputs (58-65 ms vs 1.3 ms per layer measured on 2 cores; benchmarks/NOTES.md), and its
  filter-gradient convolution is up to 2x slower than the matmul ``patches^T @ dy`` that the im2col
  form differentiates into (benchmarks/NOTES.md, "session 14"). Strided, dilated or grouped convs
  always go to ``lax``.
  """
  kh, kw, cin, cout = rhs.shape
  h, w = lhs.shape[1:3]
  plain = (tuple(window_strides) == (1, 1) and feature_group_count == 1
           and not isinstance(padding, str)
           and all(d in (None, 1) or tuple(d) == (1, 1) for d in (lhs_dilation, rhs_dilation))
           and lhs.ndim == 4 and lhs.shape[-1] == cin)
  # A symbolic (export-polymorphic) batch keeps lax for inputs the kernel fits: its im2col would
  # be a selection matmul as large as (h * w) x (h * w * kh * kw) in the exported model.
  im2col = im2col and isinstance(lhs.shape[0], int) and not exporting()
  if not plain or (not im2col and h >= kh and w >= kw):
    return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                        rhs_dilation, dimension_numbers, feature_group_count,
                                        precision=precision, **kwargs)
  (pt, pb), (pl, pr) = padding
  if isinstance(lhs.shape[0], int):
    xp = jnp.pad(lhs, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    ho, wo = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
    patches = jnp.concatenate([xp[:, i:i + ho, j:j + wo, :] for i in range(kh)
                               for j in range(kw)], axis=-1)
  else:  # a symbolic (export-polymorphic) batch: slicing it lowers to gathers TFLite lacks
    patches = _patches_by_selection(lhs, kh, kw, (pt, pb), (pl, pr))
  out_sharding = kwargs.pop('out_sharding', None)
  del out_sharding  # single-device layout detail; the batch dim keeps its sharding through matmul
  if exporting():  # the patches' 1x1 convolution: the TFLite converter's rank-4 BATCH_MATMUL
    # of a 1x1 map fails ('tfl.batch_matmul' op found invalid output rank), a CONV_2D converts
    return jax.lax.conv_general_dilated(patches, rhs.reshape(1, 1, kh * kw * cin, cout), (1, 1),
                                        'VALID', dimension_numbers=dimension_numbers,
                                        precision=precision, **kwargs)
  return jnp.matmul(patches, rhs.reshape(kh * kw * cin, cout), precision=precision,
                    preferred_element_type=kwargs.get('preferred_element_type'))


def linear(module: nnx.Linear, x: jax.Array) -> jax.Array:
  """``module(x)``; within ``export_forms`` an input of rank > 2 goes through it as a matrix (one
  reshape before, one after; same parameters, same maths): at a fixed batch the TFLite converter
  fails on a rank-4 matmul over a 1x1 map ('tfl.batch_matmul' op found invalid output rank)."""
  if not exporting() or x.ndim <= 2:
    return module(x)
  y = module(x.reshape(-1, x.shape[-1]))
  return y.reshape(*x.shape[:-1], y.shape[-1])


# erf(x) ~ x P(x^2) / Q(x^2) on [-4, 4] (+-1 beyond, in float32): Eigen's and XLA's float32 erf.
_ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06,
          -5.69250639462346e-05, -7.34990630326855e-04, -2.95459980854025e-03,
          -1.60960333262415e-02)
_ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03,
          -7.37332916720468e-03, -1.42647390514189e-02)


def _erf(x: jax.Array) -> jax.Array:
  """erf in clamp, multiply, add and divide ops only (no select, no exp)."""
  x = jnp.clip(x, -4.0, 4.0)
  x2 = x * x
  p = functools.reduce(lambda a, c: a * x2 + c, _ERF_P[1:], jnp.full_like(x, _ERF_P[0]))
  q = functools.reduce(lambda a, c: a * x2 + c, _ERF_Q[1:], jnp.full_like(x, _ERF_Q[0]))
  return x * p / q


def gelu(x: jax.Array) -> jax.Array:
  """Exact (erf) GELU. Within ``export_forms`` as ``x (1 + erf(x / sqrt 2)) / 2`` with a rational
  erf: JAX's ``erfc`` form has a branch that overflows to inf for large inputs, which a SELECT
  leaves unused but tf2onnx turns into arithmetic (inf * 0: NaN in the ONNX model), and
  ``lax.erf`` exported as a composite op that the TFLite converter (TF 2.21) could not read."""
  if not exporting():
    return nnx.gelu(x, approximate=False)
  return x * (1 + _erf(x * np.sqrt(0.5).astype(x.dtype))) * np.asarray(0.5, x.dtype)


def _patches_by_selection(lhs: jax.Array, kh: int, kw: int, pad_h: tuple[int, int],
                          pad_w: tuple[int, int]) -> jax.Array:
  """The same im2col patches as a 0/1 selection matmul (each entry is one input pixel or a zero
  pad), free of slices of the batch dimension."""
  h, w, cin = lhs.shape[1:]
  ho, wo = h + sum(pad_h) - kh + 1, w + sum(pad_w) - kw + 1
  select = np.zeros((h * w, ho * wo * kh * kw), np.float32)
  for oh, ow, i, j in itertools.product(range(ho), range(wo), range(kh), range(kw)):
    y, x = oh + i - pad_h[0], ow + j - pad_w[0]
    if 0 <= y < h and 0 <= x < w:
      select[y * w + x, ((oh * wo + ow) * kh + i) * kw + j] = 1.0
  patches = jnp.einsum('bpc,pq->bqc', lhs.reshape(lhs.shape[0], h * w, cin),
                       jnp.asarray(select, lhs.dtype), precision=jax.lax.Precision.HIGHEST)
  return patches.reshape(lhs.shape[0], ho, wo, kh * kw * cin)


def conv(in_ch: int, out_ch: int, kernel: int, *, stride: int = 1, dtype: Any, rngs: nnx.Rngs,
         use_bias: bool = False, im2col: bool = False) -> nnx.Conv:
  """A square convolution with torchvision-style symmetric padding (kernel // 2); ``im2col``: as
  patches + matmul (see ``conv_general_dilated``)."""
  pad = kernel // 2
  impl = functools.partial(conv_general_dilated, im2col=True) if im2col else conv_general_dilated
  return nnx.Conv(in_ch, out_ch, (kernel, kernel), strides=(stride, stride),
                  padding=((pad, pad), (pad, pad)), use_bias=use_bias, kernel_init=conv_init,
                  dtype=dtype, param_dtype=jnp.float32, conv_general_dilated=impl, rngs=rngs)


_BATCH_ROWS = contextvars.ContextVar('batch_rows', default=None)


@contextlib.contextmanager
def batch_rows(mask_B: jax.Array | None) -> Iterator[None]:
  """Within it, BatchNorm layers in training (``batch_norm``'s and fast_cnn's) take their batch
  statistics, and update their running averages, from the rows where ``mask_B`` is True only (an
  image folder's undecodable file leaves a blank row, mask False). ``None``: every row, through
  exactly the code traced outside it."""
  token = _BATCH_ROWS.set(mask_B)
  try:
    yield
  finally:
    _BATCH_ROWS.reset(token)


def batch_rows_of(x_BxC: jax.Array) -> tuple[jax.Array, jax.Array] | None:
  """Within ``batch_rows(mask_B)``: (``where``, the rows of ``x_BxC`` (``B x ... x C``) that the
  statistics take as a ``B x 1 ... x 1`` bool; ``any_valid``); None outside it. With no valid row
  at all, ``where`` takes every row (finite statistics) and the caller keeps its running
  averages (``any_valid`` False)."""
  mask_B = _BATCH_ROWS.get()
  if mask_B is None:
    return None
  mask_B = jnp.asarray(mask_B, bool)
  if mask_B.shape != x_BxC.shape[:1]:
    raise ValueError(f'batch_rows mask of shape {mask_B.shape} for a BatchNorm input of shape '
                     f'{x_BxC.shape}: one entry per row expected.')
  any_valid = jnp.any(mask_B)
  where = jnp.logical_or(mask_B, jnp.logical_not(any_valid))
  return where.reshape(mask_B.shape + (1,) * (x_BxC.ndim - 1)), any_valid


class MaskedBatchNorm(nnx.BatchNorm):
  """``nnx.BatchNorm`` (the same variables, so the same checkpoints and imports) whose training
  statistics skip the rows masked out by ``batch_rows``; anything else is ``nnx.BatchNorm``'s."""

  def __call__(self, x, use_running_average: bool | None = None, *,
               mask: jax.Array | None = None) -> jax.Array:
    running = self.use_running_average if use_running_average is None else use_running_average
    rows = None if running or mask is not None else batch_rows_of(x)
    if rows is None:
      return super().__call__(x, use_running_average, mask=mask)
    where, any_valid = rows
    mean, var = self.mean[...], self.var[...]
    y = super().__call__(x, use_running_average, mask=where)
    self.mean[...] = jnp.where(any_valid, self.mean[...], mean)
    self.var[...] = jnp.where(any_valid, self.var[...], var)
    return y


def batch_norm(ch: int, *, dtype: Any, rngs: nnx.Rngs, zero_scale: bool = False,
               momentum: float = 0.9, epsilon: float = 1e-5) -> MaskedBatchNorm:
  """BatchNorm with f32 parameters; ``zero_scale`` zero-initialises gamma (residual branch ends).
  In training it skips the rows ``batch_rows`` masks out."""
  return MaskedBatchNorm(ch, momentum=momentum, epsilon=epsilon, dtype=dtype,
                         param_dtype=jnp.float32,
                         scale_init=nnx.initializers.zeros_init() if zero_scale
                         else nnx.initializers.ones_init(), rngs=rngs)


def dense(in_f: int, out_f: int, *, dtype: Any, rngs: nnx.Rngs) -> nnx.Linear:
  """The classifier head (computed in ``dtype``; logits are cast to f32 by the loss)."""
  return nnx.Linear(in_f, out_f, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def max_pool_3x3_s2(x_BxHxWxC: jnp.ndarray) -> jnp.ndarray:
  """The ResNet stem max-pool: 3x3, stride 2, padding 1, of a ReLU's output (>= 0), so padded
  with zeros, which gives what -inf padding gives: -inf, as XLA pads a max-pool, becomes a
  tensor of int8 scale ~1e36 in a quantised TFLite model, and LiteRT aborts on it."""
  x = jnp.pad(x_BxHxWxC, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return nnx.max_pool(x, (3, 3), strides=(2, 2), padding='VALID')


def as_dtype(name: str | Any) -> Any:
  """'float32' / 'bfloat16' / 'float16' -> jnp dtype."""
  return jnp.dtype(name) if isinstance(name, str) else name


global_avg_pool = functools.partial(jnp.mean, axis=(1, 2))


def block_depths(names: list[str], block_of: Callable[[str], Any],
                 stem: Collection[str] = ()) -> tuple[dict[str, int], int]:
  """(depth per parameter name, top depth ``L``) for a stem -> blocks -> head layout.

  ``block_of(name)`` is the sortable key of the block holding a parameter (None outside blocks);
  blocks take depths 1..n in key order, parameters under a top-level attribute in ``stem`` take 0,
  and the rest (the head and any norm right before it) the top depth ``L = n + 1``.
  """
  keys = {n: block_of(n) for n in names}
  depth_of = {k: i + 1 for i, k in enumerate(sorted({k for k in keys.values() if k is not None}))}
  top = len(depth_of) + 1
  return {n: depth_of[k] if k is not None else (0 if n.split('.')[0] in stem else top)
          for n, k in keys.items()}, top


def list_index(name: str, lists: Collection[str]) -> int | None:
  """``i`` for a parameter ``<list>.<i>...`` of one of the ``nnx.List`` attributes ``lists``."""
  parts = name.split('.')
  return int(parts[1]) if len(parts) > 1 and parts[0] in lists else None


# ------------------------------------------------------------------ blocks of the modern families

def make_divisible(value: float, divisor: int = 8) -> int:
  """torchvision's ``_make_divisible``: the nearest multiple of ``divisor`` (at least ``divisor``)
  that is not more than 10% below ``value``."""
  new = max(divisor, int(value + divisor / 2) // divisor * divisor)
  return new + divisor if new < 0.9 * value else new


def check_drop_path_rate(rate: float) -> None:
  """UserError unless ``rate`` (config.model.drop_path_rate as given) is in [0, 1): checked
  before it is scaled per block, so that the message names the value given and a model with no
  residual block (or one) refuses it too."""
  if not 0.0 <= rate < 1.0:
    raise UserError(f'config.model.drop_path_rate must be in [0, 1), got {rate}.')


def check_positive(**values: float) -> None:
  """UserError for a scale (``width_mult=0.0``, ...) that is not positive: the network would
  silently lose its blocks or widths."""
  for key, value in values.items():
    if not value > 0:
      raise UserError(f'config.model.{key} must be positive, got {value}.')


def drop_path_rates(rate: float, num_blocks: int) -> list[float]:
  """Stochastic-depth rate per block, increasing linearly from 0 to ``rate`` (timm's rule);
  ``rate`` is checked first (``check_drop_path_rate``)."""
  check_drop_path_rate(rate)
  if num_blocks <= 1:
    return [0.0] * num_blocks
  return [rate * i / (num_blocks - 1) for i in range(num_blocks)]


class DropPath(nnx.Module):
  """Stochastic depth: in training, each example's residual branch is zeroed with probability
  ``rate`` and scaled by ``1 / (1 - rate)`` otherwise (RNG stream 'dropout'); identity at eval."""

  def __init__(self, rate: float, *, ndim: int, rngs: nnx.Rngs):
    self.rate = float(rate)
    # One draw per example: the noise broadcasts over every axis but the batch.
    self.dropout = nnx.Dropout(self.rate, broadcast_dims=tuple(range(1, ndim)), rngs=rngs)

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    return self.dropout(x, deterministic=not train)


def drop_path(rate: float, *, ndim: int, rngs: nnx.Rngs) -> DropPath | None:
  """A DropPath module, or None when ``rate`` is 0 (no RNG state kept for it)."""
  check_drop_path_rate(rate)
  return DropPath(rate, ndim=ndim, rngs=rngs) if rate > 0 else None


def apply_drop_path(module: DropPath | None, x: jax.Array, train: bool) -> jax.Array:
  """``module(x)``, or ``x`` when there is no module."""
  return x if module is None else module(x, train)


def layer_norm(ch: int, *, dtype: Any, rngs: nnx.Rngs, epsilon: float = 1e-6) -> nnx.LayerNorm:
  """LayerNorm over the last axis with f32 parameters (two-pass variance, as PyTorch)."""
  return nnx.LayerNorm(ch, epsilon=epsilon, dtype=dtype, param_dtype=jnp.float32,
                       use_fast_variance=False, rngs=rngs)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'relu': nnx.relu, 'silu': nnx.silu, 'hardswish': jax.nn.hard_swish,
    'sigmoid': nnx.sigmoid, 'hardsigmoid': jax.nn.hard_sigmoid, 'none': lambda x: x,
}


class ConvNormAct(nnx.Module):
  """conv (no bias) -> BatchNorm -> activation: torchvision's ``Conv2dNormActivation``."""

  def __init__(self, in_ch: int, out_ch: int, kernel: int, *, stride: int = 1, groups: int = 1,
               act: str = 'relu', bn_eps: float = 1e-5, bn_momentum: float = 0.9, dtype: Any,
               rngs: nnx.Rngs):
    pad = (kernel - 1) // 2
    self.conv = nnx.Conv(in_ch, out_ch, (kernel, kernel), strides=(stride, stride),
                         padding=((pad, pad), (pad, pad)), feature_group_count=groups,
                         use_bias=False, kernel_init=conv_init, dtype=dtype,
                         param_dtype=jnp.float32, conv_general_dilated=conv_general_dilated,
                         rngs=rngs)
    self.bn = batch_norm(out_ch, dtype=dtype, rngs=rngs, momentum=bn_momentum, epsilon=bn_eps)
    self.act = act

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    return ACTIVATIONS[self.act](self.bn(self.conv(x), use_running_average=not train))


class SqueezeExcitation(nnx.Module):
  """Channel gate ``x * gate(fc2(act(fc1(mean_hw(x)))))`` (torchvision's SqueezeExcitation)."""

  def __init__(self, ch: int, squeeze: int, *, act: str, gate: str, dtype: Any, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(ch, squeeze, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    self.fc2 = nnx.Linear(squeeze, ch, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    self.act, self.gate = act, gate

  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    s_BxC = self.fc2(ACTIVATIONS[self.act](self.fc1(global_avg_pool(x_BxHxWxC))))
    return x_BxHxWxC * ACTIVATIONS[self.gate](s_BxC)[:, None, None, :]


class InvertedResidual(nnx.Module):
  """MBConv / MobileNetV3 block: [1x1 expand] -> depthwise kxk -> [squeeze-excite] -> 1x1 project,
  with a (drop-path) residual when stride is 1 and the channels match."""

  def __init__(self, in_ch: int, expanded: int, out_ch: int, kernel: int, stride: int, *,
               act: str, se_ch: int, se_act: str, se_gate: str, bn_eps: float, bn_momentum: float,
               drop_path_rate: float, dtype: Any, rngs: nnx.Rngs):
    norm = dict(bn_eps=bn_eps, bn_momentum=bn_momentum, dtype=dtype, rngs=rngs)
    self.expand = (ConvNormAct(in_ch, expanded, 1, act=act, **norm) if expanded != in_ch
                   else None)
    self.dwconv = ConvNormAct(expanded, expanded, kernel, stride=stride, groups=expanded, act=act,
                              **norm)
    self.se = (SqueezeExcitation(expanded, se_ch, act=se_act, gate=se_gate, dtype=dtype, rngs=rngs)
               if se_ch else None)
    self.project = ConvNormAct(expanded, out_ch, 1, act='none', **norm)
    self.residual = stride == 1 and in_ch == out_ch
    self.drop_path = drop_path(drop_path_rate, ndim=4, rngs=rngs) if self.residual else None

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    y = x if self.expand is None else self.expand(x, train)
    y = self.dwconv(y, train)
    if self.se is not None:
      y = self.se(y)
    y = self.project(y, train)
    return x + apply_drop_path(self.drop_path, y, train) if self.residual else y
