"""Successive halving for sweeps (``config.sweep.halving`` = eta; Jamieson & Talwalkar 2016, the
inner loop of Hyperband, Li et al. 2018): every setting trains the first rung's share of its run;
the best 1/eta of the settings (mean over seeds, as the sweep ranks them) go on to the next rung,
eta times longer, the others stop there; the last rung is the whole run.

A trial pauses at a rung as at an evaluation (``train.train_and_evaluate(pause_at=...)``: its
learning-rate schedule stays that of the whole run, so an early rung compares settings mid-way
through their schedules) and resumes exactly from that checkpoint when promoted. Each trial keeps
its row per rung (``trial.at_rung``), so a rerun repeats every decision without training again.
"""
from __future__ import annotations

import math
from typing import Any

import ml_collections

from imgcls_jax.errors import UserError
from imgcls_jax.sweep import rank


def check(config: ml_collections.ConfigDict) -> None:
  """Refuses what successive halving cannot run with, in one sentence each."""
  s = config.sweep
  eta, first = s.halving, s.first_rung
  if isinstance(eta, bool) or not isinstance(eta, int) or eta == 1 or eta < 0:
    raise UserError(f'config.sweep.halving={eta!r} must be an int >= 2 (the share 1/halving of '
                    'the settings goes on at each rung; e.g. 3), or 0 (off).')
  if not isinstance(first, (int, float)) or not 0 <= first < 1:
    raise UserError(f'config.sweep.first_rung={first!r} must be a share of the run in (0, 1), '
                    'e.g. 0.1, or 0 (as many rungs as halve the settings to about one).')
  if not eta:
    if first:
      raise UserError(f'config.sweep.first_rung={first} needs config.sweep.halving (e.g. 3); '
                      'without it every trial trains its whole run.')
    return
  if s.shard:
    raise UserError('config.sweep.halving ranks every setting at each rung before any goes on, '
                    'so it runs in one process: drop config.sweep.shard.')
  if config.cross_validation.folds > 0:
    raise UserError('config.sweep.halving pauses each trial mid-run, which a k-fold trial '
                    'cannot: drop config.cross_validation.folds, or config.sweep.halving.')


def fractions(config: ml_collections.ConfigDict, settings: int) -> list[float]:
  """The rungs, as shares of each trial's run, the last 1.0: ``[1.0]`` without halving; else
  ``eta**-k``, ..., ``1/eta``, 1, where ``eta**-k`` is the smallest power of ``1/eta`` not below
  ``config.sweep.first_rung`` (0: k = floor(log_eta of the number of settings), so that about
  one setting reaches the end; fewer settings than eta: no rung before the end)."""
  check(config)
  eta, first = config.sweep.halving, float(config.sweep.first_rung)
  if not eta:
    return [1.0]
  k = math.floor(math.log(1 / first) / math.log(eta) + 1e-9) if first else math.floor(
      math.log(max(settings, 1)) / math.log(eta) + 1e-9)
  if first and k == 0:
    raise UserError(f'config.sweep.first_rung={first} is above 1/{eta}: no rung before the end; '
                    f'use at most {1 / eta:.3g}.')
  return [eta ** -i for i in range(k, 0, -1)] + [1.0]


def key(fraction: float) -> str:
  """A rung's name in a trial's record."""
  return f'{fraction:.6g}'


def promote(rows: list[dict[str, Any]], metric: str, mode: str,
            eta: int) -> tuple[list[str], dict[str, Any]]:
  """(the settings that go on, best first; the ranking at this rung): the best
  ``max(1, n // eta)`` of the ``n`` settings in ``rows``, among those with a finite result for
  every seed (a setting with a diverged or failed seed never goes on)."""
  ranked = rank.summarize(rows, metric, mode)
  complete = [s['setting'] for s in ranked['settings'] if rank.complete(s)]
  return complete[:max(1, len(ranked['settings']) // eta)], ranked
