"""Vision Transformer (Dosovitskiy et al. 2021), torchvision's ``VisionTransformer`` layout.

Pre-norm encoder blocks (LayerNorm eps 1e-6, exact GELU), a learned position embedding, a class
token (``pool='token'``) or global average pooling of the tokens (``pool='gap'``, no class token).
Attribute names follow torchvision (``conv_proj``, ``class_token``, ``pos_embedding``, ``ln_1``,
``self_attention.in_proj`` / ``out_proj``, ``ln_2``, ``mlp.fc1`` / ``fc2``, ``ln``) so published
weights map by name (``imgcls_jax.torch_import.vit``); the classifier is ``head``.

The patch grid is fixed at construction: ``image_size`` must be the input size (e.g. 28 with
``patch_size=4`` for Fashion-MNIST: a 7x7 grid).
"""
from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from imgcls_jax.errors import UserError
from imgcls_jax.models import layers

POOLS = ('token', 'gap')
_xavier = nnx.initializers.xavier_uniform()
_bias = nnx.initializers.normal(1e-6)


def _linear(in_f: int, out_f: int, *, dtype: Any, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(in_f, out_f, kernel_init=_xavier, bias_init=_bias, dtype=dtype,
                    param_dtype=jnp.float32, rngs=rngs)


class SelfAttention(nnx.Module):
  """Multi-head self-attention with one fused q/k/v projection (PyTorch's MultiheadAttention)."""

  def __init__(self, width: int, num_heads: int, *, dtype: Any, rngs: nnx.Rngs):
    self.num_heads = num_heads
    self.in_proj = _linear(width, 3 * width, dtype=dtype, rngs=rngs)
    self.out_proj = _linear(width, width, dtype=dtype, rngs=rngs)

  def __call__(self, x_BxNxD: jax.Array) -> jax.Array:
    b, n, d = x_BxNxD.shape
    qkv = self.in_proj(x_BxNxD).reshape(b, n, 3, self.num_heads, d // self.num_heads)
    # Static slices (plain indexing of an export-polymorphic batch would lower to a gather).
    q_BxNxHxK, k_BxNxHxK, v_BxNxHxK = (jax.lax.index_in_dim(qkv, i, axis=2, keepdims=False)
                                       for i in range(3))
    scale = (d // self.num_heads) ** -0.5
    logits_BxHxNxN = jnp.einsum('bqhk,bshk->bhqs', q_BxNxHxK * scale, k_BxNxHxK)
    attn = jax.nn.softmax(logits_BxHxNxN.astype(jnp.float32), axis=-1).astype(x_BxNxD.dtype)
    out_BxNxHxK = jnp.einsum('bhqs,bshk->bqhk', attn, v_BxNxHxK)
    return self.out_proj(out_BxNxHxK.reshape(b, n, d))


class MLP(nnx.Module):
  """Linear -> exact GELU -> dropout -> linear -> dropout."""

  def __init__(self, width: int, mlp_dim: int, dropout: float, *, dtype: Any, rngs: nnx.Rngs):
    self.fc1 = _linear(width, mlp_dim, dtype=dtype, rngs=rngs)
    self.fc2 = _linear(mlp_dim, width, dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = self.dropout(layers.gelu(self.fc1(x)), deterministic=not train)
    return self.dropout(self.fc2(x), deterministic=not train)


class EncoderBlock(nnx.Module):
  """``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``, each branch under drop-path."""

  def __init__(self, width: int, num_heads: int, mlp_dim: int, dropout: float,
               drop_path_rate: float, *, dtype: Any, rngs: nnx.Rngs):
    self.ln_1 = layers.layer_norm(width, dtype=dtype, rngs=rngs)
    self.self_attention = SelfAttention(width, num_heads, dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.ln_2 = layers.layer_norm(width, dtype=dtype, rngs=rngs)
    self.mlp = MLP(width, mlp_dim, dropout, dtype=dtype, rngs=rngs)
    self.drop_path = layers.drop_path(drop_path_rate, ndim=3, rngs=rngs)

  def __call__(self, x_BxNxD: jax.Array, train: bool) -> jax.Array:
    y = self.dropout(self.self_attention(self.ln_1(x_BxNxD)), deterministic=not train)
    x_BxNxD = x_BxNxD + layers.apply_drop_path(self.drop_path, y, train)
    y = self.mlp(self.ln_2(x_BxNxD), train)
    return x_BxNxD + layers.apply_drop_path(self.drop_path, y, train)


class ViT(nnx.Module):
  """ViT with ``depth`` blocks of ``width`` channels, ``num_heads`` heads, MLP ``mlp_dim``."""

  def __init__(self, *, num_classes: int, in_channels: int, rngs: nnx.Rngs, width: int,
               depth: int, num_heads: int, mlp_dim: int, patch_size: int = 16,
               image_size: int = 224, pool: str = 'token', dropout: float = 0.0,
               drop_path_rate: float = 0.0, dtype: Any = 'float32'):
    if patch_size < 1 or image_size < 1 or image_size % patch_size:
      raise UserError(f'config.model.patch_size={patch_size} must divide config.model.image_size='
                      f'{image_size} (the input size); pick sizes with image_size % patch_size '
                      '== 0.')
    if pool not in POOLS:
      raise UserError(f"config.model.pool='{pool}' is not one of {', '.join(POOLS)}.")
    if width % num_heads:
      raise UserError(f'ViT width {width} is not divisible by num_heads={num_heads}; set '
                      'config.model.num_heads to a divisor of the width.')
    dtype = layers.as_dtype(dtype)
    self.patch_size, self.image_size, self.pool = patch_size, image_size, pool
    self.conv_proj = nnx.Conv(in_channels, width, (patch_size, patch_size),
                              strides=(patch_size, patch_size), padding='VALID',
                              kernel_init=nnx.initializers.lecun_normal(), dtype=dtype,
                              param_dtype=jnp.float32, rngs=rngs)
    num_tokens = (image_size // patch_size) ** 2 + (pool == 'token')
    self.class_token = (nnx.Param(jnp.zeros((1, 1, width), jnp.float32)) if pool == 'token'
                        else None)
    self.pos_embedding = nnx.Param(
        nnx.initializers.normal(0.02)(rngs.params(), (1, num_tokens, width), jnp.float32))
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.blocks = nnx.List([
        EncoderBlock(width, num_heads, mlp_dim, dropout, rate, dtype=dtype, rngs=rngs)
        for rate in layers.drop_path_rates(drop_path_rate, depth)])
    self.ln = layers.layer_norm(width, dtype=dtype, rngs=rngs)
    self.head = nnx.Linear(width, num_classes, kernel_init=nnx.initializers.zeros_init(),
                           dtype=dtype, param_dtype=jnp.float32, rngs=rngs)

  def features(self, x_BxHxWxC: jax.Array, *, train: bool = False) -> jax.Array:
    """Pooled (class-token or average) normalised features ``feat_BxD``."""
    if x_BxHxWxC.shape[1:3] != (self.image_size, self.image_size):
      raise UserError(f'This ViT was built for {self.image_size}x{self.image_size} images but got '
                      f'{x_BxHxWxC.shape[1]}x{x_BxHxWxC.shape[2]}; set config.model.image_size to '
                      'the input size.')
    x = self.conv_proj(x_BxHxWxC)
    b, h, w, d = x.shape
    x_BxNxD = x.reshape(b, h * w, d)
    if self.class_token is not None:
      token = jnp.broadcast_to(self.class_token[...].astype(x.dtype), (b, 1, d))
      x_BxNxD = jnp.concatenate([token, x_BxNxD], axis=1)
    x_BxNxD = self.dropout(x_BxNxD + self.pos_embedding[...].astype(x.dtype),
                           deterministic=not train)
    for block in self.blocks:
      x_BxNxD = block(x_BxNxD, train)
    x_BxNxD = self.ln(x_BxNxD)
    if self.pool == 'token':
      return jax.lax.index_in_dim(x_BxNxD, 0, axis=1, keepdims=False)
    return x_BxNxD.mean(axis=1)

  def __call__(self, x_BxHxWxC: jax.Array, *, train: bool = False) -> jax.Array:
    return self.head(self.features(x_BxHxWxC, train=train)).astype(jnp.float32)


# name -> (width, depth, num_heads, mlp_dim), patch 16 (other patch sizes: config.model.patch_size).
SIZES = {'vit_ti16': (192, 12, 3, 768), 'vit_s16': (384, 12, 6, 1536),
         'vit_b16': (768, 12, 12, 3072)}

_BLOCK_PARAM = re.compile(r'^blocks\.(\d+)\.')


def layer_depths(names: list[str]) -> tuple[dict[str, int], int]:
  """Layer-decay depths: patch projection, class token and position embedding 0, encoder block
  ``i`` at ``i + 1``, the final ``ln`` and ``head`` at the top."""
  def block_of(name: str) -> int | None:
    m = _BLOCK_PARAM.match(name)
    return int(m.group(1)) if m else None
  return layers.block_depths(names, block_of, stem=('conv_proj', 'class_token', 'pos_embedding'))
