"""Small building blocks shared by the model families."""
from __future__ import annotations

import functools
from typing import Any

import jax.numpy as jnp
from flax import nnx

# He (Kaiming) normal on fan_out, as torchvision initialises ResNet convolutions.
conv_init = nnx.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def conv(in_ch: int, out_ch: int, kernel: int, *, stride: int = 1, dtype: Any, rngs: nnx.Rngs,
         use_bias: bool = False) -> nnx.Conv:
  """A square convolution with torchvision-style symmetric padding (kernel // 2)."""
  pad = kernel // 2
  return nnx.Conv(in_ch, out_ch, (kernel, kernel), strides=(stride, stride),
                  padding=((pad, pad), (pad, pad)), use_bias=use_bias, kernel_init=conv_init,
                  dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def batch_norm(ch: int, *, dtype: Any, rngs: nnx.Rngs, zero_scale: bool = False,
               momentum: float = 0.9, epsilon: float = 1e-5) -> nnx.BatchNorm:
  """BatchNorm with f32 parameters; ``zero_scale`` zero-initialises gamma (residual branch ends)."""
  return nnx.BatchNorm(ch, momentum=momentum, epsilon=epsilon, dtype=dtype, param_dtype=jnp.float32,
                       scale_init=nnx.initializers.zeros_init() if zero_scale
                       else nnx.initializers.ones_init(), rngs=rngs)


def dense(in_f: int, out_f: int, *, dtype: Any, rngs: nnx.Rngs) -> nnx.Linear:
  """The classifier head (computed in ``dtype``; logits are cast to f32 by the loss)."""
  return nnx.Linear(in_f, out_f, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def max_pool_3x3_s2(x_BxHxWxC: jnp.ndarray) -> jnp.ndarray:
  """The ResNet stem max-pool: 3x3, stride 2, padding 1."""
  return nnx.max_pool(x_BxHxWxC, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def as_dtype(name: str | Any) -> Any:
  """'float32' / 'bfloat16' / 'float16' -> jnp dtype."""
  return jnp.dtype(name) if isinstance(name, str) else name


global_avg_pool = functools.partial(jnp.mean, axis=(1, 2))
