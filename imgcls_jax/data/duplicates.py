"""Byte-identical files across two lists, e.g. an image folder's eval and train splits: a test image
that is also a training image (a copy, or a link to it) makes a learnt image count as a new one.

Files are compared by size first (one ``os.stat`` each), and only the files whose size both lists
hold are read and hashed (BLAKE2b of the bytes; a pair is then compared byte for byte), so a
folder of photos, whose sizes rarely meet, costs little more than its listing. Imports nothing of
the project.
"""
from __future__ import annotations

import collections
import filecmp
import hashlib
import os
from typing import Sequence

_CHUNK = 1 << 20


def _size(path: str) -> int | None:
  try:
    return os.stat(path).st_size
  except OSError:   # missing or unreadable: the index names it
    return None


def _digest(path: str) -> bytes | None:
  h = hashlib.blake2b(digest_size=20)
  try:
    with open(path, 'rb') as f:
      while chunk := f.read(_CHUNK):
        h.update(chunk)
  except OSError:
    return None
  return h.digest()


def identical(a: Sequence[str], b: Sequence[str]) -> list[tuple[str, str]]:
  """(file of ``a``, a file of ``b`` with the same bytes), for each file of ``a`` that has one, in
  ``a``'s order. Unreadable files match nothing; a path in both lists matches itself."""
  sizes_a = [_size(p) for p in a]
  by_size: dict[int, list[str]] = collections.defaultdict(list)
  for p in b:
    size = _size(p)
    if size is not None:
      by_size[size].append(p)
  digests: dict[str, bytes | None] = {}

  def digest(path: str) -> bytes | None:
    if path not in digests:
      digests[path] = _digest(path)
    return digests[path]

  pairs = []
  for p, size in zip(a, sizes_a):
    if size is None or size not in by_size:
      continue
    d = digest(p)
    for q in by_size[size]:
      if d is not None and digest(q) == d and filecmp.cmp(p, q, shallow=False):
        pairs.append((p, q))
        break
  return pairs
