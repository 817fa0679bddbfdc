"""What the host preprocessing ops (``data/pp``, TensorFlow) do to an image's geometry, known
without TensorFlow: which ones flip it (a flip changes the meaning of some datasets' images:
``info.check_flips``) and which ones shift its content (``device_augment.twice_shifted``). The
built-in ops are listed here; an op registered from one's own code says so itself
(``pp.register(name, mirrors=True)`` / ``shifts=True``) and is added.
"""
from __future__ import annotations

import re

MIRRORS = {'flip_lr'}
SHIFTS = {'pad_crop', 'random_resized_crop'}


def declare(name: str, *, mirrors: bool, shifts: bool) -> None:
  """Records what an op registered from outside the package does (replacing a name's traits)."""
  for table, flag in ((MIRRORS, mirrors), (SHIFTS, shifts)):
    if flag:
      table.add(name)
    else:
      table.discard(name)


def op_names(spec: str) -> list[str]:
  """The op names of a spec string (``'pad_crop(pad=4)|flip_lr'`` -> ``['pad_crop', 'flip_lr']``)."""
  return [m.group(1) for part in (spec or '').split('|') if (m := re.match(r'\s*(\w+)', part))]


def mirroring(spec: str) -> str:
  """The first op of ``spec`` that flips images ('' when none does)."""
  return next((name for name in op_names(spec) if name in MIRRORS), '')


def shifting(spec: str) -> list[str]:
  """The ops of ``spec`` that move the image content as a translation does."""
  return [name for name in op_names(spec) if name in SHIFTS]
