"""Multi-process start-up: ``jax.distributed.initialize`` from ``config.distributed`` or the cluster.

Keys left unset (None) are filled in by JAX's own cluster detection: Cloud TPU VMs (every worker of a
slice), SLURM (``srun``: coordinator = first node of the step, process id = ``SLURM_PROCID``), Open
MPI, and ``JAX_COORDINATOR_ADDRESS`` / ``JAX_COORDINATOR_PORT`` / ``JAX_LOCAL_DEVICE_IDS`` from the
environment. Keys given in the config win over detection. Call :func:`initialize` before anything
touches a JAX device (``main.py`` does, when ``config.distributed.enabled``).
"""
from __future__ import annotations

import logging
import socket
import time
from typing import Any

import jax
import ml_collections

from imgcls_jax.errors import UserError


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
  if n is not None and pid is not None and pid >= n:
    raise UserError(f'config.distributed.process_id={pid} must be smaller than '
                    f'config.distributed.num_processes={n} (ids run 0..{n - 1}).')
  address = d.get('coordinator_address')
  if address is not None and (':' not in address or not address.rsplit(':', 1)[1].isdigit()):
    raise UserError(f"config.distributed.coordinator_address='{address}' must be 'host:port' "
                    "(process 0's address and a free port), e.g. '10.0.0.2:8476'.")


def wait_for_coordinator(address: str, timeout_s: float) -> None:
  """Waits until something accepts TCP connections at ``address``; UserError after ``timeout_s``.

  JAX aborts the whole process (no Python exception) when the coordinator never answers, so a
  process other than 0 checks first and fails with a sentence instead of a stack dump.
  """
  host, port = address.rsplit(':', 1)
  host = host.strip('[]')
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host, int(port)), timeout=2.0):
        return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise UserError(
            f'No coordinator answers at {address} after {timeout_s:.0f} s ({e.strerror or e}); '
            'start process 0 with the same config.distributed.coordinator_address, check that '
            'this machine can reach that host and port, or raise '
            'config.distributed.initialization_timeout.') from None
      time.sleep(0.25)


def initialize(d: ml_collections.ConfigDict) -> None:
  """Joins this process to the run described by ``d`` (= ``config.distributed``); idempotent."""
  if jax.distributed.is_initialized():
    return
  _check(d)
  kwargs = dict(coordinator_address=d.get('coordinator_address'),
                num_processes=d.get('num_processes'), process_id=d.get('process_id'),
                local_device_ids=parse_device_ids(d.get('local_device_ids')),
                initialization_timeout=int(d.get('initialization_timeout', 300)))
  given = {k: v for k, v in kwargs.items() if v is not None and k != 'initialization_timeout'}
  logging.info('jax.distributed.initialize(%s)',
               ', '.join(f'{k}={v!r}' for k, v in given.items()) or 'auto-detect')
  if kwargs['coordinator_address'] and kwargs['process_id']:  # given, and not process 0 itself
    wait_for_coordinator(kwargs['coordinator_address'], kwargs['initialization_timeout'])
  try:
    jax.distributed.initialize(**kwargs)
  except ValueError as e:  # JAX: a value is missing and no cluster environment supplied it.
    raise UserError(
        f'config.distributed.enabled is True but {str(e).rstrip(".")}: no cluster environment '
        '(Cloud TPU VM, SLURM srun, Open MPI) was detected; set config.distributed.'
        'coordinator_address, num_processes and process_id (see launch/local.sh).') from None
  except Exception as e:  # XlaRuntimeError: the coordinator did not answer in time, port in use.
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    raise UserError(
        f'Could not join the distributed run (coordinator '
        f'{kwargs["coordinator_address"] or "auto-detected"}): {first}; start all processes with '
        'the same coordinator_address and num_processes, check that process 0 is running and its '
        'port is free and reachable, or raise config.distributed.initialization_timeout.') from None
  logging.info('Process %d of %d: %d local devices, %d in all (%s).', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)
