"""Multi-process start-up: ``jax.distributed.initialize`` from ``config.distributed`` or the cluster.

Keys left unset (None) are filled in by JAX's own cluster detection: Cloud TPU VMs (every worker of a
slice), SLURM (``srun``: coordinator = first node of the step, process id = ``SLURM_PROCID``), Open
MPI, and ``JAX_COORDINATOR_ADDRESS`` / ``JAX_COORDINATOR_PORT`` / ``JAX_LOCAL_DEVICE_IDS`` from the
environment. Keys given in the config win over detection. Call :func:`initialize` before anything
touches a JAX device (``main.py`` does, when ``config.distributed.enabled``).

JAX ends a process with a C++ abort (no Python exception) when not every process joins in time,
and a survivor of a process that died prints a traceback, then hangs in JAX's shutdown until that
abort. Here a watchdog ends the start-up with one sentence instead, and
:func:`exit_on_lost_process` ends a survivor at once with one sentence (exit status
``LOST_PROCESS_EXIT``).
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import jax
import ml_collections

from imgcls_jax.errors import UserError

# Exit status of a process whose run lost another process (EX_TEMPFAIL: rerunning resumes).
LOST_PROCESS_EXIT = 75
# Start-up watchdog: JAX's own timeout is this much longer, so the watchdog speaks first.
_JAX_TIMEOUT_SLACK_S = 30
# What a collective (Gloo, the coordination service) says when another process is gone.
_LOST_CONNECTION = re.compile(r'Gloo|[Cc]onnection (reset|refused|closed|lost)|Broken pipe|'
                              r'Socket closed|DEADLINE_EXCEEDED|UNAVAILABLE|heartbeat')
_SOURCE_POSITION = re.compile(r'\[[\w./-]+\.(cc|h):\d+\] ')  # '[external/.../pair.cc:538] '


def requested(config: ml_collections.ConfigDict) -> bool:
  """Whether the config asks this process to join a multi-process run."""
  d = config.get('distributed')
  return bool(d is not None and d.get('enabled', False))


def parse_device_ids(text: Any) -> list[int] | None:
  """``'0,1,2'`` (or a sequence of ints) -> ``[0, 1, 2]``; empty -> None (JAX's default)."""
  if text is None or text == '' or text == ():
    return None
  items = text.split(',') if isinstance(text, str) else list(text)
  try:
    ids = [int(str(i).strip()) for i in items]
  except ValueError:
    raise UserError(f"config.distributed.local_device_ids='{text}' is not a comma-separated list "
                    "of device numbers; give e.g. '0,1,2,3' or leave it empty.") from None
  if any(i < 0 for i in ids) or len(set(ids)) != len(ids):
    raise UserError(f"config.distributed.local_device_ids='{text}' must list distinct "
                    'non-negative device numbers.')
  return ids


def _check(d: ml_collections.ConfigDict) -> None:
  n, pid = d.get('num_processes'), d.get('process_id')
  if n is not None and n < 1:
    raise UserError(f'config.distributed.num_processes={n} must be at least 1 (or None to '
                    'detect it from the cluster).')
  if pid is not None and pid < 0:
    raise UserError(f'config.distributed.process_id={pid} must be >= 0.')
  timeout = d.get('initialization_timeout', 300)
  if timeout is None or timeout < 1:
    raise UserError(f'config.distributed.initialization_timeout={timeout} must be at least 1 '
                    '(seconds to wait for every process to join).')
  heartbeat = d.get('heartbeat_timeout', 100)
  if heartbeat is None or heartbeat < 2:
    raise UserError(f'config.distributed.heartbeat_timeout={heartbeat} must be at least 2 '
                    '(seconds without a heartbeat before a process counts as lost).')
  if n is not None and pid is not None and pid >= n:
    raise UserError(f'config.distributed.process_id={pid} must be smaller than '
                    f'config.distributed.num_processes={n} (ids run 0..{n - 1}).')
  address = d.get('coordinator_address')
  host, port = _split(address) if address is not None else ('', 0)
  if address is not None and not (host and 1 <= port <= 65535):
    raise UserError(f"config.distributed.coordinator_address='{address}' must be 'host:port' "
                    "(process 0's address and a free port, 1-65535), e.g. '10.0.0.2:8476'.")


def wait_for_coordinator(address: str, timeout_s: float) -> None:
  """Waits until something accepts TCP connections at ``address``; UserError after ``timeout_s``.

  JAX aborts the whole process (no Python exception) when the coordinator never answers, so a
  process other than 0 checks first and fails with a sentence instead of a stack dump.
  """
  host, port = _split(address)
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host, port), timeout=2.0):
        return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise UserError(
            f'No coordinator answers at {address} after {timeout_s:.0f} s ({e.strerror or e}); '
            'start process 0 with the same config.distributed.coordinator_address, check that '
            'this machine can reach that host and port, or raise '
            'config.distributed.initialization_timeout.') from None
      time.sleep(0.25)


def _lower_first(text: str) -> str:
  """'The process id ...' -> 'the process id ...' (JAX's sentence inside ours)."""
  return text[:1].lower() + text[1:]


def _split(address: str) -> tuple[str, int]:
  """('host', port) of 'host:port' ('[::1]:8476': '::1'); port 0 when it is not a number."""
  host, _, port = address.rpartition(':')
  return host.strip('[]'), int(port) if port.isdigit() else 0


def _is_local(family: int, ip: str) -> bool:
  """Whether this machine can bind ``ip`` (so it is one of its addresses)."""
  try:
    with socket.socket(family, socket.SOCK_STREAM) as s:
      s.bind((ip, 0))
    return True
  except OSError:
    return False


def check_coordinator_host(address: str) -> str:
  """Process 0 runs the coordinator at ``address``: UserError when its host does not resolve; a
  note ('' when fine) when it names no address of this machine (it may still reach this one,
  e.g. through a port forward, so that is only logged and quoted if the others do not join)."""
  host, port = _split(address)
  try:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
  except socket.gaierror as e:
    raise UserError(
        f"config.distributed.coordinator_address='{address}': the host {host} does not resolve "
        f'({e.strerror or e}); process 0 runs the coordinator, so give it an address of its own '
        f"machine (e.g. 127.0.0.1:{port} when every process runs here), and the same to the "
        'others.') from None
  ips = sorted({info[4][0] for info in infos})
  if any(_is_local(info[0], info[4][0]) for info in infos):
    return ''
  named = host if ips == [host] else f'{host} ({", ".join(ips)})'
  note = f'{named} is not an address of this machine, where process 0 runs the coordinator'
  logging.warning('config.distributed.coordinator_address=%r: %s.', address, note)
  return note


def _exit_now(message: str, status: int) -> NoReturn:
  """Prints ``error: message`` and ends the process at once: JAX's exit handlers would wait on the
  other processes (``jax.distributed.shutdown``) or abort."""
  for handler in logging.getLogger().handlers:
    with contextlib.suppress(Exception):
      handler.flush()
  with contextlib.suppress(Exception):
    sys.stdout.flush()
  with contextlib.suppress(Exception):
    print(f'error: {message}', file=sys.stderr, flush=True)
  os._exit(status)


def _not_joined(address: str | None, n: int | None, pid: int | None, timeout_s: int,
                note: str) -> str:
  """The sentence for a start-up that the other processes did not join within ``timeout_s``."""
  where = f'the run at {address}' if address else 'the run (auto-detected coordinator)'
  note = f' ({note})' if note else ''
  fix = ('start every process with the same config.distributed.coordinator_address and '
         f'num_processes{f"={n}" if n else ""} (launch/local.sh starts them all on this machine; '
         'under SLURM, srun starts every task), or raise '
         'config.distributed.initialization_timeout.')
  if pid == 0 and n == 2:
    return f'Process 1 did not join {where} within {timeout_s} s{note}; {fix}'
  if pid == 0 and n:
    return f'The {n - 1} other processes did not all join {where} within {timeout_s} s{note}; {fix}'
  if n:
    answers = '; the coordinator answers' if address else ''
    return (f'Not all {n} processes joined {where} within {timeout_s} s (this is process '
            f'{pid}{answers}); {fix}')
  return f'Not every process joined {where} within {timeout_s} s; {fix}'


@contextlib.contextmanager
def _start_watchdog(message: str, timeout_s: int) -> Iterator[None]:
  """Ends the process with ``message`` (status 2) unless the block finishes within ``timeout_s``."""
  done = threading.Event()

  def watch() -> None:
    if not done.wait(timeout_s):
      _exit_now(message, 2)
  threading.Thread(target=watch, name='distributed-start-watchdog', daemon=True).start()
  try:
    yield
  finally:
    done.set()


def initialize(d: ml_collections.ConfigDict) -> None:
  """Joins this process to the run described by ``d`` (= ``config.distributed``); idempotent."""
  if jax.distributed.is_initialized():
    return
  _check(d)
  kwargs = dict(coordinator_address=d.get('coordinator_address'),
                num_processes=d.get('num_processes'), process_id=d.get('process_id'),
                local_device_ids=parse_device_ids(d.get('local_device_ids')),
                initialization_timeout=int(d.get('initialization_timeout', 300)),
                heartbeat_timeout_seconds=int(d.get('heartbeat_timeout', 100)))
  given = {k: v for k, v in kwargs.items()
           if v is not None and k not in ('initialization_timeout', 'heartbeat_timeout_seconds')}
  logging.info('jax.distributed.initialize(%s)',
               ', '.join(f'{k}={v!r}' for k, v in given.items()) or 'auto-detect')
  address, n, pid = kwargs['coordinator_address'], kwargs['num_processes'], kwargs['process_id']
  timeout = kwargs['initialization_timeout']
  note = ''
  if address and pid == 0:
    note = check_coordinator_host(address)
  elif address and pid:  # not process 0 itself
    wait_for_coordinator(address, timeout)
  if pid == 0 and n:
    logging.info('Process 0 of %d: coordinator at %s; waiting up to %d s for the %d other '
                 'process(es) to join.', n, address, timeout, n - 1)
  elif n and pid is not None:
    logging.info('Process %d of %d: waiting up to %d s for all %d processes to join at %s.', pid,
                 n, timeout, n, address)
  # JAX aborts the process (a C++ check failure) at its own timeout: it gets a longer one, and
  # the watchdog ends the process at ours with a sentence.
  kwargs['initialization_timeout'] = timeout + _JAX_TIMEOUT_SLACK_S
  try:
    with _start_watchdog(_not_joined(address, n, pid, timeout, note), timeout):
      jax.distributed.initialize(**kwargs)
  except ValueError as e:  # JAX: a value is missing and no cluster environment supplied it.
    raise UserError(
        f'config.distributed.enabled is True but {_lower_first(str(e).rstrip("."))}: no cluster '
        'environment (Cloud TPU VM, SLURM srun, Open MPI) was detected; set config.distributed.'
        'coordinator_address, num_processes and process_id (see launch/local.sh).') from None
  except Exception as e:  # XlaRuntimeError: the coordinator did not answer in time, port in use.
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    raise UserError(
        f'Could not join the distributed run (coordinator '
        f'{kwargs["coordinator_address"] or "auto-detected"}): {first}; start all processes with '
        'the same coordinator_address and num_processes, check that process 0 is running and its '
        'port is free and reachable, or raise config.distributed.initialization_timeout.') from None
  n = d.get('num_processes')
  if n is not None and n != jax.process_count():   # the coordinator's count is the run's
    _exit_now(f'config.distributed.num_processes={n} here, but the run that process 0 '
              f'coordinates has {jax.process_count()} processes; give every process the same '
              'num_processes.', 2)   # (joined: JAX's exit would wait on the others, then abort)
  logging.info('Process %d of %d: %d local devices, %d in all (%s).', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)


def is_lost_connection(err: BaseException) -> bool:
  """Whether ``err`` is a collective failing because another process is gone (Gloo, a lost
  connection, a deadline or an unavailable peer), not a problem of this process's own."""
  return isinstance(err, jax.errors.JaxRuntimeError) and bool(_LOST_CONNECTION.search(str(err)))


def lost_process_message(err: BaseException, step: int | None, checkpoint_dir: str) -> str:
  """The sentence a survivor prints: who stopped, where the run was, how to resume."""
  n, me = jax.process_count(), jax.process_index()
  who = f'Process {1 - me} of 2' if n == 2 else f'Another of the {n} processes'
  at = f' at step {step}' if step is not None else ''
  try:
    from imgcls_jax import checkpoint_files
    steps = checkpoint_files.finished_steps(checkpoint_dir)
  except OSError:
    steps = []
  resume = (f'resume from checkpoint {steps[-1]} in {checkpoint_dir}' if steps else
            'start the run again (no checkpoint was saved)')
  text = (_SOURCE_POSITION.sub('', str(err)).strip().splitlines() or [''])[0]
  cause = f'{type(err).__name__}: {text[:160]}{" ..." if len(text) > 160 else ""}'
  return (f'{who} stopped{at} (this process {me} lost its connection to it: {cause}); see its '
          f'log for why, then rerun the same launch command on every host to {resume}.')


@contextlib.contextmanager
def exit_on_lost_process(checkpoint_dir: str,
                         step: Callable[[], int | None]) -> Iterator[None]:
  """In a multi-process run, a collective that fails because another process is gone
  (``is_lost_connection``) ends this process at once: one sentence (``lost_process_message``),
  exit status ``LOST_PROCESS_EXIT``, no traceback and no wait in JAX's shutdown (which would
  hang until the dead process's heartbeat timeout, then abort). ``step()``: where the run is.
  Every other exception passes through unchanged."""
  try:
    yield
  except jax.errors.JaxRuntimeError as e:
    if jax.process_count() < 2 or not is_lost_connection(e):
      raise
    _exit_now(lost_process_message(e, step(), checkpoint_dir), LOST_PROCESS_EXIT)
