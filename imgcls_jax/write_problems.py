"""The one line ``main.run`` prints when a mode cannot write its files: a full disk or quota, a
read-only file system, no permission, a file where a folder is needed. ``write_failure`` finds the
cause behind any exception (an OSError, or a library's error quoting one: Orbax's tensorstore
writes), ``write_problem`` says it, naming the config key or ``--workdir`` that gave the path and,
for a mode that writes into the run directory, the key that sends its files elsewhere. Anything
else is a bug, left to its traceback. Standard library only at import: ``main`` imports it before
any work, and its log filter uses it.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import sys

# The modes of a trained run that write into --workdir unless told otherwise: the key that says
# where instead (the fix when the run is on a full or read-only disk, or someone else's).
OUTPUT_KEYS = {'evaluate': 'evaluate.output_dir', 'compare': 'evaluate.output_dir',
               'curves': 'evaluate.output_dir', 'export': 'export.output_dir',
               'embed': 'embed.output_dir'}
# Errors of a library that carry an OSError in their message only (Orbax's tensorstore writes:
# ValueError("RESOURCE_EXHAUSTED: ... No space left on device [os_error_code='28']")).
_WORDS = (('No space left on device', errno.ENOSPC), ('Disk quota exceeded', errno.EDQUOT),
          ('Read-only file system', errno.EROFS))
_DISK_FULL = {errno.ENOSPC: 'No space left', errno.EDQUOT: 'Disk quota exceeded'}
_CANNOT_WRITE = (errno.EROFS, errno.EACCES, errno.EPERM)
_QUOTED_PATH = re.compile(r'["\'](/[^"\']+)["\']')


def write_failure(err: BaseException | None) -> tuple[int, str | None, str] | None:
  """(errno, file or None, strerror) of the full disk (ENOSPC, EDQUOT), read-only file system or
  missing permission behind ``err``: it or an exception it was raised from or during (an OSError,
  or a library error quoting one), else None."""
  seen: list[BaseException] = []
  todo = [err]
  while todo:
    e = todo.pop(0)
    if e is None or any(e is s for s in seen):
      continue
    seen.append(e)
    if isinstance(e, OSError) and e.errno in (*_DISK_FULL, *_CANNOT_WRITE):
      name = e.filename if isinstance(e.filename, str) else None
      return e.errno, name, e.strerror or os.strerror(e.errno)
    try:
      text = str(e)
    except Exception:  # noqa: BLE001  (a library's exception that cannot say itself)
      text = ''
    for words, code in _WORDS:
      if words in text:
        quoted = _QUOTED_PATH.search(text)
        return code, quoted.group(1) if quoted else None, words
    todo += [e.__cause__, e.__context__, *getattr(e, 'exceptions', ())]
  return None


def write_problem(e: Exception, config, workdir: str | None, mode: str) -> str | None:
  """One sentence for ``e`` when it is about a path or a disk (``_path_problem``,
  ``_disk_full``), else None (a bug, to see in full)."""
  found = write_failure(e)
  if found and found[0] in _DISK_FULL:
    return _disk_full(found[0], found[1], config, workdir, mode)
  if isinstance(e, OSError) and e.filename is not None:
    return _path_problem(e, config, workdir, mode)
  if not found:
    return None
  code, path, why = found
  if path:
    return _path_problem(OSError(code, why, path), config, workdir, mode)
  where, key = _output_source(config, workdir, mode), OUTPUT_KEYS.get(mode)
  folder = _folder_of(where)
  if code != errno.EROFS or not folder or _writable(folder):
    return None   # no file named and nothing to check it against: a bug's, shown in full
  if key and where and where.startswith('--workdir='):
    return (f'Cannot write into {where} ({why}): --mode={mode} writes there unless config.{key} '
            f'is set; set --config.{key} to a folder this user can create and write.')
  return (f"Cannot write {f'into {where}' if where else 'a file'} ({why}); check that this user "
          'can create and write files there.')


def _disk_full(code: int, path: str | None, config, workdir: str | None, mode: str) -> str:
  """The one line for a full disk (or quota) met while writing ``path`` (None: not known)."""
  where = ((_path_source(path, config, workdir) or os.path.dirname(path)) if path
           else _output_source(config, workdir, mode))
  step = re.search(r'/checkpoints/(\d+)(\.orbax-checkpoint-tmp[^/]*)?(/|$)', path or '')
  what = f'checkpoint {step.group(1)}' if step else path
  key = OUTPUT_KEYS.get(mode)
  free = _free_bytes(_folder_of(where)) if not path else None
  if free is not None and free > _ROOM:   # not the disk it was guessed to be: say so
    import tempfile
    rerun = f': training {_resumes(workdir)}' if mode == 'train' else ''
    return (f'{_DISK_FULL[code]} on a device this command writes to (the error names no file, and '
            f'{where} has {free / 2**30:.1f} GiB free: perhaps the temporary folder '
            f'{tempfile.gettempdir()} or config.data.data_dir); free space there, then rerun the '
            f'same command{rerun}.')
  if mode == 'train' and not (where or '').startswith('--workdir='):
    fix = f', then rerun the same command: training {_resumes(workdir)}'
  elif mode == 'train':
    fix = (' (or move the run directory to a larger disk and point --workdir at it), then rerun '
           f'the same command: training {_resumes(workdir)}')
  elif mode in ('cross_validation', 'sweep'):
    fix = (', then rerun the same command: it resumes from what --workdir holds (its newest '
           'complete checkpoints, finished trials or folds)')
  elif key and (where or '').startswith('--workdir='):
    fix = f' (or set --config.{key} to a folder on another disk), then rerun the same command'
  else:
    fix = ', then rerun the same command'
  return (f"{_DISK_FULL[code]} on the device of {where or 'a file it writes'}"
          f"{f' (while writing {what})' if what else ''}; free space there{fix}.")


_ROOM = 64 * 2**20   # free bytes above which a disk was not the one found full


def _folder_of(where: str | None) -> str | None:
  """The folder of ``_output_source``'s or ``_path_source``'s 'KEY=PATH' (or a plain path)."""
  if not where:
    return None
  path = where.split('=', 1)[1] if '=' in where else where
  return path if os.path.isdir(path) else os.path.dirname(path) or None


def _writable(folder: str) -> bool:
  return os.access(folder, os.W_OK)


def _free_bytes(folder: str | None) -> int | None:
  import shutil
  try:
    return shutil.disk_usage(folder).free if folder else None
  except OSError:
    return None


def _resumes(workdir: str | None) -> str:
  """Where a training in ``workdir`` starts when run again: its newest complete checkpoint."""
  from imgcls_jax.checkpoint import CHECKPOINTS_DIR
  ckpt_dir = os.path.join(workdir or '', CHECKPOINTS_DIR)
  steps = sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit()) if (
      workdir and os.path.isdir(ckpt_dir)) else []
  return (f'resumes from its newest complete checkpoint, step {steps[-1]}' if steps else
          'starts again (no checkpoint was complete)')


def _output_source(config, workdir: str | None, mode: str) -> str | None:
  """Where ``mode`` writes when the failing file is not known: the folder of its output key when
  that is set, else ``--workdir``."""
  key = OUTPUT_KEYS.get(mode)
  node = config if key else None
  for part in key.split('.') if key else ():
    node = node.get(part) if hasattr(node, 'get') else None
  if isinstance(node, str) and node:
    return f'config.{key}={node}'
  return f'--workdir={workdir}' if workdir else None


def _path_problem(e: OSError, config=None, workdir: str | None = None,
                  mode: str = 'train') -> str:
  """One sentence for a file or folder the run could not create, read or write (a --workdir or an
  output path in /proc, a file where a folder is needed, no permission, a read-only disk), naming
  the config key (or --workdir) that gave the path when one did; for a mode that writes into the
  run directory, the key that sends its files elsewhere."""
  path = f'{e.filename} -> {e.filename2}' if e.filename2 else str(e.filename)
  why = f'Cannot use {path} ({e.strerror or type(e).__name__})'
  blocker = _file_in_the_way(str(e.filename)) if e.errno in (errno.EEXIST, errno.ENOTDIR) else ''
  if blocker:
    why = (f'Cannot use {path}: it is a file, and a folder is needed' if blocker == str(e.filename)
           else f'Cannot use {path}: {blocker} is a file, and a folder is needed there')
  source = _path_source(str(e.filename), config, workdir)
  key = OUTPUT_KEYS.get(mode)
  unreadable = os.path.exists(str(e.filename)) and not os.access(str(e.filename), os.R_OK)
  if (key and source and source.startswith('--workdir=') and e.errno in _CANNOT_WRITE
      and not unreadable):
    return (f'{why}: --mode={mode} writes into the run directory unless config.{key} is set; set '
            f'--config.{key} to a folder this user can create and write.')
  if source:
    what = 'a folder' if blocker else 'a folder (or file)'
    return f'{why}; check {source}: it must be {what} this user can create and write.'
  return (f"{why}; check --workdir and the config's paths (output_dir, output, data_dir, "
          'compilation_cache_dir): each must be a folder (or file) this user can create and '
          'write.')


def _file_in_the_way(path: str) -> str:
  """``path`` or the nearest folder above it that is a file ('' when none is)."""
  path = os.path.abspath(path)
  while not os.path.isfile(path):
    if os.path.dirname(path) == path:
      return ''
    path = os.path.dirname(path)
  return path


def _path_source(filename: str, config, workdir: str | None) -> str | None:
  """The config key (``config.a.b``) or ``--workdir`` whose path is ``filename`` or the nearest
  folder above it, else None."""
  target = os.path.abspath(filename)

  def under(value: str) -> bool:
    value = os.path.abspath(os.path.expanduser(value))
    return target == value or target.startswith(value.rstrip(os.sep) + os.sep)

  def keys(node, prefix):
    for k in node.keys():
      v = node[k]
      if hasattr(v, 'keys'):
        yield from keys(v, f'{prefix}{k}.')
      elif isinstance(v, str) and v and ('/' in v or v.startswith('.')):
        yield f'{prefix}{k}', v
  named = [(f'config.{k}', v) for k, v in keys(config, '')] if config is not None else []
  named += [('--workdir', workdir)] if workdir else []
  found = sorted((len(os.path.abspath(v)), k, v) for k, v in named if under(v))
  if not found:
    return None
  _, key, value = found[-1]   # the longest path: the most specific key
  return f'{key}={value}'


def not_a_library_write_failure(record: logging.LogRecord) -> bool:
  """False for a library's ERROR record (with its traceback) about a full or read-only disk:
  Orbax logs one from each of its saving threads, and the main thread gets the same error (at
  ``wait_until_finished``), which ``run`` reports in one line."""
  if record.levelno < logging.ERROR or not record.name.startswith(('absl', 'orbax')):
    return True   # (every record passes here: the cheap test first)
  exc = record.exc_info[1] if record.exc_info else None
  try:
    return not (write_failure(exc) or write_failure(Exception(record.getMessage())))
  except Exception:  # noqa: BLE001  (a record that cannot be formatted: logging says so)
    return True


def no_oserror_tracebacks_at_exit() -> None:
  """After the one line for a file that cannot be written: the exit handlers of writers left
  open meet the same disk again (tensorboardX flushes its events file at exit, and its thread
  then finds its queue closed); their OSErrors are not printed after that line."""
  import threading
  unraisable, in_thread = sys.unraisablehook, threading.excepthook
  sys.unraisablehook = lambda u: None if isinstance(u.exc_value, OSError) else unraisable(u)
  threading.excepthook = lambda a: None if isinstance(a.exc_value, OSError) else in_thread(a)
