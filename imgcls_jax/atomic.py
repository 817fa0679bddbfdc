"""Files written whole or not at all: a full disk (or a kill) while writing one leaves the earlier
file as it was, never a half-written one that the next reader chokes on, and the OSError names the
file (a full disk's ``write`` is not told it). ``write_atomic`` writes a temporary file beside the
target, flushed to the disk, then renames it into place (the run's ``config.json``, ``samples.npz``,
every report file); ``append_whole`` appends a record and cuts off a part written before a failure
(``metrics.jsonl``)."""
from __future__ import annotations

import contextlib
import os
import secrets
from typing import Any, Callable


def append_whole(path: str, data: bytes) -> None:
  """Appends ``data`` to ``path`` whole: after a failed write the part written is cut off again
  (the next record would be glued to it), and the OSError names ``path``."""
  fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
  try:
    size = os.fstat(fd).st_size
    try:
      view = memoryview(data)
      while view:
        view = view[os.write(fd, view):]
    except OSError as e:
      with contextlib.suppress(OSError):
        os.ftruncate(fd, size)
      _raise_naming(e, path)
  finally:
    os.close(fd)


def _raise_naming(e: OSError, path: str, instead_of: str | None = None) -> None:
  """Raises ``e``, or when it names no file (a full disk: ``write`` is not told the path) or
  names ``instead_of``, the same error naming ``path``."""
  if e.errno is None or e.filename not in (None, instead_of):
    raise e
  raise OSError(e.errno, e.strerror, path) from e


def temporary_path(path: str, unique: bool = False) -> str:
  """Where ``write_atomic`` writes ``path`` first: ``NAME.tmp.EXT`` beside it (the extension
  kept, which tells matplotlib and numpy the format); ``unique``: ``NAME.PID.TOKEN.tmp.EXT``,
  for a file that several processes may replace at once (a sweep's shards, a shared cache; in
  containers on shared storage two of them can have the same PID)."""
  root, ext = os.path.splitext(path)
  return f'{root}.{os.getpid()}.{secrets.token_hex(4)}.tmp{ext}' if unique else f'{root}.tmp{ext}'


def write_atomic(path: str, content: str | Callable[[str], Any], unique: bool = False) -> None:
  """Writes ``path`` whole or not at all: ``content`` (text, or a function that writes the file
  named by its argument) goes to ``temporary_path(path, unique)``, flushed to the disk, which
  then replaces ``path``. On any failure (a full disk) the temporary file is removed and ``path``
  is left as it was; an OSError that names no file (or the temporary one) is raised naming
  ``path``."""
  tmp = temporary_path(path, unique)
  try:
    if callable(content):
      content(tmp)
      fd = os.open(tmp, os.O_RDONLY)
      try:
        os.fsync(fd)
      finally:
        os.close(fd)
    else:
      with open(tmp, 'w') as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException as e:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    if isinstance(e, OSError):
      _raise_naming(e, path, tmp)
    raise
