"""EfficientNet and MobileNetV3 in torchvision's layout into ``imgcls_jax.models.efficientnet`` /
``mobilenet``.

torchvision keeps the stem in ``features.0`` (conv ``.0``, BN ``.1``), the inverted-residual blocks
in ``features.<s>.<j>.block.<m>`` (EfficientNet, stages of blocks) or ``features.<i>.block.<m>``
(MobileNetV3), each block's modules in order [expand], depthwise, [squeeze-excite ``fc1`` /
``fc2``], project, and the last 1x1 conv in the last ``features`` entry. Our blocks are one flat
list ``blocks.<n>`` in network order.
"""
from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from imgcls_jax.torch_import._layout import Builder, split
from imgcls_jax.weights import Weights

_BLOCK = re.compile(r'^features\.(\d+)\.(?:(\d+)\.)?block\.(\d+)\.(0|1|fc1|fc2)$')
_PLAIN = re.compile(r'^features\.(\d+)\.([01])$')
# family -> (its name in messages, our last conv, torch classifier index -> our module)
FAMILIES = {'efficientnet': ('EfficientNet (B0-B7)', 'head_conv', {'classifier.1': 'head'}),
            'mobilenet_v3': ('MobileNetV3', 'last_conv',
                             {'classifier.0': 'pre_logits', 'classifier.3': 'head'})}


def detect(keys: set[str]) -> str | None:
  """'efficientnet', 'mobilenet_v3' or None."""
  if not any(_BLOCK.match(split(k)[0]) for k in keys):
    return None
  if 'classifier.1.weight' in keys:
    return 'efficientnet'
  return 'mobilenet_v3' if 'classifier.3.weight' in keys else None


def _block_names(state_dict: Mapping[str, np.ndarray]) -> dict[tuple[int, int, int], str]:
  """``(feature, sub-block, module index)`` -> our ``blocks.<n>.<part>`` for every block module."""
  modules: dict[tuple[int, int], set[tuple[int, str]]] = {}
  for key in state_dict:
    m = _BLOCK.match(split(key)[0])
    if m:
      block = (int(m.group(1)), int(m.group(2) or 0))
      modules.setdefault(block, set()).add((int(m.group(3)), m.group(4)))
  names = {}
  for n, block in enumerate(sorted(modules)):
    convs = sorted({i for i, part in modules[block] if part in ('0', '1')})
    parts = (['expand'] if len(convs) == 3 else []) + ['dwconv', 'project']
    names.update({block + (i,): f'blocks.{n}.{p}' for i, p in zip(convs, parts)})
    names.update({block + (i,): f'blocks.{n}.se' for i, part in modules[block]
                  if part in ('fc1', 'fc2')})
  return names


def convert(state_dict: Mapping[str, np.ndarray], origin: str, family: str) -> Weights:
  """A torchvision EfficientNet / MobileNetV3 state dict in this project's naming."""
  label, last_conv, classifier = FAMILIES[family]
  out = Builder(label, origin)
  blocks = _block_names(state_dict)
  plain = [int(m.group(1)) for k in state_dict if (m := _PLAIN.match(split(k)[0]))]
  last = max(plain, default=0)
  for key, value in state_dict.items():
    module, leaf = split(key)
    if m := _BLOCK.match(module):
      ours = blocks[(int(m.group(1)), int(m.group(2) or 0), int(m.group(3)))]
      part = m.group(4)
      if part in ('fc1', 'fc2'):
        out.module(f'{ours}.{part}', leaf, value, key, linear_from_1x1=True)
      else:
        out.module(f'{ours}.' + ('conv', 'bn')[int(part)], leaf, value, key)
    elif (m := _PLAIN.match(module)) and int(m.group(1)) in (0, last) and last > 0:
      ours = 'stem' if int(m.group(1)) == 0 else last_conv
      out.module(f'{ours}.' + ('conv', 'bn')[int(m.group(2))], leaf, value, key)
    elif module in classifier:
      out.module(classifier[module], leaf, value, key)
    else:
      out.reject(key, value)
  return out.weights('stem.conv.kernel')
