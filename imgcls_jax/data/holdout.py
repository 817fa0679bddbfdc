"""Seeded, stratified hold-out draws over a listing of (id, class) (folder_index: the eval split
of a folder or manifest without splits, and ``data.validation_fraction``'s validation split)."""
from __future__ import annotations

import zlib

import numpy as np


def draw(ids: list[str], labels: list[int], names: tuple[str, ...], fraction: float,
         seed: int, salt: int = 0) -> set[int]:
  """Indices held out: per class, ``round(fraction * n)`` (at least 1 of 2+, and never a class's
  last image: the rest keeps one) chosen by the seed (``salt`` makes another draw from the same
  seed: the validation split's)."""
  held: set[int] = set()
  by_class: dict[int, list[int]] = {}
  for i, y in enumerate(labels):
    by_class.setdefault(y, []).append(i)
  for y, members in by_class.items():
    members.sort(key=lambda i: ids[i])
    n = len(members)
    k = int(round(fraction * n))
    if fraction > 0:
      k = min(max(k, 1), n - 1)
    name = names[y] if y >= 0 else ''   # multi-label images without tags form one stratum
    rng = np.random.default_rng([seed, zlib.crc32(name.encode()), *([salt] if salt else [])])
    held.update(members[j] for j in rng.permutation(n)[:k])
  return held


def strata(labels: list, multilabel: bool) -> list[int]:
  """The class each image is stratified by (multi-label: its first tag, -1 for none)."""
  return [(y[0] if y else -1) if multilabel else y for y in labels]
