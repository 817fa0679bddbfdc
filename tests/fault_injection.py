"""Test-only fault injection: a train step that turns NaN at a chosen step.

Used in-process (monkeypatch) and in a child process: ``python -c "from tests import
fault_injection as f; f.main_with_nan(AT)" --config=... --workdir=...`` runs the real command line
with the poisoned step.
"""
from __future__ import annotations

import sys

import jax
import jax.numpy as jnp

from imgcls_jax import steps


def poisoned_train_step(at_step: int, *, loss: bool = True):
  """``steps.train_step``, except that the update of optimizer step ``at_step`` (0-based, i.e. the
  one reported as step ``at_step + 1``) yields NaN parameters and, when ``loss``, a NaN loss."""
  real = steps.train_step

  def train_step(state, batch, **kw):
    new, metrics = real(state, batch, **kw)
    bad = state.step == at_step
    params = jax.tree.map(lambda p: jnp.where(bad, jnp.nan, p), new.params)
    if loss:
      metrics = dict(metrics, loss=jnp.where(bad, jnp.nan, metrics['loss']))
    return new.replace(params=params), metrics

  return train_step


def main_with_nan(at_step: int) -> None:
  """Runs ``imgcls_jax.main`` on ``sys.argv`` with a step that turns NaN at ``at_step``."""
  from imgcls_jax import main
  steps.train_step = poisoned_train_step(at_step)
  sys.exit(main.run(['imgcls_jax.main', *sys.argv[1:]]))
