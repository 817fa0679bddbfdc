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
  ``a``'s order (the first such file of ``b``, in ``b``'s order). Empty and unreadable files match
  nothing; a path in both lists matches itself. Files whose sizes meet are told apart by their
  first ``_HEAD`` bytes before being read whole, so photos of equal size cost one short read
  each; the files of ``b`` are looked up by (size, head digest), then by whole digest, so a
  folder of many files of one size (uncompressed formats) costs one read per file, not one per
  pair."""
  sizes_a = [_size(p) for p in a]
  wanted = {size for size in sizes_a if size}
  by_size: dict[int, list[str]] = collections.defaultdict(list)
  for q in b:
    size = _size(q)
    if size in wanted:
      by_size[size].append(q)
  by_head: dict[tuple[int, bytes], list[str]] = {}
  by_whole: dict[tuple[int, bytes], dict[bytes, list[str]]] = {}

  def wholes(key: tuple[int, bytes]) -> dict[bytes, list[str]]:
    """The files of ``b`` under (size, head), by whole digest (read on first use)."""
    if key not in by_whole:
      group: dict[bytes, list[str]] = collections.defaultdict(list)
      for q in by_head.get(key, []):
        digest = _digest(q)
        if digest is not None:
          group[digest].append(q)
      by_whole[key] = group
    return by_whole[key]

  for size in {s for s in sizes_a if s in by_size}:
    for q in by_size[size]:
      head = _digest(q, _HEAD)
      if head is not None:
        by_head.setdefault((size, head), []).append(q)
  pairs = []
  for p, size in zip(a, sizes_a):
    if not size or size not in by_size:
      continue
    head = _digest(p, _HEAD)
    if head is None or (size, head) not in by_head:
      continue
    whole = _digest(p)
    for q in wholes((size, head)).get(whole, []) if whole is not None else []:
      if filecmp.cmp(p, q, shallow=False):
        pairs.append((p, q))
        break
  return pairs
