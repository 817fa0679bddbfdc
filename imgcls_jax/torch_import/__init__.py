"""Weights in torchvision / timm layout (``.safetensors`` or a torch state dict) -> Flax.

The family is recognised from the tensor names: ResNet (torchvision / timm), ViT (torchvision /
timm), ConvNeXt (torchvision / timm), EfficientNet B0-B7 and MobileNetV3 (torchvision's layout
only; timm's is recognised and refused by name). One module per family maps names to this
project's (``imgcls_jax.models``), with layouts converted: conv OIHW -> HWIO, linear (out, in) ->
(in, out), norm weight/bias -> scale/bias (parameters) and BatchNorm running_mean/var -> mean/var
(batch statistics). ``fit_to`` resamples a ViT's position embeddings to a model of another image
size, as timm does.

``.safetensors`` files are read without torch; ``.pt`` / ``.pth`` / ``.bin`` state dicts need torch
(``pip install 'imgcls_jax[torch]'``). Nothing is downloaded: the file must be local.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from imgcls_jax import weights as weights_lib
from imgcls_jax.errors import UserError
from imgcls_jax.torch_import import _torch_file, convnext, mobile, resnet, vit
from imgcls_jax.weights import Weights

FAMILIES = ('ResNet', 'ViT', 'ConvNeXt', 'EfficientNet', 'MobileNetV3')
SUPPORTED = ("torchvision's or timm's ResNet, ViT and ConvNeXt, and torchvision's EfficientNet and "
             'MobileNetV3')


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """``{name: float32 array}`` from a ``.safetensors`` file or a torch-saved state dict."""
  if not os.path.isfile(path):
    raise UserError(f'Weights file {path} does not exist; give the path of a local .safetensors or '
                    '.pt file.')
  if path.endswith('.safetensors'):
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    try:
      tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
      raise UserError(f'Cannot read {path} as safetensors ({str(e)[:200]}); the file is corrupt or '
                      'not a safetensors file.') from None
  else:
    tensors = _torch_file.read(path)
  out = {}
  for k, v in tensors.items():
    k = k[len('module.'):] if k.startswith('module.') else k  # saved from DistributedDataParallel
    out[k] = np.asarray(v)
  return out


def convert(state_dict: Mapping[str, np.ndarray], origin: str = 'the weights file',
            model: Mapping[str, Any] | None = None) -> Weights:
  """Renames and re-lays-out a torchvision/timm state dict of a known family into this project's
  naming; ``model`` is ``config.model`` where known (a ViT's head count is assumed from it, with
  a warning unless it sets ``num_heads``: ``vit.say_assumed_heads``; its pooling likewise, unless
  it sets ``pool``: ``vit.say_assumed_pool``)."""
  keys = set(state_dict)
  if vit.detect(keys):
    return vit.convert(state_dict, origin, model)
  if convnext.detect(keys):
    return convnext.convert(state_dict, origin)
  if family := mobile.detect(keys):
    return mobile.convert(state_dict, origin, family)
  if resnet.detect(keys):
    return resnet.convert(state_dict, origin)
  if family := mobile.timm_layout(keys):
    a, theirs = (('an', 'efficientnet_b0 to _b7') if family == 'EfficientNet'
                 else ('a', 'mobilenet_v3_small / _large'))
    raise UserError(f"{origin} holds {a} {family} in timm's layout (conv_stem, blocks.0.0.conv_dw, "
                    "...), which cannot be imported (only torchvision's EfficientNet and "
                    f"MobileNetV3 layouts can); use the weights of torchvision's {theirs} instead.")
  sample = ', '.join(sorted(keys)[:3])
  raise UserError(f'Cannot tell which model family {origin} holds (tensors {sample}, ...); only '
                  f'state dicts of {SUPPORTED} can be imported.')


def fit_to(weights: Weights, params: Any) -> Weights:
  """``weights`` (from ``load``) fitted to the model whose parameters are ``params`` (a pytree of
  arrays or shape structs): a ViT's position embeddings resampled to its patch grid when its image
  size differs from the one the weights were trained at, as timm does; else ``weights`` as they
  are (``weights.merge`` names any other mismatch)."""
  return vit.fit_positions(weights, weights_lib.flatten(params))


def load(path: str, model: Mapping[str, Any] | None = None) -> Weights:
  """Weights from a local torchvision/timm-layout file, in this project's naming; ``meta['model']``
  is the registered model name they fit (``resnet18``, ...), absent when none does. ``model``:
  ``config.model`` where known (``convert``)."""
  return convert(read_state_dict(path), origin=os.path.basename(path), model=model)
