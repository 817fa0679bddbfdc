"""Graceful stop on SIGTERM / SIGINT / SIGHUP: the loop finishes the current step, saves, and
exits 0.

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

# SIGHUP: the terminal went away (an ssh session dropped without tmux); stop as for SIGTERM.
_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class StopWatcher:
  """Context manager; ``requested(step)`` says whether to stop before running ``step``.

  Watchers nest (a cross-validation's or sweep's around each run's): a signal the inner one
  receives is the outer one's too, so a notice that lands after a run's last check (its final
  evaluation or save) still stops the folds or trials after it."""

  def __init__(self) -> None:
    self.signal_name: str | None = None
    self.step: int | None = None  # the last step asked about: where the loop is
    self._previous: dict[int, Any] = {}
    self._outer: StopWatcher | None = None
    self._multi = jax.process_count() > 1

  def _handle(self, signum: int, frame: Any) -> None:
    del frame
    self.signal_name = signal.Signals(signum).name
    if signum == signal.SIGHUP:   # the terminal is gone: writes to it would fail (EIO) from now
      _detach_from_terminal()
    logging.warning('Received %s: finishing the current step, then saving a checkpoint.',
                    self.signal_name)
    outer = self._outer
    while outer is not None:   # every watcher around this one (a sweep's around its folds')
      outer.signal_name = outer.signal_name or self.signal_name
      outer = outer._outer
    if signum == signal.SIGINT:  # a second Ctrl-C stops at once
      signal.signal(signal.SIGINT, signal.default_int_handler)

  def __enter__(self) -> 'StopWatcher':
    if threading.current_thread() is threading.main_thread():
      # In a multi-process run the preemption service owns SIGTERM; SIGINT stays the default.
      for sig in () if self._multi else _SIGNALS:
        current = signal.getsignal(sig)
        outer = getattr(current, '__self__', None)
        if isinstance(outer, StopWatcher):
          self._outer = outer
        if sig == signal.SIGHUP and current == signal.SIG_IGN:
          continue   # nohup's: the run is meant to outlive its terminal
        if sig == signal.SIGINT and current == signal.default_int_handler and self._outer:
          continue   # a Ctrl-C already came (an outer watcher's): a second one stops at once
        self._previous[sig] = signal.signal(sig, self._handle)
      # A notice the watchers around this one got before it began (a fold's set-up) is its too.
      outer = self._outer
      while outer is not None and not self.signal_name:
        self.signal_name, outer = outer.signal_name, outer._outer
    return self

  def __exit__(self, *exc: Any) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()
    if self.signal_name == 'SIGINT' and self._outer is not None:   # a second Ctrl-C: at once
      signal.signal(signal.SIGINT, signal.default_int_handler)

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


def _detach_from_terminal() -> None:
  """Points this process's stdout / stderr at /dev/null where they were the hung-up terminal (not
  where they go to a file), so that the save and the lines after it do not fail on EIO."""
  devnull = os.open(os.devnull, os.O_WRONLY)
  try:
    for fd in (1, 2):
      if os.isatty(fd):
        os.dup2(devnull, fd)
  finally:
    os.close(devnull)


def resume_hint(workdir: str) -> str:
  """How to resume: the command line that started this process, when it was the CLI."""
  if jax.process_count() > 1:
    return (f'rerun the same launch command on every host (same --workdir={shlex.quote(workdir)}); '
            'all processes resume from that checkpoint')
  argv = sys.argv
  if argv and os.path.basename(argv[0]) == 'main.py' and 'imgcls_jax' in argv[0]:
    return 'rerun: python -m imgcls_jax.main ' + ' '.join(shlex.quote(a) for a in argv[1:])
  return f'rerun the same command with --workdir={shlex.quote(workdir)}'
