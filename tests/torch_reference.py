"""PyTorch reference models for tests: torchvision and timm on a CPU-only torch.

The PyPI torchvision wheel's compiled ops (``torchvision/_C.so``) link the CUDA build of torch, so
on the CPU build they fail to load, and ``import torchvision`` then dies registering fake kernels
for two ops nobody defined (``torchvision::nms``, ``qnms``). The model definitions need none of the
compiled ops, so when the extension is missing we define those two schemas first; the models (and
timm, which imports torchvision) then import and run as usual.
"""
from __future__ import annotations

import importlib
import importlib.util

_SHIM = None


def _define_missing_ops() -> None:
  global _SHIM
  import torch
  if _SHIM is not None or hasattr(torch.ops.torchvision, 'nms'):
    return
  try:
    torch.ops.torchvision.nms  # noqa: B018 - defined when the extension loaded
    return
  except (AttributeError, RuntimeError):
    pass
  _SHIM = torch.library.Library('torchvision', 'DEF')
  _SHIM.define('nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')
  _SHIM.define('qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor')


def _load_extension_quietly() -> None:
  """Loads torchvision's compiled ops if they work with this torch (they do on a CUDA torch)."""
  import glob
  import os
  import torch
  spec = importlib.util.find_spec('torchvision')
  for path in glob.glob(os.path.join(os.path.dirname(spec.origin), '_C*.so')):
    try:
      torch.ops.load_library(path)
    except OSError:
      pass


def torchvision():
  """``import torchvision`` that works on a CPU-only torch; None when it is not installed."""
  if importlib.util.find_spec('torch') is None or importlib.util.find_spec('torchvision') is None:
    return None
  _load_extension_quietly()
  _define_missing_ops()
  return importlib.import_module('torchvision')


def timm():
  """``import timm`` (after the torchvision fix above); None when it is not installed."""
  if torchvision() is None or importlib.util.find_spec('timm') is None:
    return None
  return importlib.import_module('timm')
