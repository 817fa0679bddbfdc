"""ResNet weights in torchvision / timm layout (``.safetensors`` or a torch state dict) -> Flax.

Both libraries name ResNet tensors the same way: ``conv1.weight``, ``bn1.{weight,bias,running_mean,
running_var}``, ``layer2.0.conv1.weight``, ``layer2.0.downsample.{0,1}.*``, ``fc.{weight,bias}``.
``imgcls_jax.models.resnet`` uses the same attribute names (``downsample.conv`` /
``downsample.bn``), so the mapping is by name, with layouts converted: conv OIHW -> HWIO, linear
(out, in) -> (in, out), BN weight/bias -> scale/bias (parameters) and running_mean/var -> mean/var
(batch statistics).

``.safetensors`` files are read without torch; ``.pt`` / ``.pth`` / ``.bin`` state dicts need torch
(``pip install 'imgcls_jax[torch]'``). Nothing is downloaded: the file must be local.
"""
from __future__ import annotations

import os
import re
from typing import Any, Mapping

import numpy as np

from imgcls_jax.errors import UserError
from imgcls_jax.weights import Weights

# torch BN parameter name -> (collection, our name)
_BN = {'weight': ('params', 'scale'), 'bias': ('params', 'bias'),
       'running_mean': ('batch_stats', 'mean'), 'running_var': ('batch_stats', 'var')}
_BN_MODULE = re.compile(r'^(bn\d|layer\d+\.\d+\.bn\d|layer\d+\.\d+\.downsample\.1)$')
_CONV_MODULE = re.compile(r'^(conv1|layer\d+\.\d+\.conv\d|layer\d+\.\d+\.downsample\.0)$')
_WRAPPER_KEYS = ('state_dict', 'model', 'model_state', 'model_state_dict', 'module')


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
    raise UserError(f'Cannot load {path} as a PyTorch state dict ({type(e).__name__}: '
                    f'{str(e).splitlines()[0][:200]}); save model.state_dict() with torch.save.'
                    ) from None
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
  """Renames and re-lays-out a torchvision/timm ResNet state dict into this project's naming."""
  params: dict[str, np.ndarray] = {}
  stats: dict[str, np.ndarray] = {}
  for key, value in state_dict.items():
    module, _, leaf = key.rpartition('.')
    ours = (module.replace('downsample.0', 'downsample.conv')
            .replace('downsample.1', 'downsample.bn'))
    if leaf == 'num_batches_tracked':
      continue
    value = np.asarray(value, np.float32)
    if _CONV_MODULE.match(module) and leaf == 'weight' and value.ndim == 4:
      params[f'{ours}.kernel'] = np.transpose(value, (2, 3, 1, 0))      # OIHW -> HWIO
    elif _BN_MODULE.match(module) and leaf in _BN:
      collection, name = _BN[leaf]
      (params if collection == 'params' else stats)[f'{ours}.{name}'] = value
    elif module == 'fc' and leaf == 'weight' and value.ndim == 2:
      params['fc.kernel'] = value.T                                      # (out, in) -> (in, out)
    elif module == 'fc' and leaf == 'bias':
      params['fc.bias'] = value
    else:
      raise UserError(f"Tensor '{key}' {tuple(value.shape)} in {origin} is not part of a "
                      'torchvision/timm ResNet (v1.5: conv1, bn1, layer1-4, fc); only that layout '
                      'can be imported.')
  if 'conv1.kernel' not in params:
    raise UserError(f'{origin} has no conv1.weight: it is not a torchvision/timm ResNet state '
                    'dict.')
  return Weights(params=params, batch_stats=stats, origin=origin)


def load(path: str) -> Weights:
  """Weights from a local torchvision/timm-layout ResNet file, in this project's naming."""
  return convert(read_state_dict(path), origin=os.path.basename(path))
