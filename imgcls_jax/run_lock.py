"""One training at a time per run directory.

A second training started on a ``--workdir`` that is being trained (the same command rerun while
the first still runs, the orphans of a killed launcher, a requeued job beside the old one) writes
the same checkpoint steps and ``metrics.jsonl`` and mixes them silently: the last writer's model
wins, and the records of both stay. Process 0 holds an ``flock`` on ``<workdir>/.train.lock`` while
it trains; the kernel releases it when the process ends, however it ends (``kill -9`` included), so
no stale lock is ever left to clean up. The other processes of a multi-host run learn process 0's
answer, so all of them stop together. Readers (evaluate, predict, ...) take no lock: they may run
beside a training.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import time
from typing import Iterator

import jax
import numpy as np

from imgcls_jax.errors import UserError

LOCK_FILE = '.train.lock'


def _refusal(workdir: str, holder: str) -> str:
  who = f'{holder}, ' if holder not in ('', '?') else ''
  return (f'--workdir={workdir} is being trained by another process ({who}holding '
          f'{os.path.join(workdir, LOCK_FILE)}); two trainings in one run directory would mix '
          'their checkpoints and metrics: wait for it to end (or stop it) and rerun this command, '
          'or give a new --workdir.')


def _take(workdir: str) -> tuple[int | None, str, BaseException | None]:
  """Process 0's attempt: (the locked file's descriptor or None, the holder when another process
  holds it, the error that stopped the attempt)."""
  import fcntl
  try:
    fd = os.open(os.path.join(workdir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:   # a read-only or full disk: said in main's one line
    return None, '', e
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    try:
      holder = os.pread(fd, 512, 0).decode('utf-8', 'replace').strip() or '?'
    except OSError:
      holder = '?'
    os.close(fd)
    return None, holder, None
  except OSError as e:
    if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
      logging.warning('The file system of %s has no file locks (%s): nothing stops a second '
                      'training of this run directory; start one at a time.', workdir, e.strerror)
      return fd, '', None
    os.close(fd)
    return None, '', e
  try:
    os.ftruncate(fd, 0)
    os.pwrite(fd, f'pid {os.getpid()} on {socket.gethostname()}, since '
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
  except OSError:   # who holds it is a courtesy; the lock itself is held
    pass
  return fd, '', None


@contextlib.contextmanager
def held(workdir: str) -> Iterator[None]:
  """Holds ``workdir``'s training lock for the ``with`` block, or raises on every process: a
  UserError (one line) naming who holds it, or on process 0 the error that stopped it taking the
  lock (the others: a UserError pointing to it), so that no process waits for the others in vain.
  A file system without ``flock`` (some network ones) is trained on without the lock, with a
  warning."""
  fd, holder, failed = _take(workdir) if jax.process_index() == 0 else (None, '', None)
  status = 1 if holder else 2 if failed else 0
  if jax.process_count() > 1:   # everyone stops, not process 0 alone
    from jax.experimental import multihost_utils
    status = int(multihost_utils.broadcast_one_to_all(np.int32(status)))
  if failed is not None:
    raise failed
  if status == 1:
    raise UserError(_refusal(workdir, holder))
  if status == 2:
    raise UserError(f'Process 0 could not take the training lock of --workdir={workdir} (its own '
                    'error says why); fix that, then rerun the same launch command.')
  try:
    yield
  finally:
    if fd is not None:
      os.close(fd)   # releases the flock
