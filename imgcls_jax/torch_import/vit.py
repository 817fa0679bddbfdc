"""ViT from torchvision (``conv_proj``, ``class_token``, ``encoder.pos_embedding``,
``encoder.layers.encoder_layer_<i>.{ln_1, self_attention, ln_2, mlp.{0,3}}``, ``encoder.ln``,
``heads.head``) or timm (``patch_embed.proj``, ``cls_token``, ``pos_embed``,
``blocks.<i>.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``norm``, ``head``) into
``imgcls_jax.models.vit``. Both fuse q, k, v into one projection in the same order as ours."""
from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from imgcls_jax.models.vit import ViT
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


def convert(state_dict: Mapping[str, np.ndarray], origin: str) -> Weights:
  """A torchvision/timm ViT state dict in this project's naming."""
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
  return out.weights('conv_proj.kernel', model_name)
