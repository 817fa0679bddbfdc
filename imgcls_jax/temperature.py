"""Temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017).

One number ``T > 0``, fitted after training on a held-out split
(``config.evaluate.temperature_split``) by minimising the negative log-likelihood of
``softmax(logits / T)``. A run that has one gives ``softmax(logits / T)`` everywhere afterwards:
its final evaluation and report, ``--mode=evaluate``, predict, serve and the exported models
(``eval_steps.forward``, the one inference forward pass, divides the logits by
``StepConfig.temperature``). It changes how confident the probabilities are, not which class is
predicted (with test-time augmentation each view is tempered before the views are averaged, which
can move a near-tie). Models trained with label smoothing are under-confident (``T < 1`` sharpens
them), long-trained ones over-confident (``T > 1``).

The fit is one pass of masked sums, exact over padded batches, devices and processes like the
report's: the split's NLL at each temperature of a log-spaced grid (``GRID``), then a parabola in
``log T`` through the best grid point and its two neighbours. Pure functions; no I/O.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

T_MIN, T_MAX, GRID_SIZE = 0.05, 20.0, 241      # log-spaced: neighbours 2.5% apart
GRID = np.geomspace(T_MIN, T_MAX, GRID_SIZE).astype(np.float32)


def nll_sums(logits_BxK: jax.Array, labels_B: jax.Array, mask_B: jax.Array) -> dict[str, jax.Array]:
  """``{'nll_G': summed NLL of softmax(logits / t) for each t of GRID, 'count'}`` over the
  unmasked rows (jit-friendly; one temperature at a time, so memory stays B x K)."""
  x = logits_BxK.astype(jnp.float32)
  labels = labels_B.astype(jnp.int32)[:, None]
  w = mask_B.astype(jnp.float32)

  def nll_at(t: jax.Array) -> jax.Array:
    log_probs = jax.nn.log_softmax(x / t, axis=-1)
    return -jnp.sum(jnp.take_along_axis(log_probs, labels, axis=-1)[:, 0] * w)

  return {'nll_G': jax.lax.map(nll_at, jnp.asarray(GRID)),
          'count': jnp.sum(mask_B.astype(jnp.int32))}


@dataclasses.dataclass(frozen=True)
class Fit:
  """The fitted temperature and the split's mean NLL at ``T = 1`` and at the grid's best point."""
  temperature: float
  nll_before: float
  nll_after: float
  at_edge: bool          # the minimum lies at an end of the grid (T clamped to it)
  fitted: bool = True    # False: nothing could be fitted on the split (T = 1 given instead)


def choose(nll_G: Any, count: Any) -> Fit:
  """The NLL-minimising temperature from ``nll_sums`` summed over a split. Never raises: it runs
  after training, before the final checkpoint is saved. A non-finite NLL, or one still falling at
  ``T_MIN`` (a split the model gets all right by a margin), gives ``T = 1``; a minimum beyond
  ``T_MAX`` gives ``T_MAX``."""
  nll = np.asarray(nll_G, np.float64) / max(int(count), 1)
  before = float(np.interp(0.0, np.log(GRID), nll))
  if not np.all(np.isfinite(nll)):
    logging.warning('Temperature scaling skipped: the NLL on the split is not finite.')
    return Fit(1.0, before, before, at_edge=False, fitted=False)
  i = int(np.argmin(nll))
  u = np.log(GRID.astype(np.float64))
  if i == 0:  # NLL still falling at T_MIN: every example right with a margin, nothing to fit
    logging.warning('No temperature fitted: the NLL on the split still falls at T = %g (its '
                    'examples are all classified right with a margin); use a larger or harder '
                    'held-out split. T = 1.', T_MIN)
    return Fit(1.0, before, before, at_edge=True, fitted=False)
  if 0 < i < len(GRID) - 1:
    a, b, c = nll[i - 1], nll[i], nll[i + 1]
    h = u[i + 1] - u[i]
    curvature = a - 2 * b + c
    offset = 0.5 * h * (a - c) / curvature if curvature > 0 else 0.0
    t = float(np.exp(u[i] + np.clip(offset, -h, h)))
  else:
    t = float(GRID[i])
  return Fit(t, before, float(nll[i]), at_edge=i in (0, len(GRID) - 1))
