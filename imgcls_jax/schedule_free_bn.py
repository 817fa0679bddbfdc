"""Schedule-free training of a model with BatchNorm: the running statistics at the evaluated
weights x.

Schedule-free optimizers (``optim.schedule_free_parts``) take gradients at y and evaluate at x, so
the running statistics collected during training are y's. Before each evaluation and save,
``XStatistics.apply`` replaces them with the mean of the first
``config.optim.schedule_free_bn_batches`` training batches' statistics at x (as torch's
``swa_utils.update_bn``).
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
from typing import Any

import jax
import jax.numpy as jnp

from imgcls_jax import optim, run, sharding
from imgcls_jax.data import reader


# Host memory the schedule-free statistics batches may hold (uint8 images): 16 ImageNet batches
# of 1024 would be ~2.4 GB per process; 1 GiB keeps 6 of them (6,144 images).
BN_BATCHES_MAX_BYTES = 1 << 30


def first_batches(batches: Any, n: int, max_bytes: int) -> list[dict[str, Any]]:
  """The images of the first ``n`` batches of ``batches`` (host arrays; with their ``mask``
  where a batch has one, so an undecodable file's blank row stays out of the statistics), fewer
  if they would hold more than ``max_bytes`` (at least one batch; a warning says how many were
  kept)."""
  kept, size = [], 0
  for b in itertools.islice(batches, n):
    if kept and size + b['image'].nbytes > max_bytes:
      logging.warning('Schedule-free BatchNorm statistics from %d of the %d batches of '
                      'config.optim.schedule_free_bn_batches: %.0f MiB of images, at most %.0f '
                      'MiB are held in memory.', len(kept), n, size / 2**20, max_bytes / 2**20)
      break
    kept.append({k: b[k] for k in ('image', 'mask') if k in b})
    size += b['image'].nbytes
  return kept


@dataclasses.dataclass
class XStatistics:
  """The batches read once at set-up, the jitted statistics of one batch, and the step whose
  running statistics are already x's."""
  s: run.Setup
  state_sh: Any
  batches: list[dict[str, Any]]
  batch_statistics: Any
  step: int | None = None

  @classmethod
  def build(cls, s: run.Setup, state: Any, state_sh: Any) -> XStatistics | None:
    """The first ``config.optim.schedule_free_bn_batches`` batches of the training stream (host
    arrays, read once here, at most ``BN_BATCHES_MAX_BYTES`` of them) for a schedule-free run
    of a model with BatchNorm; else None. Not with a linear probe (the source's statistics stay)
    or a weight EMA (it mixes the running statistics into its own at every step: they stay those
    of training)."""
    n = int(s.config.optim.get('schedule_free_bn_batches', 0) or 0)
    if (n == 0 or optim.schedule_free_parts(state.opt_state) is None or s.step_cfg.probe_head
        or s.step_cfg.ema_decay > 0 or not jax.tree.leaves(state.batch_stats)):
      return None
    stream = reader.train_batches(s.config.data, seed=s.config.seed,
                                  local_batch_size=s.local_batch_size,
                                  process_index=jax.process_index(),
                                  process_count=jax.process_count())
    return cls(s, state_sh, first_batches(stream, n, BN_BATCHES_MAX_BYTES),
               run.jit_batch_statistics(s, state_sh))

  def apply(self, state: Any) -> Any:
    """``state`` with its running statistics replaced by the mean of the batches' statistics at
    the evaluated weights x, so that evaluations, checkpoints and every reader of the run use x
    with its own statistics. Training is unaffected (it normalises with batch statistics), and
    the result does not depend on the statistics it replaces, so resumed runs end the same."""
    step = int(jax.device_get(state.step))
    if step == self.step:
      return state
    x = optim.eval_params(state.opt_state, state.params)
    total = None
    guard = sharding.InFlightGuard(self.s.mesh, strict=True)  # independent programs (see there)
    for batch in self.batches:
      stats = self.batch_statistics(x, state.batch_stats,
                                    sharding.put_batch(batch, sharding.batch_sharding(self.s.mesh)))
      guard.after_dispatch(stats)
      total = stats if total is None else jax.tree.map(jnp.add, total, stats)
    n = len(self.batches)
    state = state.replace(batch_stats=jax.device_put(jax.tree.map(lambda t: t / n, total),
                                                     self.state_sh.batch_stats))
    self.step = step
    return state
