"""Graceful stop on SIGTERM / SIGINT: the loop finishes the current step, saves, and exits 0.

Single process: Python handlers set a flag that the loop polls between steps; a second Ctrl-C
interrupts at once. Multi-process: JAX's preemption service (started by ``jax.distributed``) catches
SIGTERM on any process and ``reached_preemption_sync_point`` makes every process stop at the same
step, so all of them save the same checkpoint.
"""
from __future__ import annotations

import logging
import os
import shlex
import signal
import sys
import threading
from typing import Any

import jax

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopWatcher:
  """Context manager; ``requested(step)`` says whether to stop before running ``step``."""

  def __init__(self) -> None:
    self.signal_name: str | None = None
    self.step: int | None = None  # the last step asked about: where the loop is
    self._previous: dict[int, Any] = {}
    self._multi = jax.process_count() > 1

  def _handle(self, signum: int, frame: Any) -> None:
    del frame
    self.signal_name = signal.Signals(signum).name
    logging.warning('Received %s: finishing the current step, then saving a checkpoint.',
                    self.signal_name)
    if signum == signal.SIGINT:  # a second Ctrl-C stops at once
      signal.signal(signal.SIGINT, signal.default_int_handler)

  def __enter__(self) -> 'StopWatcher':
    if threading.current_thread() is threading.main_thread():
      # In a multi-process run the preemption service owns SIGTERM; SIGINT stays the default.
      for sig in () if self._multi else _SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc: Any) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def requested(self, step: int) -> bool:
    """True when the loop should save and stop before ``step`` (call it at every step)."""
    self.step = step
    if self._multi:
      from jax.experimental import multihost_utils
      if multihost_utils.reached_preemption_sync_point(step):
        self.signal_name = self.signal_name or 'SIGTERM (preemption notice)'
        return True
      return False
    return self.signal_name is not None


def resume_hint(workdir: str) -> str:
  """How to resume: the command line that started this process, when it was the CLI."""
  if jax.process_count() > 1:
    return (f'rerun the same launch command on every host (same --workdir={shlex.quote(workdir)}); '
            'all processes resume from that checkpoint')
  argv = sys.argv
  if argv and os.path.basename(argv[0]) == 'main.py' and 'imgcls_jax' in argv[0]:
    return 'rerun: python -m imgcls_jax.main ' + ' '.join(shlex.quote(a) for a in argv[1:])
  return f'rerun the same command with --workdir={shlex.quote(workdir)}'
