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


@contextlib.contextmanager
def held(workdir: str) -> Iterator[None]:
  """Holds ``workdir``'s training lock for the ``with`` block, or raises UserError (one line,
  on every process) naming who holds it. A filesystem without ``flock`` (some network ones) is
  trained on without the lock, with a warning."""
  fd, holder = None, ''
  if jax.process_index() == 0:
    path = os.path.join(workdir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    import fcntl
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 512, 0).decode('utf-8', 'replace').strip() or '?'
      os.close(fd)
      fd = None
    except OSError as e:
      if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
        os.close(fd)
        raise
      logging.warning('The file system of %s has no file locks (%s): nothing stops a second '
                      'training of this run directory; start one at a time.', workdir, e.strerror)
    else:
      os.ftruncate(fd, 0)
      os.pwrite(fd, f'pid {os.getpid()} on {socket.gethostname()}, since '
                    f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
  refused = bool(holder)
  if jax.process_count() > 1:   # everyone stops, not process 0 alone
    from jax.experimental import multihost_utils
    refused = bool(multihost_utils.broadcast_one_to_all(np.int32(refused)))
  if refused:
    raise UserError(_refusal(workdir, holder))
  try:
    yield
  finally:
    if fd is not None:
      os.close(fd)   # releases the flock
