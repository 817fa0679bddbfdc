"""The device mesh, the shardings of batches and state, and host -> device batch placement.

One data-parallel path: a 1-D Mesh over all devices (axis ``data``); batches are split along their
leading dimension; the train state is replicated. Model code never sees any of this.
"""
from __future__ import annotations

import collections
import itertools
from typing import Any, Iterable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from imgcls_jax.errors import UserError

DATA_AXIS = 'data'


def make_mesh(num_devices: int = 0) -> Mesh:
  """A 1-D mesh over the first ``num_devices`` devices (0 = all devices of all processes)."""
  devices = jax.devices()
  if num_devices:
    if num_devices > len(devices):
      raise UserError(f'config.mesh.num_devices={num_devices} but only {len(devices)} devices '
                      'exist; lower it (0 uses all devices).')
    if jax.process_count() > 1 and num_devices != len(devices):
      raise UserError('config.mesh.num_devices must be 0 (all devices) in a multi-process run.')
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), (DATA_AXIS,),
              axis_types=(jax.sharding.AxisType.Auto,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the data axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def state_shardings(abstract_state: Any, mesh: Mesh) -> Any:
  """Shardings for every leaf of the train state: replicated (data parallelism)."""
  return jax.tree.map(lambda _: replicated(mesh), abstract_state)


def local_batch_size(global_batch_size: int, mesh: Mesh, what: str = 'config.batch_size') -> int:
  """This process's share of a global batch; the batch must split evenly over the devices."""
  n = mesh.devices.size
  if global_batch_size <= 0 or global_batch_size % n:
    raise UserError(f'{what}={global_batch_size} must be a positive multiple of the device count '
                    f'({n}); change {what} or config.mesh.num_devices.')
  return global_batch_size // jax.process_count()


def put_batch(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Assembles global arrays from this process's slice of the batch."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def device_prefetch(batches: Iterable[dict[str, np.ndarray]], sharding: NamedSharding,
                    size: int = 2) -> Iterator[dict[str, jax.Array]]:
  """Keeps ``size`` batches already transferred to the devices ahead of the consumer."""
  queue: collections.deque = collections.deque()
  it = iter(batches)
  for b in itertools.islice(it, size):
    queue.append(put_batch(b, sharding))
  while queue:
    yield queue.popleft()
    for b in itertools.islice(it, 1):
      queue.append(put_batch(b, sharding))
