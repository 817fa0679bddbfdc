"""How long a run is, checked where training starts or resumes: the step a sweep's trial pauses at,
a config with fewer steps than the newest checkpoint (refused), the learning-rate step a longer or
otherwise changed schedule makes at the resumed step (said), and a ``best_metric`` no evaluation
reports (refused before the first step)."""
from __future__ import annotations

import logging
from typing import Any

import ml_collections

from imgcls_jax import configlib, optim, report, run
from imgcls_jax.errors import UserError


def check_not_past(start: int, total_steps: int, checkpoints: str) -> None:
  """A rerun whose config has fewer steps than its newest checkpoint (``start``) would report
  that longer run's model as this length's, and record the shorter length in config.json."""
  if start > total_steps:
    raise UserError(f'The newest checkpoint in {checkpoints} is at step {start}, past this '
                    f"config's {total_steps} steps (config.num_train_steps / num_epochs): nothing "
                    f'is left to train; evaluate it with --mode=evaluate, give {start} steps or '
                    'more, or train the shorter run in a new --workdir.')


def check_best_metric(config: ml_collections.ConfigDict, multilabel: bool) -> None:
  """Before any step: a ``checkpoint.best_metric`` the evaluations never report was found only at
  the first evaluation (epochs in, with no checkpoint saved)."""
  c = config.checkpoint
  names = report.eval_metric_names(multilabel)
  if c.get('keep_best', 0) > 0 and c.best_metric not in names:
    raise UserError(f"config.checkpoint.best_metric='{c.best_metric}' is not an evaluation metric "
                    f"of this {'multi-label' if multilabel else 'single-label'} run; use one of: "
                    f"{', '.join(sorted(names))}.")


def pause_step(total_steps: int, pause_at: float | None, steps_per_dispatch: int = 1) -> int:
  """The step a run pauses at: ``pause_at`` (a share of the run's steps) of them, a whole number
  of ``steps_per_dispatch`` groups (so the resumed run groups its steps as the plain run does),
  at least one group; the total when None."""
  if pause_at is None:
    return total_steps
  if not 0 < pause_at <= 1:
    raise ValueError(f'pause_at={pause_at} must be a share of the run in (0, 1].')
  k = max(1, steps_per_dispatch)
  return min(total_steps, k * max(1, round(total_steps * pause_at / k)))


def warn_learning_rate_jump(meta: dict[str, Any], s: run.Setup, start: int) -> None:
  """A resume whose schedule differs from the checkpoint's (more or fewer steps, another peak):
  the learning rate at ``start`` under each, when they differ by more than 1% (the generic
  changed-config warning does not say the rate jumps)."""
  saved, total = meta.get('config'), meta.get('total_steps')
  if not isinstance(saved, dict) or not isinstance(total, int):
    return
  try:
    before = ml_collections.ConfigDict(saved)
    warmup = configlib.steps_from(before, 'optim.warmup', s.steps_per_epoch)
    old = float(optim.schedule(before.optim, batch_size=int(before.batch_size),
                               total_steps=total, warmup_steps=warmup)(start))
  except Exception:   # noqa: BLE001 -- an older checkpoint's config: no comparison
    return
  new = float(s.lr_schedule(start))
  if abs(new - old) > 0.01 * max(abs(old), 1e-12):
    logging.warning('Resuming at step %d: the learning rate goes from %.4g (the schedule of the '
                    "checkpoint's %d steps) to %.4g (this config's %d), a step change.", start,
                    old, total, new, s.total_steps)
