"""ResNet: torchvision and timm name the tensors alike (``conv1``, ``bn1``, ``layer2.0.conv1``,
``layer2.0.downsample.{0,1}``, ``fc``); ``imgcls_jax.models.resnet`` uses the same names, with
``downsample.conv`` / ``downsample.bn`` for the shortcut."""
from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from imgcls_jax.models.resnet import ResNet
from imgcls_jax.torch_import._layout import Builder, count, registered_name, split
from imgcls_jax.weights import Weights

_BN_MODULE = re.compile(r'^(bn\d|layer\d+\.\d+\.bn\d|layer\d+\.\d+\.downsample\.1)$')
_CONV_MODULE = re.compile(r'^(conv1|layer\d+\.\d+\.conv\d|layer\d+\.\d+\.downsample\.0)$')


def detect(keys: set[str]) -> bool:
  """Whether the state dict looks like a ResNet."""
  return 'conv1.weight' in keys or any(k.startswith('layer1.') for k in keys)


def model_name(params: dict[str, np.ndarray]) -> str | None:
  """The registered ResNet (``resnet18``, ...) with these tensors' depths, block and width; None
  for a widened or grouped variant (wide_resnet50_2, ResNeXt) or unregistered depths."""
  width = np.shape(params['conv1.kernel'])[-1]                         # HWIO
  if np.shape(params.get('layer1.0.conv1.kernel', ()))[-1:] != (width,):
    return None
  stages = tuple(count(params, rf'layer{i}\.(\d+)\.') for i in range(1, 5))
  block = 'bottleneck' if 'layer1.0.conv3.kernel' in params else 'basic'
  return registered_name(ResNet, (stages, block, width),
                         lambda kw: (tuple(kw['stage_sizes']), kw['block'], kw['width']))


def convert(state_dict: Mapping[str, np.ndarray], origin: str) -> Weights:
  """A torchvision/timm ResNet (v1.5) state dict in this project's naming."""
  out = Builder('torchvision/timm ResNet (v1.5: conv1, bn1, layer1-4, fc)', origin)
  for key, value in state_dict.items():
    module, leaf = split(key)
    ours = (module.replace('downsample.0', 'downsample.conv')
            .replace('downsample.1', 'downsample.bn'))
    is_conv = _CONV_MODULE.match(module) and leaf == 'weight' and np.ndim(value) == 4
    if is_conv or _BN_MODULE.match(module) or (module == 'fc' and np.ndim(value) <= 2):
      out.module(ours, leaf, value, key)
    else:
      out.reject(key, value)
  return out.weights('conv1.kernel', model_name)
