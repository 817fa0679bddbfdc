"""Byte-identical files across two lists, e.g. an image folder's eval and train splits: a test image
that is also a training image (a copy, or a link to it) makes a learnt image count as a new one.

Files are compared by size first (one ``os.stat`` each); only the files whose size both lists hold
are read: their first 16 KiB hashed (BLAKE2b), then, where those meet, the whole file, and a pair
is compared byte for byte. A folder of photos costs little more than its listing. Imports
nothing of the project.
"""
from __future__ import annotations

import collections
import filecmp
import hashlib
import os
from typing import Sequence

_CHUNK = 1 << 20
_HEAD = 16 << 10   # bytes read first from files whose sizes meet


def _size(path: str) -> int | None:
  try:
    return os.stat(path).st_size
  except OSError:   # missing or unreadable: the index names it
    return None


def _digest(path: str, limit: int | None = None) -> bytes | None:
  """BLAKE2b of the file's bytes (its first ``limit`` bytes when given); None when unreadable."""
  h = hashlib.blake2b(digest_size=20)
  left = limit
  try:
    with open(path, 'rb') as f:
      while left is None or left > 0:
        chunk = f.read(_CHUNK if left is None else min(_CHUNK, left))
        if not chunk:
          break
        h.update(chunk)
        if left is not None:
          left -= len(chunk)
  except OSError:
    return None
  return h.digest()


def identical(a: Sequence[str], b: Sequence[str]) -> list[tuple[str, str]]:
  """(file of ``a``, a file of ``b`` with the same bytes), for each file of ``a`` that has one, in
  ``a``'s order. Empty and unreadable files match nothing; a path in both lists matches itself.
  Files whose sizes meet are told apart by their first ``_HEAD`` bytes before being read whole,
  so photos of equal size cost one short read each."""
  sizes_a = [_size(p) for p in a]
  by_size: dict[int, list[str]] = collections.defaultdict(list)
  for p in b:
    size = _size(p)
    if size:
      by_size[size].append(p)
  heads: dict[str, bytes | None] = {}
  wholes: dict[str, bytes | None] = {}

  def same(p: str, q: str) -> bool:
    for memo, limit in ((heads, _HEAD), (wholes, None)):
      for path in (p, q):
        if path not in memo:
          memo[path] = _digest(path, limit)
      if memo[p] is None or memo[p] != memo[q]:
        return False
    return filecmp.cmp(p, q, shallow=False)

  pairs = []
  for p, size in zip(a, sizes_a):
    for q in by_size.get(size, []) if size else []:
      if same(p, q):
        pairs.append((p, q))
        break
  return pairs
