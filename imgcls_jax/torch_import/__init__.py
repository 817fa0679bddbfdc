"""Weights in torchvision / timm layout (``.safetensors`` or a torch state dict) -> Flax.

The family is recognised from the tensor names: ResNet (torchvision / timm), ViT (torchvision /
timm), ConvNeXt (torchvision / timm), EfficientNet B0-B7 and MobileNetV3 (torchvision). One module
per family maps names to this project's (``imgcls_jax.models``), with layouts converted: conv OIHW
-> HWIO, linear (out, in) -> (in, out), norm weight/bias -> scale/bias (parameters) and BatchNorm
running_mean/var -> mean/var (batch statistics).

``.safetensors`` files are read without torch; ``.pt`` / ``.pth`` / ``.bin`` state dicts need torch
(``pip install 'imgcls_jax[torch]'``). Nothing is downloaded: the file must be local.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from imgcls_jax.errors import UserError, first_line
from imgcls_jax.torch_import import convnext, mobile, resnet, vit
from imgcls_jax.weights import Weights

_WRAPPER_KEYS = ('state_dict', 'model', 'model_state', 'model_state_dict', 'module')
FAMILIES = ('ResNet', 'ViT', 'ConvNeXt', 'EfficientNet', 'MobileNetV3')


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
    tensors = _read_torch(path)
  out = {}
  for k, v in tensors.items():
    k = k[len('module.'):] if k.startswith('module.') else k  # saved from DistributedDataParallel
    out[k] = np.asarray(v)
  return out


def _read_torch(path: str) -> Mapping[str, Any]:
  try:
    import torch
  except ImportError:
    raise UserError(f'Reading {path} needs PyTorch; install it (pip install "imgcls_jax[torch]") '
                    'or convert the file to .safetensors.') from None
  try:
    obj = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # torch raises many types for corrupt files and pickled modules
    raise UserError(f'Cannot load {path} as a PyTorch state dict ({first_line(e, limit=200)}); '
                    'save model.state_dict() with torch.save.') from None
  for key in _WRAPPER_KEYS:  # training scripts often wrap the state dict
    if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
      obj = obj[key]
  if not isinstance(obj, Mapping):
    raise UserError(f'{path} holds a {type(obj).__name__}, not a state dict; save '
                    'model.state_dict() with torch.save.')
  out = {}
  for k, v in obj.items():
    if hasattr(v, 'detach'):
      v = v.detach().cpu()
      out[k] = (v.float() if v.is_floating_point() else v).numpy()
  return out


def convert(state_dict: Mapping[str, np.ndarray], origin: str = 'the weights file') -> Weights:
  """Renames and re-lays-out a torchvision/timm state dict of a known family into this project's
  naming."""
  keys = set(state_dict)
  if vit.detect(keys):
    return vit.convert(state_dict, origin)
  if convnext.detect(keys):
    return convnext.convert(state_dict, origin)
  if family := mobile.detect(keys):
    return mobile.convert(state_dict, origin, family)
  if resnet.detect(keys):
    return resnet.convert(state_dict, origin)
  sample = ', '.join(sorted(keys)[:3])
  raise UserError(f'Cannot tell which model family {origin} holds (tensors {sample}, ...); only '
                  f"torchvision/timm {', '.join(FAMILIES)} state dicts can be imported.")


def load(path: str) -> Weights:
  """Weights from a local torchvision/timm-layout file, in this project's naming."""
  return convert(read_state_dict(path), origin=os.path.basename(path))
