"""ConvNeXt from torchvision (``features.<2i>`` stem / downsampling, ``features.<2i+1>.<j>`` blocks
with ``block.{0,2,3,5}`` and ``layer_scale``, ``classifier.{0,2}``) or timm (``stem.{0,1}``,
``stages.<i>.downsample.{0,1}``, ``stages.<i>.blocks.<j>.{conv_dw, norm, mlp.fc1, mlp.fc2,
gamma}``, ``head.{norm, fc}``) into ``imgcls_jax.models.convnext``.

Only the original ConvNeXt (patchify stem, LayerNorm, layer scale) is ours; timm's variants with an
overlapping stem (``_ols``), RMSNorm (``_rms``), the head norm first (``_hnf``) and ConvNeXt V2
(GRN) are recognised and refused by name.
"""
from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from imgcls_jax.errors import UserError
from imgcls_jax.models.convnext import ConvNeXt
from imgcls_jax.torch_import._layout import Builder, count, registered_name, split
from imgcls_jax.weights import Weights

_TV_BLOCK = re.compile(r'^features\.(\d+)\.(\d+)\.(block\.\d+|layer_scale)$')
_TV_OTHER = re.compile(r'^features\.(\d+)\.([01])$')
_TIMM_BLOCK = re.compile(r'^stages\.(\d+)\.blocks\.(\d+)\.(conv_dw|norm|mlp\.fc1|mlp\.fc2|gamma)$')
_TIMM_DOWN = re.compile(r'^stages\.(\d+)\.downsample\.([01])$')
_BLOCK_PARTS = {'block.0': 'dwconv', 'block.2': 'norm', 'block.3': 'pwconv1', 'block.5': 'pwconv2',
                'conv_dw': 'dwconv', 'norm': 'norm', 'mlp.fc1': 'pwconv1', 'mlp.fc2': 'pwconv2'}
_FIXED = {'classifier.0': 'norm', 'classifier.2': 'head', 'head.norm': 'norm', 'head.fc': 'head',
          'stem.0': 'stem.conv', 'stem.1': 'stem.norm'}
SUPPORTED = ("torchvision's convnext_tiny, _small, _base, _large or timm's convnext_atto to "
             'convnext_xxlarge (not the _ols, _rms or _hnf variants, nor convnextv2_*)')


def detect(keys: set[str]) -> bool:
  """Whether the state dict looks like a ConvNeXt (V2 included, to be refused by name)."""
  return any(k.endswith('.layer_scale') or k.startswith('stages.') and
             (k.endswith('.gamma') or '.mlp.grn.' in k) for k in keys)


def unsupported(keys: set[str]) -> str | None:
  """Which timm ConvNeXt variant that ``imgcls_jax.models.convnext`` cannot hold the keys are of,
  with the tensor that tells; None for the original ConvNeXt."""
  if grn := sorted(k for k in keys if '.mlp.grn.' in k):
    return f"ConvNeXt V2 (timm convnextv2_*: GRN layers, e.g. '{grn[0]}')"
  if 'stem.2.weight' in keys:
    return "a ConvNeXt with an overlapping stem (timm convnext_*_ols: 'stem.2.weight')"
  if 'norm_pre.weight' in keys:
    return "a ConvNeXt with the head norm first (timm convnext_*_hnf: 'norm_pre.weight')"
  norms = ['stem.1.weight'] + sorted(k for k in keys if re.fullmatch(
      r'stages\.\d+\.blocks\.\d+\.norm\.weight|head\.norm\.weight', k))
  if no_bias := [k for k in norms if k in keys and k[:-len('weight')] + 'bias' not in keys]:
    return f"a ConvNeXt with RMSNorm (timm convnext_*_rms: '{no_bias[0]}' has no bias)"
  return None


def _module(module: str) -> str | None:
  """Our module name for a torch module name (None: not a ConvNeXt module)."""
  if module in _FIXED:
    return _FIXED[module]
  if m := _TV_BLOCK.match(module) or _TIMM_BLOCK.match(module):
    stage = int(m.group(1)) // 2 if module.startswith('features.') else int(m.group(1))
    return f'stages.{stage}.{m.group(2)}.{_BLOCK_PARTS.get(m.group(3), m.group(3))}'
  if m := _TV_OTHER.match(module):
    index, part = int(m.group(1)), int(m.group(2))
    if index == 0:
      return ('stem.conv', 'stem.norm')[part]
    return f'downsample.{index // 2 - 1}.' + ('norm', 'conv')[part] if index % 2 == 0 else None
  if m := _TIMM_DOWN.match(module):
    return f'downsample.{int(m.group(1)) - 1}.' + ('norm', 'conv')[int(m.group(2))]
  return None


def model_name(params: dict[str, np.ndarray]) -> str | None:
  """The registered ConvNeXt (``convnext_tiny``, ...) with these tensors' blocks and widths per
  stage and stem patch; None when there is none."""
  stages = range(count(params, r'stages\.(\d+)\.'))
  depths = tuple(count(params, rf'stages\.{s}\.(\d+)\.') for s in stages)
  widths = tuple(np.shape(params[f'stages.{s}.0.norm.scale'])[0] for s in stages)
  patch = np.shape(params['stem.conv.kernel'])[0]                     # HWIO
  return registered_name(ConvNeXt, (depths, widths, patch),
                         lambda kw: (tuple(kw['depths']), tuple(kw['widths']), kw['stem_patch']))


def convert(state_dict: Mapping[str, np.ndarray], origin: str) -> Weights:
  """A torchvision/timm ConvNeXt state dict in this project's naming."""
  if variant := unsupported(set(state_dict)):
    raise UserError(f'{origin} holds {variant}, which cannot be imported; use the weights of a '
                    f'LayerNorm ConvNeXt: {SUPPORTED}.')
  out = Builder('torchvision/timm ConvNeXt', origin)
  for key, value in state_dict.items():
    if key.endswith('.layer_scale') or key.endswith('.gamma'):
      ours = _module(key)
      if ours is None:
        out.reject(key, value)
      out.param(ours.replace('.gamma', '.layer_scale'), np.reshape(value, (-1,)))  # (C, 1, 1)
      continue
    module, leaf = split(key)
    ours = _module(module)
    if ours is None:
      out.reject(key, value)
    # timm's small ConvNeXts (conv_mlp=True) hold the MLP as 1x1 convs.
    out.module(ours, leaf, value, key, linear_from_1x1=ours.endswith(('pwconv1', 'pwconv2')))
  return out.weights('stem.conv.kernel', model_name)
