"""ViT from torchvision (``conv_proj``, ``class_token``, ``encoder.pos_embedding``,
``encoder.layers.encoder_layer_<i>.{ln_1, self_attention, ln_2, mlp.{0,3}}``, ``encoder.ln``,
``heads.head``) or timm (``patch_embed.proj``, ``cls_token``, ``pos_embed``,
``blocks.<i>.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``norm``, ``head``) into
``imgcls_jax.models.vit``. Both fuse q, k, v into one projection in the same order as ours.

The number of attention heads is in no tensor's shape, and nothing in a torchvision or timm ViT
state dict records it (timm's ``qk_norm`` variants hold the head width in ``attn.q_norm``, but
those are not imported): the model gets ``config.model.num_heads``, else its name's default
(``vit_b16``: 12), and weights trained with another count import without an error and answer
wrongly (timm's ``vit_base_patch16_gap_224`` has 16). ``convert`` says in one warning which count
it assumed, unless ``config.model`` (``model``) sets ``num_heads``. Nor is the pooling of a ViT
with a class token recorded: it imports as ``pool='token'`` (the class token's output feeds the
head), and one trained with timm's ``global_pool='avg'`` (the mean of the patch tokens next to a
class token, without ``fc_norm``) imports without an error and answers wrongly; this project's
ViT has no such pooling (its ``pool='gap'`` has no class token). ``convert`` says so in one warning,
unless ``config.model`` sets ``pool``. A ViT without a class token (timm's ``class_token=False,
global_pool='avg'``) fits ``pool='gap'`` only: ``fit_positions`` refuses it for ``pool='token'``,
saying so.

Weights from another image size (``fit_positions``): the patch position embeddings are resampled to
the model's patch grid as timm's ``resample_abs_pos_embed`` does when it loads weights at another
``img_size`` (bicubic with antialiasing, the class token's embedding kept).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import re
from typing import Any, Mapping

import numpy as np

from imgcls_jax.errors import UserError
from imgcls_jax.models.vit import SIZES, ViT
from imgcls_jax.torch_import._layout import Builder, count, registered_name, split
from imgcls_jax.weights import Weights

_RAW = {'class_token': 'class_token', 'cls_token': 'class_token',
        'encoder.pos_embedding': 'pos_embedding', 'pos_embed': 'pos_embedding'}
_MODULES = {'conv_proj': 'conv_proj', 'patch_embed.proj': 'conv_proj', 'encoder.ln': 'ln',
            'norm': 'ln', 'heads.head': 'head', 'head': 'head'}
_BLOCK = re.compile(r'^(?:encoder\.layers\.encoder_layer_|blocks\.)(\d+)\.(.+)$')
_IN_BLOCK = {'ln_1': 'ln_1', 'norm1': 'ln_1', 'ln_2': 'ln_2', 'norm2': 'ln_2',
             'self_attention.out_proj': 'self_attention.out_proj',
             'attn.qkv': 'self_attention.in_proj', 'attn.proj': 'self_attention.out_proj',
             'mlp.0': 'mlp.fc1', 'mlp.3': 'mlp.fc2', 'mlp.linear_1': 'mlp.fc1',
             'mlp.linear_2': 'mlp.fc2', 'mlp.fc1': 'mlp.fc1', 'mlp.fc2': 'mlp.fc2'}


def detect(keys: set[str]) -> bool:
  """Whether the state dict looks like a ViT."""
  return bool(keys & {'conv_proj.weight', 'patch_embed.proj.weight'})


def model_name(params: dict[str, np.ndarray]) -> str | None:
  """The registered ViT (``vit_b16``, ...) with these tensors' width, depth, MLP width and patch
  size; None when there is none."""
  patch, _, _, width = np.shape(params['conv_proj.kernel'])           # HWIO
  mlp_dim = np.shape(params['blocks.0.mlp.fc1.kernel'])[-1]
  return registered_name(ViT, (width, count(params, r'blocks\.(\d+)\.'), mlp_dim, patch),
                         lambda kw: (kw['width'], kw['depth'], kw['mlp_dim'], kw['patch_size']))


def default_heads(name: str | None) -> int | None:
  """The number of attention heads a registered ViT ``name`` has unless config.model sets it."""
  from imgcls_jax import models
  if not name or name not in models.names():
    return None
  params, bound, _ = models.arguments(name)
  default = next((p.default for p in params if p.name == 'num_heads'), None)
  heads = bound.get('num_heads', default)
  return heads if isinstance(heads, int) else None


def say_assumed_heads(weights: Weights, model: Mapping[str, Any] | None) -> None:
  """The warning that the head count of these ViT weights is assumed (the model's name's default:
  ``model`` is ``config.model``, None when not known), unless ``model`` sets ``num_heads``."""
  if model is not None and 'num_heads' in model:
    return
  name = (model or {}).get('name')
  heads = default_heads(name)
  if heads is None:   # no (ViT) model given: the one these tensors' shapes fit, if any
    name = weights.meta.get('model')
    heads = default_heads(name)
  width = np.shape(weights.params['conv_proj.kernel'])[-1]
  if heads is not None:
    per = (f'{width // heads} channels per head' if width % heads == 0 else
           f'which does not divide its width {width}')
    assumed = f"{heads} ({name}'s default, {per})"
  else:
    assumed = ("config.model.name's default (" + ', '.join(
        f'{n}: {default_heads(n)}' for n in SIZES) + ')')
  if model is None:   # (whether config.model sets it is not known here)
    assumed = f'config.model.num_heads, else {assumed}'
  logging.warning('%s holds a ViT whose number of attention heads is in none of its tensors: the '
                  'import assumes %s; if it was trained with another count (timm\'s '
                  'vit_base_patch16_gap_224 has 16), set config.model.num_heads=N, or the model '
                  'answers wrongly without an error.', weights.origin, assumed)


def say_assumed_pool(weights: Weights, model: Mapping[str, Any] | None) -> None:
  """The warning that these ViT weights, which hold a class token, are assumed to pool with it
  (``pool='token'``), unless ``model`` (``config.model``, None when not known) sets ``pool``."""
  if 'class_token' not in weights.params or (model is not None and 'pool' in model):
    return
  logging.warning("%s holds a ViT with a class token, and whether its head reads that token or "
                  "the mean of the patch tokens (timm's global_pool='avg') is in none of its "
                  "tensors: the import assumes the token (config.model.pool='token'); weights "
                  'trained with the mean import without an error but answer wrongly (this '
                  "project's ViT cannot pool so: its pool='gap' is for a ViT without a class "
                  "token); set config.model.pool='token' to say that they read the token.",
                  weights.origin)


def convert(state_dict: Mapping[str, np.ndarray], origin: str,
            model: Mapping[str, Any] | None = None) -> Weights:
  """A torchvision/timm ViT state dict in this project's naming; ``model`` (``config.model``,
  None when not known) words the warnings of the head count and pooling assumed
  (``say_assumed_heads``, ``say_assumed_pool``)."""
  out = Builder('ViT (torchvision VisionTransformer or timm vit_*)', origin)
  for key, value in state_dict.items():
    if key in _RAW:
      out.param(_RAW[key], value)
      continue
    module, leaf = split(key)
    m = _BLOCK.match(key)
    if m:
      prefix, rest = f'blocks.{m.group(1)}', m.group(2)
      module, leaf = split(rest)
      if module == 'self_attention' and leaf in ('in_proj_weight', 'in_proj_bias'):
        out.module(f'{prefix}.self_attention.in_proj', leaf[len('in_proj_'):], value, key)
      elif module in _IN_BLOCK:
        out.module(f'{prefix}.{_IN_BLOCK[module]}', leaf, value, key)
      else:
        out.reject(key, value)
    elif module in _MODULES:
      out.module(_MODULES[module], leaf, value, key)
    else:
      out.reject(key, value)
  weights = out.weights('conv_proj.kernel', model_name)
  say_assumed_heads(weights, model)
  say_assumed_pool(weights, model)
  return weights


def resample_matrix(old: int, new: int) -> np.ndarray:
  """``(new, old)`` weights of ``torch.nn.functional.interpolate(mode='bicubic', antialias=True,
  align_corners=False)`` along one axis (timm's defaults): Keys' cubic with a = -0.5, stretched by
  old / new when shrinking, each row normalised over the inputs it covers (PIL's resampling)."""
  scale = old / new
  support = 2.0 * max(scale, 1.0)
  inv = 1.0 / scale if scale >= 1.0 else 1.0
  out = np.zeros((new, old))
  for i in range(new):
    center = scale * (i + 0.5)
    lo = max(int(center - support + 0.5), 0)   # int() truncates toward zero, as ATen's cast does
    hi = min(int(center + support + 0.5), old)
    x = np.abs((np.arange(lo, hi) - center + 0.5) * inv)
    w = np.where(x < 1, (1.5 * x - 2.5) * x * x + 1,
                 np.where(x < 2, ((-0.5 * x + 2.5) * x - 4) * x + 2, 0.0))
    out[i, lo:hi] = w / w.sum()
  return out


def resample_positions(pos_1xNxD: np.ndarray, new_grid: int, prefix: int) -> np.ndarray:
  """Position embeddings ``(1, prefix + g*g, D)`` for a ``new_grid`` x ``new_grid`` patch grid: the
  ``prefix`` (class-token) rows kept, the g x g grid resampled as timm's
  ``resample_abs_pos_embed`` does by default."""
  pos = np.asarray(pos_1xNxD, np.float64)
  old_grid = math.isqrt(pos.shape[1] - prefix)
  grid_HxWxD = pos[0, prefix:].reshape(old_grid, old_grid, -1)
  m = resample_matrix(old_grid, new_grid)
  new_HxWxD = np.einsum('ih,hwd,jw->ijd', m, grid_HxWxD, m)
  out = np.concatenate([pos[0, :prefix], new_HxWxD.reshape(new_grid * new_grid, -1)])
  return out[None].astype(np.float32)


def _square_side(n: int) -> int | None:
  side = math.isqrt(max(n, 0))
  return side if side > 0 and side * side == n else None


def _check_class_token(weights: Weights, target: Mapping[str, Any]) -> None:
  """UserError when ``weights`` (a ViT's) have no class token but the model of ``target`` (built
  with ``pool='token'``) reads one: weights pooled by the mean of the patch tokens (timm's
  ``class_token=False, global_pool='avg'``) fit this project's ``pool='gap'``."""
  if 'class_token' in target and 'class_token' not in weights.params:
    raise UserError(f"{weights.origin} holds a ViT without a class token (its head reads the mean "
                    "of the patch tokens, as timm's class_token=False, global_pool='avg'), but "
                    "config.model.pool='token' reads a class token; set --config.model.pool=gap "
                    '(the mean of the tokens, no class token).')


def fit_positions(weights: Weights, target: Mapping[str, Any]) -> Weights:
  """``weights`` with ``pos_embedding`` resampled to the patch grid of the model whose parameter
  shapes are ``target`` (``{name: array or shape struct}``) when only the grid differs (a ViT
  fine-tuned at another image size); otherwise ``weights`` unchanged (``weights.merge`` then names
  any mismatch). A UserError when the weights have no class token and the model reads one
  (``_check_class_token``)."""
  name = 'pos_embedding'
  if name not in weights.params or name not in target:
    return weights
  _check_class_token(weights, target)
  have, want = np.shape(weights.params[name]), tuple(target[name].shape)
  prefix = int('class_token' in weights.params)
  if (have == want or len(have) != 3 or len(want) != 3 or have[2] != want[2]
      or prefix != int('class_token' in target)):
    return weights
  old, new = _square_side(have[1] - prefix), _square_side(want[1] - prefix)
  if old is None or new is None:
    return weights
  patch = np.shape(weights.params.get('conv_proj.kernel', ((),)))[0]
  logging.info('Resampled the position embeddings of %s from a %dx%d to a %dx%d patch grid '
               '(image size %d -> %d at patch %d; bicubic as timm does, the class token\'s kept).',
               weights.origin, old, old, new, new, old * patch, new * patch, patch)
  params = {**weights.params, name: resample_positions(weights.params[name], new, prefix)}
  return dataclasses.replace(weights, params=params)
