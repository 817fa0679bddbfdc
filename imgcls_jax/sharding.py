"""The device mesh, the shardings of batches and state, and host -> device batch placement.

One data-parallel path: a 1-D Mesh over all devices (axis ``data``); batches are split along their
leading dimension. The train state is either replicated on every device, or (``fsdp``) each large
array of it (parameters, optimizer moments) is split along its largest dimension that the device
count divides, so each device holds ~1/num_devices of it; XLA gathers the parameters for the
forward/backward pass and reduce-scatters the gradients. The step's maths are identical in both
modes. Model code never sees any of this.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import math
from typing import Any, Iterable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from imgcls_jax.errors import UserError

DATA_AXIS = 'data'


def request_cpu_devices(num: int) -> None:
  """Splits the host CPU into ``num`` XLA devices (``config.mesh.cpu_devices``; 0 = leave as is).

  Each CPU device runs its share of every batch on its own thread, so a data-parallel mesh over
  them uses the cores better than one device's intra-op threads do for small models (2 devices on
  2 cores: the Fashion-MNIST CNN's step 13.1 -> 10.1 ms). It only affects the CPU backend and must
  run before JAX starts its backends (``main.py`` calls it first); later it changes nothing and
  says so.
  """
  if num < 0 or num > 1024:
    raise UserError(f'config.mesh.cpu_devices={num} is not a sensible number of CPU devices; use '
                    "about the number of cores, or 0 to leave JAX's default.")
  if num == 0:
    return
  try:
    jax.config.update('jax_num_cpu_devices', int(num))
  except RuntimeError:
    logging.warning('config.mesh.cpu_devices=%d ignored: JAX had already started its backends '
                    '(%d CPU devices). Set it before any JAX operation, as main.py does.', num,
                    len(jax.devices('cpu')))


def make_mesh(num_devices: int = 0) -> Mesh:
  """A 1-D mesh over the first ``num_devices`` devices (0 = all devices of all processes).

  Devices are grouped by process, in process order, so process ``p`` holds rows
  ``[p * B / P, (p + 1) * B / P)`` of every batch: the rows its input pipeline builds.
  """
  devices = sorted(jax.devices(), key=lambda d: d.process_index)  # stable: keeps jax's order within
  if num_devices < 0:
    raise UserError(f'config.mesh.num_devices={num_devices} must be 0 (all {len(devices)} devices) '
                    'or a positive number of devices.')
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


PARAM_SHARDING_MODES = ('replicated', 'fsdp')


@dataclasses.dataclass(frozen=True)
class ParamSharding:
  """How the train state is placed: ``'replicated'``, or ``'fsdp'`` (split along the data axis).

  Under ``fsdp`` arrays with fewer than ``min_size`` elements (biases, norm scales, scalars) stay
  replicated: splitting them saves little memory and costs a collective each.
  """
  mode: str = 'replicated'
  min_size: int = 2**14

  @classmethod
  def from_config(cls, mesh_config: Any) -> 'ParamSharding':
    """From ``config.mesh`` (keys ``param_sharding``, ``fsdp_min_size``; absent = replicated)."""
    mode = mesh_config.get('param_sharding', 'replicated') or 'replicated'
    if mode not in PARAM_SHARDING_MODES:
      raise UserError(f"config.mesh.param_sharding='{mode}' is not one of "
                      f"{', '.join(PARAM_SHARDING_MODES)}; use 'replicated' (default) or 'fsdp'.")
    min_size = int(mesh_config.get('fsdp_min_size', cls.min_size))
    if min_size < 0:
      raise UserError(f'config.mesh.fsdp_min_size={min_size} must be >= 0 (elements).')
    return cls(mode=mode, min_size=min_size)


def fsdp_spec(shape: tuple[int, ...], num_shards: int, min_size: int) -> P:
  """The FSDP rule for one array: split its largest dimension divisible by ``num_shards``.

  Replicated (``P()``) when the array is smaller than ``min_size`` elements, there is one device,
  or no dimension divides evenly. Ties go to the last such dimension (output features).
  """
  if num_shards <= 1 or not shape or math.prod(shape) < max(min_size, 1):
    return P()
  divisible = [i for i, d in enumerate(shape) if d % num_shards == 0]
  if not divisible:
    return P()
  axis = max(divisible, key=lambda i: (shape[i], i))
  return P(*(DATA_AXIS if i == axis else None for i in range(len(shape))))


def state_shardings(abstract_state: Any, mesh: Mesh,
                    rules: ParamSharding = ParamSharding()) -> Any:
  """Shardings for every leaf of the train state, by ``rules`` (per array shape)."""
  if rules.mode == 'replicated':
    return jax.tree.map(lambda _: replicated(mesh), abstract_state)
  n = mesh.shape[DATA_AXIS]
  return jax.tree.map(lambda a: NamedSharding(mesh, fsdp_spec(tuple(a.shape), n, rules.min_size)),
                      abstract_state)


def planned_bytes_per_device(abstract_state: Any, shardings: Any) -> int:
  """Bytes of the state that each device will hold under ``shardings`` (from shapes only)."""
  return int(sum(math.prod(sh.shard_shape(tuple(a.shape))) * np.dtype(a.dtype).itemsize
                 for a, sh in zip(jax.tree.leaves(abstract_state), jax.tree.leaves(shardings))))


def bytes_per_device(tree: Any) -> dict[Any, int]:
  """Bytes of ``tree``'s arrays held on each addressable device (shards counted where they live)."""
  total: dict[Any, int] = collections.defaultdict(int)
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      total[shard.device] += shard.data.nbytes
  return dict(total)


def local_batch_size(global_batch_size: int, mesh: Mesh, what: str = 'config.batch_size') -> int:
  """This process's share of a global batch; the batch must split evenly over the devices."""
  n = mesh.devices.size
  if global_batch_size <= 0 or global_batch_size % n:
    fix = what if jax.process_count() > 1 else f'{what} or config.mesh.num_devices'
    raise UserError(f'{what}={global_batch_size} must be a positive multiple of the device count '
                    f'({n}); change {fix}.')
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


class InFlightGuard:
  """Bounds the programs in flight on a mesh of several XLA:CPU devices (a no-op elsewhere).

  On 2 CPU devices, a train step's all-reduce can hang for good (XLA aborts it after 40 s) when
  the next step is launched before this one's partitions have all started: the next program's
  launch holds one device's execution semaphore while it waits for this step's outputs, and this
  step's partition on that device waits for the semaphore (``benchmarks/cpu_devices_hang.py``
  reproduces it under load). ``after_dispatch(out)`` of step n waits for step n-1, so at most two
  steps are in flight; with ``strict`` (independent programs, e.g. evaluation batches) it waits for
  step n itself.
  """

  def __init__(self, mesh: Mesh, strict: bool = False):
    devices = list(mesh.devices.flat)
    self.on = len(devices) > 1 and all(d.platform == 'cpu' for d in devices)
    self.strict = strict
    self._previous: Any = None

  def after_dispatch(self, out: Any) -> None:
    if not self.on:
      return
    if self.strict:
      jax.block_until_ready(out)
      return
    if self._previous is not None:
      jax.block_until_ready(self._previous)
    self._previous = out


def gather_rows(columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Every process's rows of ``columns`` (arrays of one length within a process, any length
  across processes), concatenated in process order, on every process: the per-example records
  of a split that each process read a contiguous part of. One process: ``columns`` as they are.
  Bit-exact for every dtype (8- and 16-byte ones travel as 4-byte words: JAX's default arrays
  have no 64-bit types)."""
  if jax.process_count() == 1:
    return columns
  from jax.experimental import multihost_utils
  length = len(next(iter(columns.values()))) if columns else 0
  lengths = np.asarray(multihost_utils.process_allgather(np.int32(length))).reshape(-1)
  most = int(lengths.max(initial=0))
  out = {}
  for key, v in columns.items():
    v = np.asarray(v)
    padded = np.zeros((most,) + v.shape[1:], v.dtype)
    padded[:length] = v
    wide = v.dtype.itemsize > 4 and v.dtype.itemsize % 4 == 0
    words = padded.view(np.uint32) if wide else padded
    every = np.asarray(multihost_utils.process_allgather(words))
    every = every.view(v.dtype) if wide else every.astype(v.dtype, copy=False)
    out[key] = np.concatenate([every[p, :n] for p, n in enumerate(lengths)])
  return out
