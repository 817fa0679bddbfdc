"""Reliability (calibration) bins, shared by the single-label report (top-1 confidence against
being right) and the multi-label one (each tag's probability against the tag being labelled):
the bin of a probability on the device, and the expected calibration error with its per-bin
table on the host, from additive per-bin sums."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def bin_index(p: jax.Array, num_bins: int) -> jax.Array:
  """The equal-width bin of each probability (any shape): an inner edge belongs to the lower bin
  (``searchsorted`` side 'left', as scikit-learn's ``calibration_curve``)."""
  edges = jnp.linspace(0.0, 1.0, num_bins + 1, dtype=jnp.float32)
  return jnp.searchsorted(edges[1:-1], p.ravel(), side='left').reshape(p.shape)


def table(count: Any, confidence_sum: Any, outcome_sum: Any,
          outcome: str = 'accuracy') -> tuple[float, list[dict[str, Any]]]:
  """(expected calibration error, per-bin rows: lower, upper, count, confidence (the mean
  probability), ``outcome`` (the share of hits: right top-1, a labelled tag)) from per-bin sums."""
  count = np.asarray(count, np.float64)
  conf = np.asarray(confidence_sum, np.float64)
  hits = np.asarray(outcome_sum, np.float64)
  n = count.sum()
  ece = float(np.sum(np.abs(hits - conf)) / n) if n > 0 else float('nan')
  edges = np.linspace(0.0, 1.0, len(count) + 1)
  rows = [{'lower': float(edges[b]), 'upper': float(edges[b + 1]), 'count': int(count[b]),
           'confidence': float(conf[b] / count[b]) if count[b] else None,
           outcome: float(hits[b] / count[b]) if count[b] else None} for b in range(len(count))]
  return ece, rows
