"""EfficientNet and MobileNetV3 in torchvision's layout into ``imgcls_jax.models.efficientnet`` /
``mobilenet``.

torchvision keeps the stem in ``features.0`` (conv ``.0``, BN ``.1``), the inverted-residual blocks
in ``features.<s>.<j>.block.<m>`` (EfficientNet, stages of blocks) or ``features.<i>.block.<m>``
(MobileNetV3), each block's modules in order [expand], depthwise, [squeeze-excite ``fc1`` /
``fc2``], project, and the last 1x1 conv in the last ``features`` entry. Our blocks are one flat
list ``blocks.<n>`` in network order.

timm's layout of these families (``conv_stem``, ``bn1``, ``blocks.<s>.<j>.conv_dw``, ...,
``conv_head``, ``classifier``) is not imported; ``timm_layout`` recognises it so that the error can
say so.
"""
from __future__ import annotations

import functools
import math
import re
from typing import Any, Mapping

import numpy as np

from imgcls_jax.models import efficientnet, layers, mobilenet
from imgcls_jax.torch_import._layout import Builder, count, registered_name, split
from imgcls_jax.weights import Weights

_BLOCK = re.compile(r'^features\.(\d+)\.(?:(\d+)\.)?block\.(\d+)\.(0|1|fc1|fc2)$')
_PLAIN = re.compile(r'^features\.(\d+)\.([01])$')
# family -> (its name in messages, our last conv, torch classifier index -> our module)
FAMILIES = {'efficientnet': ('torchvision EfficientNet (B0-B7)', 'head_conv',
                             {'classifier.1': 'head'}),
            'mobilenet_v3': ('torchvision MobileNetV3', 'last_conv',
                             {'classifier.0': 'pre_logits', 'classifier.3': 'head'})}


def detect(keys: set[str]) -> str | None:
  """'efficientnet', 'mobilenet_v3' or None."""
  if not any(_BLOCK.match(split(k)[0]) for k in keys):
    return None
  if 'classifier.1.weight' in keys:
    return 'efficientnet'
  return 'mobilenet_v3' if 'classifier.3.weight' in keys else None


def timm_layout(keys: set[str]) -> str | None:
  """'EfficientNet' or 'MobileNetV3' for a state dict in timm's layout of that family (its
  ``efficientnet_*`` / ``mobilenetv3_*``), else None."""
  if 'conv_stem.weight' not in keys or not any(k.startswith('blocks.') for k in keys):
    return None
  return 'EfficientNet' if 'bn2.weight' in keys else 'MobileNetV3'


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


def _efficientnet_facts(kw: dict[str, Any]) -> tuple[int, int, int]:
  """(stem width, blocks, head_conv width) of an EfficientNet built with keywords ``kw``."""
  ch = lambda c: layers.make_divisible(c * kw['width_mult'], 8)  # noqa: E731
  stages = efficientnet.B0_STAGES
  return (ch(stages[0][3]), sum(math.ceil(n * kw['depth_mult']) for *_, n in stages),
          4 * ch(stages[-1][4]))


def _mobilenet_facts(kw: dict[str, Any]) -> tuple[int, int, int, int]:
  """(stem width, blocks, last_conv width, pre_logits width) of a MobileNetV3 built with ``kw``."""
  ch = lambda c: mobilenet.scaled(c, kw['width_mult'])  # noqa: E731
  table = {'small': mobilenet.SMALL, 'large': mobilenet.LARGE}[kw['arch']]
  return ch(table[0][0]), len(table), 6 * ch(table[-1][3]), ch(kw['last_channel'])


def model_name(params: dict[str, np.ndarray], family: str) -> str | None:
  """The registered EfficientNet / MobileNetV3 (``efficientnet_b0``, ...) with these tensors'
  stem width, block count and last widths; None when there is none."""
  stem = np.shape(params['stem.conv.kernel'])[-1]                     # HWIO
  blocks = count(params, r'blocks\.(\d+)\.')
  if family == 'efficientnet':
    facts = stem, blocks, np.shape(params['head_conv.conv.kernel'])[-1]
    return registered_name(efficientnet.EfficientNet, facts, _efficientnet_facts)
  facts = (stem, blocks, np.shape(params['last_conv.conv.kernel'])[-1],
           np.shape(params['pre_logits.kernel'])[-1])
  return registered_name(mobilenet.MobileNetV3, facts, _mobilenet_facts)


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
  return out.weights('stem.conv.kernel', functools.partial(model_name, family=family))
