"""Several training steps per dispatch (``config.steps_per_dispatch = k``).

For a small model the Python and dispatch work per step (fetching a batch, placing it, calling the
jitted step) is a sizeable part of the step. With k > 1 the loop places k batches at once as one
stacked ``k x B x ...`` array and runs one jitted function that applies the train step k times with
``jax.lax.scan``: the same steps, in the same order, on the same batches, with per-step metrics.

The loop decides per dispatch how many steps it holds (``plan``): k steps only when they start at
a multiple of k and end at or before the next evaluation / checkpoint / end of training, else one.
So evaluations and checkpoints happen at exactly the steps they would with k = 1, a run resumed
from any checkpoint dispatches the same groups as an uninterrupted one, and the run's result does
not depend on where it was interrupted.

On XLA:CPU it does not pay: a convolution inside the loop body loses the fast path (jax-ml/jax#12868)
and fashion_mnist_quick's step ran ~10x slower with k = 5 or 25 (280 against 2,650 images/s, 1 or 2
devices); fully unrolled (``unroll=True``) it ran at the single-step speed and compiled k times
longer. Dispatch is not this model's bottleneck on a CPU (JAX's asynchronous dispatch already
overlaps it); the feature is for accelerators, where a small model's step can be launch-bound.
"""
from __future__ import annotations

import collections
import itertools
import logging
from typing import Any, Callable, Iterable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from imgcls_jax import sharding
from imgcls_jax.errors import UserError


def steps_per_dispatch(config: Any) -> int:
  """``config.steps_per_dispatch`` checked (1 when absent: older runs)."""
  k = int(config.get('steps_per_dispatch', 1) or 1)
  if k < 1:
    raise UserError(f'config.steps_per_dispatch={k} must be >= 1 (1 = one step per call).')
  if k > 1 and jax.default_backend() == 'cpu':
    logging.warning('config.steps_per_dispatch=%d on XLA:CPU: convolutions inside the scanned '
                    'loop run ~10x slower than single steps here (jax-ml/jax#12868; measured: '
                    'fashion_mnist_quick 2,650 -> 280 images/s); use 1 on CPUs.', k)
  return k


def plan(start: int, total: int, k: int, periods: Iterable[int]) -> Iterator[int]:
  """Steps per dispatch from ``start`` to ``total``: k where the group starts at a multiple of k
  and no multiple of a period in ``periods`` (evaluation, checkpoint) falls strictly inside it,
  else 1."""
  periods = [p for p in periods if p and p > 0]
  step = start
  while step < total:
    n = 1
    if k > 1 and step % k == 0 and step + k <= total:
      # the next boundary after `step`: no group may run past it
      nxt = min([(step // p + 1) * p for p in periods] + [total])
      if step + k <= nxt:
        n = k
    yield n
    step += n


def stacked_sharding(mesh: Mesh) -> NamedSharding:
  """A ``k x B x ...`` stack of batches: the batch axis (the second) split over the data axis."""
  return NamedSharding(mesh, P(None, sharding.DATA_AXIS))


def device_batches(batches: Iterator[dict[str, np.ndarray]], sizes: Iterable[int], mesh: Mesh,
                   prefetch: int = 2) -> Iterator[dict[str, jax.Array]]:
  """For each ``n`` in ``sizes``: the next batch placed on the mesh (n = 1), or the next n batches
  stacked along a new leading axis (n > 1); ``prefetch`` groups are placed ahead."""
  single, stacked = sharding.batch_sharding(mesh), stacked_sharding(mesh)

  def place(n: int) -> dict[str, jax.Array]:
    group = list(itertools.islice(batches, n))
    if len(group) < n:
      raise RuntimeError('the training stream ended early')  # it is endless
    if n == 1:
      return sharding.put_batch(group[0], single)
    return sharding.put_batch({key: np.stack([b[key] for b in group]) for key in group[0]},
                              stacked)

  queue: collections.deque = collections.deque()
  it = iter(sizes)
  for n in itertools.islice(it, prefetch):
    queue.append(place(n))
  while queue:
    yield queue.popleft()
    for n in itertools.islice(it, 1):
      queue.append(place(n))


def resident_batches(images: np.ndarray, labels: np.ndarray,
                     indices: Callable[[int, int], np.ndarray], *, start_step: int,
                     sizes: Iterable[int], batch_size: int, mesh: Mesh
                     ) -> Iterator[dict[str, jax.Array]]:
  """``device_batches`` for a training split held on the devices (``config.data.device_resident``):
  ``images`` / ``labels`` are placed once, replicated over the mesh; each dispatch sends only the
  ``n x batch_size`` split indices of its steps (``indices(first_position, count)``) and gathers
  its batch (or stack of n batches) on the devices, already split over the data axis."""
  replicated = sharding.replicated(mesh)
  images_dev, labels_dev = jax.device_put(images, replicated), jax.device_put(labels, replicated)

  def gather(im: jax.Array, lb: jax.Array, idx: jax.Array) -> dict[str, jax.Array]:
    return {'image': im[idx], 'label': lb[idx]}

  single = jax.jit(gather, out_shardings=sharding.batch_sharding(mesh))
  stacked = jax.jit(gather, out_shardings=stacked_sharding(mesh))
  step = start_step
  for n in sizes:
    idx = indices(step * batch_size, n * batch_size)
    if n == 1:
      yield single(images_dev, labels_dev, jax.device_put(idx, replicated))
    else:
      yield stacked(images_dev, labels_dev, jax.device_put(idx.reshape(n, batch_size), replicated))
    step += n


def scan_steps(train_step: Callable[..., tuple[Any, dict[str, jax.Array]]]
               ) -> Callable[..., tuple[Any, dict[str, jax.Array]]]:
  """``(state, batches_k) -> (state, metrics_k)``: ``train_step`` over the leading axis of a stack
  of batches with ``lax.scan``; each metric gets a leading axis of k values (one per step)."""
  def steps(state: Any, batches_k: dict[str, jax.Array], *extra: Any
            ) -> tuple[Any, dict[str, jax.Array]]:
    # ``extra``: arguments every step takes whole (a distillation teacher's variables).
    return jax.lax.scan(lambda st, batch: train_step(st, batch, *extra), state, batches_k)
  return steps


def unstack(metrics: dict[str, np.ndarray], n: int) -> list[dict[str, np.ndarray]]:
  """Fetched metrics of one dispatch -> one dict per step (n = 1: the dict itself)."""
  if n == 1:
    return [metrics]
  return [{key: value[i] for key, value in metrics.items()} for i in range(n)]
