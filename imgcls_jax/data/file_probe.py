"""Image file headers: what PIL says about a file without decoding it, cached on disk.

``probe`` reads size, mode and EXIF orientation from the header (a JPEG / PNG without its end
marker is decoded once to tell); ``probe_all`` probes many files, in one process per core past
``_PARALLEL_FROM`` (header parsing holds the GIL: threads were slower than one loop), and keeps
the results per folder or manifest in one JSON file keyed by each file's size and mtime.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import sys
from typing import Any

from imgcls_jax import atomic

_PARALLEL_FROM = 20_000     # files to probe before it pays to start worker processes (~0.5 s)
_MAX_PROBE_PROCESSES = 16


_BANDS = {'1': 1, 'L': 1, 'I': 1, 'F': 1, 'LA': 2, 'La': 2, 'RGB': 3, 'YCbCr': 3, 'LAB': 3,
          'HSV': 3, 'RGBA': 4, 'RGBa': 4, 'RGBX': 4, 'CMYK': 4, 'P': 3, 'PA': 3}


def _band_count(mode: str) -> int:
  """Bands of a PIL mode ('I;16' -> 1); palette images count as colour."""
  return _BANDS.get(mode.split(';')[0], 3)


def _complete(path: str, fmt: str) -> bool:
  """False when a JPEG or PNG lacks its end marker (a truncated download, the usual corruption)."""
  marker = {'JPEG': b'\xff\xd9', 'PNG': b'IEND\xaeB`\x82'}.get(fmt)
  if marker is None:
    return True
  with open(path, 'rb') as f:
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(max(0, size - 64))
    return marker in f.read()


def probe(path: str) -> tuple[int, int, int] | str:
  """Upright (height, width, bands) of an image file from its header, or why it is unreadable."""
  from PIL import Image, UnidentifiedImageError
  try:
    if os.path.getsize(path) == 0:
      return 'empty file (0 bytes)'
    with Image.open(path) as img:
      w, h = img.size
      bands = _band_count(img.mode)
      raw = img.info.get('exif') if img.format == 'PNG' else None
      exif = Image.Exif() if img.format == 'PNG' else img.getexif()
      if raw:
        exif.load(raw)
      if exif.get(0x0112) in (5, 6, 7, 8):  # rotated by 90 degrees: height and width swap
        h, w = w, h
      if not _complete(path, img.format):
        img.load()  # decodes it: raises when it really is truncated
  except Image.DecompressionBombError:   # PIL's limit: the image is there, only huge
    return ("more pixels than PIL's decompression-bomb limit "
            f'({2 * (Image.MAX_IMAGE_PIXELS or 0)}); shrink the image')
  except PermissionError as e:   # the file is there: this user may not read it
    return f'cannot be read ({e.strerror or "permission denied"})'
  except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
    return 'cannot be decoded'
  return h, w, bands


class _Cache:
  """``{id: [size, mtime_ns, probe result]}`` of one folder or manifest, as one JSON file."""

  def __init__(self, kind: str, location: str, cache_dir: str):
    self.path = ''
    self.entries: dict[str, list[Any]] = {}
    self.location = location
    if not cache_dir:
      return
    key = hashlib.sha1(f'{kind}:{location}'.encode()).hexdigest()[:16]
    self.path = os.path.join(cache_dir, f'{key}.json')
    try:
      with open(self.path) as f:
        got = json.load(f)
      if got.get('location') == location:
        self.entries = got['files']
    except (OSError, ValueError, KeyError, AttributeError):
      self.entries = {}

  def save(self) -> None:
    if not self.path:
      return
    try:
      os.makedirs(os.path.dirname(self.path), exist_ok=True)
      atomic.write_atomic(self.path, json.dumps({'location': self.location,
                                                  'files': self.entries}), unique=True)
    except OSError as e:  # a read-only cache directory costs only speed
      logging.warning('Could not write the image index cache %s (%s); set config.data.index_cache '
                      'to a writable directory.', self.path, e)


def probe_all(root: str, kind: str, location: str, cache_dir: str,
              ids: list[str]) -> list[tuple[int, int, int] | str]:
  """Probe results for ``ids`` (paths relative to ``root``; missing files: 'file not found'),
  from the cache of ``location`` where the file's size and mtime still match."""
  cache = _Cache(kind, location, cache_dir)
  results: list[Any] = [None] * len(ids)
  todo: list[int] = []
  stats: list[tuple[int, int] | None] = []
  for i, rel in enumerate(ids):
    try:
      st = os.stat(os.path.join(root, rel))
      stats.append((st.st_size, st.st_mtime_ns))
    except OSError:
      stats.append(None)
      results[i] = 'file not found'
      continue
    hit = cache.entries.get(rel)
    if hit is not None and (hit[0], hit[1]) == stats[i]:
      results[i] = hit[2] if isinstance(hit[2], str) else tuple(hit[2])
    else:
      todo.append(i)
  if todo:
    for i, got in zip(todo, _probe_many([os.path.join(root, ids[i]) for i in todo])):
      results[i] = got
      cache.entries[ids[i]] = [*stats[i], got if isinstance(got, str) else list(got)]
    cache.save()
  return results


def _probe_many(paths: list[str]) -> list[tuple[int, int, int] | str]:
  """``probe`` of every path: in this process for a few thousand files (header parsing holds the
  GIL: threads were slower than one loop), in one spawned process per core for more."""
  main = sys.modules.get('__main__')
  spawnable = getattr(main, '__spec__', None) is not None or os.path.isfile(
      getattr(main, '__file__', '') or '')   # a worker re-imports __main__ (not from stdin)
  if len(paths) < _PARALLEL_FROM or not spawnable:
    return [probe(p) for p in paths]
  import multiprocessing
  workers = min(os.cpu_count() or 1, _MAX_PROBE_PROCESSES)
  try:
    with concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context('spawn')) as pool:
      return list(pool.map(probe, paths, chunksize=512))
  except (OSError, concurrent.futures.process.BrokenProcessPool) as e:
    logging.warning('Probing image headers in %d processes failed (%s); probing in this one.',
                    workers, e)
    return [probe(p) for p in paths]
