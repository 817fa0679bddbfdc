"""Quiet the aftermath of a failed Orbax read, so that a damaged checkpoint is one line.

When a restore fails (truncated or missing array data), Orbax's ``asyncio.run`` returns with the
first error and closes its event loop while tensorstore still completes the other reads. Each of
those completions then reports into the void, as tracebacks printed before, between and after the
project's one-line error (or its warning that a corrupt checkpoint was set aside), saying nothing
more: ``RuntimeError('Event loop is closed')`` from callbacks into the closed loop and read
coroutines' errors, both through ``sys.unraisablehook``, and asyncio's "Task exception was never
retrieved" log records for the read tasks. ``install`` (called before every Orbax read) drops
exactly those; every other unraisable exception and asyncio log record passes through unchanged.

Orbax's own log noise goes too, from import on (``checkpoint`` imports this module): its warning
on every save without metrics, and its ERROR with a whole damaged metadata file's content.
"""
from __future__ import annotations

import logging
import sys
from typing import Any

_INSTALLED = False


def _in_checkpoint_io(exc: BaseException | None) -> bool:
  """Raised inside Orbax's or tensorstore's code."""
  tb = exc.__traceback__ if exc is not None else None
  while tb is not None:
    name = tb.tb_frame.f_code.co_filename
    if '/orbax/' in name or '/tensorstore/' in name:
      return True
    tb = tb.tb_next
  return False


def _abandoned(unraisable: Any) -> bool:
  exc = unraisable.exc_value
  closed_loop = isinstance(exc, RuntimeError) and str(exc) == 'Event loop is closed'
  return closed_loop or _in_checkpoint_io(exc)


class _AbandonedTaskFilter(logging.Filter):
  """Drops asyncio's report of a read task's error (tensorstore's read errors are ValueError:
  OUT_OF_RANGE, NOT_FOUND, DATA_LOSS; sharded restores wrap them in Orbax's code)."""

  def filter(self, record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    return not (record.getMessage().startswith(('Task exception was never retrieved',
                                              'Future exception was never retrieved'))
                and (isinstance(exc, (ValueError, OSError)) or _in_checkpoint_io(exc)))


def install() -> None:
  """Installs the filters (once per process; later calls do nothing)."""
  global _INSTALLED
  if _INSTALLED:
    return
  _INSTALLED = True
  previous = sys.unraisablehook

  def hook(unraisable: Any) -> None:
    if not _abandoned(unraisable):
      previous(unraisable)

  sys.unraisablehook = hook
  logging.getLogger('asyncio').addFilter(_AbandonedTaskFilter())


class _NoMissingMetricsWarning(logging.Filter):
  """Orbax warns on every save without metrics when best-tracking is on; ours omit them on purpose
  (only checkpoints taken right after an evaluation carry metrics)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return 'did not provide metrics' not in record.getMessage()


class _DamagedOrbaxMetadata(logging.Filter):
  """Orbax logs an ERROR (with the file's whole content) each time it reads a step's empty or
  damaged ``_CHECKPOINT_METADATA``, three times per resume. The file holds timestamps only: the
  restore reads the arrays and the meta item without it. One warning per file instead (none for a
  missing one: an emptied step folder, which the reader's error names)."""

  _PREFIXES = ('Failed to json parse Metadata file: ', 'Failed to read Metadata file: ')

  def __init__(self) -> None:
    super().__init__()
    self._seen: set[str] = set()

  def filter(self, record: logging.LogRecord) -> bool:
    if record.getMessage().startswith('Metadata file does not exist: '):
      return False
    if not record.getMessage().startswith(self._PREFIXES) or not record.args:
      return True
    path = str(record.args[0])
    if path in self._seen:
      return False
    self._seen.add(path)
    record.msg, record.args = ("Orbax's metadata file %s is empty or damaged; it holds only the "
                               "save's timestamps, and the checkpoint is read without it."), (path,)
    record.levelno, record.levelname = logging.WARNING, 'WARNING'
    return True


logging.getLogger('absl').addFilter(_NoMissingMetricsWarning())
logging.getLogger('absl').addFilter(_DamagedOrbaxMetadata())
