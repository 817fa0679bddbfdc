"""Quiet the aftermath of a failed Orbax read, so that a damaged checkpoint is one line.

When a restore fails (truncated or missing array data), Orbax's ``asyncio.run`` returns with the
first error and closes its event loop while tensorstore still completes the other reads. Each of
those completions then reports into the void, as tracebacks printed before, between and after the
project's one-line error (or its warning that a corrupt checkpoint was set aside), saying nothing
more: ``RuntimeError('Event loop is closed')`` from callbacks into the closed loop and read
coroutines' errors, both through ``sys.unraisablehook``, and asyncio's "Task exception was never
retrieved" log records for the read tasks. ``install`` (called before every Orbax read) drops
exactly those; every other unraisable exception and asyncio log record passes through unchanged.
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
