"""Image file headers: what PIL says about a file without decoding it, cached on disk.

``probe`` reads size, mode and orientation (``images.orientation``) from the header (a JPEG / PNG
without its end marker is decoded once to tell); ``probe_all`` probes many files, in one process
per core past ``_PARALLEL_FROM`` (header parsing holds the GIL: threads were slower than one
loop), and keeps the results per folder or manifest in one JSON file keyed by each file's size and
mtime, less the files that are gone.

The worker processes are ``python -c _WORKER``, fed paths and answering results over pipes: they
never import the caller's ``__main__`` (multiprocessing's 'spawn' ran a script without an
``if __name__ == '__main__':`` guard again in every worker).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
from typing import Any

from imgcls_jax import atomic
from imgcls_jax.data import images

_PARALLEL_FROM = 20_000     # files to probe before it pays to start worker processes (~0.5 s)
_MAX_PROBE_PROCESSES = 16
_CHUNK = 256                # paths per request to a worker process
# A worker's whole program: its parent's sys.path (argv[1]), then ``_serve``; nothing else.
_WORKER = ('import json, sys; sys.path[:] = json.loads(sys.argv[1]); '
           'from imgcls_jax.data.file_probe import _serve; _serve()')


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
      # EXIF's orientation, else XMP's, a damaged EXIF block ignored: as images.decode turns it
      # (from the header's chunks: a PNG's eXIf after its pixels is not read here)
      if images.orientation(img) in (5, 6, 7, 8):  # turned by 90 degrees: h and w swap
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
  from the cache of ``location`` where the file's size and mtime still match. The cache forgets
  the files that are gone, and keeps those of other calls (another split of ``location``)."""
  cache = _Cache(kind, location, cache_dir)
  wanted = set(ids)
  gone = _gone(root, [rel for rel in cache.entries if rel not in wanted])
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
      if rel in cache.entries:
        gone.append(rel)
      continue
    hit = cache.entries.get(rel)
    if hit is not None and (hit[0], hit[1]) == stats[i]:
      results[i] = hit[2] if isinstance(hit[2], str) else tuple(hit[2])
    else:
      todo.append(i)
  for rel in gone:
    cache.entries.pop(rel, None)
  if todo:
    for i, got in zip(todo, _probe_many([os.path.join(root, ids[i]) for i in todo])):
      results[i] = got
      cache.entries[ids[i]] = [*stats[i], got if isinstance(got, str) else list(got)]
  if todo or gone:
    cache.save()
  return results


def _gone(root: str, rels: list[str]) -> list[str]:
  """Those of ``rels`` (paths relative to ``root``) whose file is no longer there: one listing
  per folder, and a check of each name a listing lacks (a case-insensitive disk, a folder that
  cannot be listed), so the files of other splits cost no ``stat`` each."""
  by_dir: dict[str, list[tuple[str, str]]] = {}
  for rel in rels:
    folder, name = os.path.split(os.path.join(root, rel))
    by_dir.setdefault(folder, []).append((rel, name))
  gone = []
  for folder, files in by_dir.items():
    try:
      names = set(os.listdir(folder or '.'))
    except OSError:
      names = set()
    gone += [rel for rel, name in files
             if name not in names and not os.path.exists(os.path.join(folder, name))]
  return gone


def _probe_many(paths: list[str]) -> list[tuple[int, int, int] | str]:
  """``probe`` of every path: in this process for a few thousand files (header parsing holds the
  GIL: threads were slower than one loop), in one worker process per core for more."""
  if len(paths) < _PARALLEL_FROM or not sys.executable or getattr(sys, 'frozen', False):
    return [probe(p) for p in paths]   # (a frozen app's executable is the app, not a Python)
  chunks = [paths[k:k + _CHUNK] for k in range(0, len(paths), _CHUNK)]
  workers = min(os.cpu_count() or 1, _MAX_PROBE_PROCESSES, len(chunks))
  try:
    done, why = _in_workers(chunks, workers)
  except OSError as e:   # no temporary file for the workers' error output
    done, why = [None] * len(chunks), str(e)
  if any(got is None for got in done):
    logging.warning('Probing image headers in %d processes failed (%s); probing in this one.',
                    workers, why)
  return [got for k, chunk in enumerate(chunks)
          for got in (done[k] if done[k] is not None else [probe(p) for p in chunk])]


def _in_workers(chunks: list[list[str]], workers: int) -> tuple[list[list[Any] | None], str]:
  """``probe`` results of each chunk from ``workers`` processes, each taking the next chunk as it
  finishes one (None for a chunk that a failing worker left), and why one failed."""
  done: list[list[Any] | None] = [None] * len(chunks)
  lock = threading.Lock()
  queue = iter(range(len(chunks)))
  failures: list[str] = []

  def drive(proc: subprocess.Popen) -> None:
    try:
      with proc.stdin:   # closing it ends the worker
        while True:
          with lock:
            k = next(queue, None)
          if k is None:
            return
          proc.stdin.write(json.dumps(chunks[k]).encode() + b'\n')
          proc.stdin.flush()
          line = proc.stdout.readline()
          got = json.loads(line) if line else None
          if not isinstance(got, list) or len(got) != len(chunks[k]):
            raise ValueError('a worker exited' if not line else 'a worker answered out of turn')
          done[k] = [g if isinstance(g, str) else tuple(g) for g in got]
    except Exception as e:  # noqa: BLE001  (whatever it was, this process probes that chunk)
      failures.append(str(e) or type(e).__name__)

  procs: list[subprocess.Popen] = []
  with tempfile.TemporaryFile() as err:
    try:
      for _ in range(workers):
        try:
          procs.append(subprocess.Popen([sys.executable, '-c', _WORKER, json.dumps(sys.path)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=err))
        except OSError as e:
          failures.append(f'cannot start {sys.executable}: {e}')
          break
      threads = [threading.Thread(target=drive, args=(p,), daemon=True) for p in procs]
      for t in threads:
        t.start()
      for t in threads:
        t.join()
    except BaseException:   # Ctrl-C
      for p in procs:
        p.kill()
      raise
    finally:
      for p in procs:
        try:
          p.wait(10)
        except subprocess.TimeoutExpired:
          p.kill()
          p.wait()
        p.stdout.close()
    err.seek(0)
    said = err.read().decode(errors='replace').strip()
  if said and not failures:
    sys.stderr.write(said + '\n')   # the workers' warnings, as this process would have shown
  return done, said.splitlines()[-1] if said else (failures or ['no reason given'])[0]


def _serve() -> None:
  """A worker of ``_in_workers``: each line of stdin is a JSON list of paths, answered by one line
  of their ``probe`` results on stdout (kept for the answers alone: a print goes to stderr)."""
  answers = os.fdopen(os.dup(sys.stdout.fileno()), 'wb')
  os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
  for line in sys.stdin.buffer:
    answers.write(json.dumps([probe(p) for p in json.loads(line)]).encode() + b'\n')
    answers.flush()
