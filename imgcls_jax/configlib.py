"""Config checks and the one helper that turns ``*_steps`` / ``*_epochs`` keys into steps."""
from __future__ import annotations

import math

import ml_collections

from imgcls_jax.errors import UserError

_DTYPES = ('float32', 'bfloat16', 'float16')


def steps_from(config: ml_collections.ConfigDict, prefix: str, steps_per_epoch: int) -> int:
  """``<prefix>_steps`` when > 0, else ``ceil(<prefix>_epochs * steps_per_epoch)``.

  ``prefix`` may be dotted (``'optim.warmup'``). Returns 0 when neither is set (> 0).
  """
  *parents, leaf = prefix.split('.')
  node = config
  for p in parents:
    node = node[p]
  steps = node.get(f'{leaf}_steps', -1)
  if steps is not None and steps > 0:
    return int(steps)
  epochs = node.get(f'{leaf}_epochs', -1)
  if epochs is not None and epochs > 0:
    return max(1, math.ceil(epochs * steps_per_epoch))
  return 0


def train_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  """Total optimizer steps: ``num_train_steps`` when > 0, else ``num_epochs`` epochs."""
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  if config.num_epochs <= 0:
    raise UserError('Set config.num_epochs or config.num_train_steps to a positive number.')
  return max(1, math.ceil(config.num_epochs * steps_per_epoch))


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises UserError naming the first bad value and its fix."""
  def need(ok: bool, message: str) -> None:
    if not ok:
      raise UserError(message)

  need(config.batch_size > 0, f'config.batch_size must be positive, got {config.batch_size}.')
  need(config.eval_batch_size > 0,
       f'config.eval_batch_size must be positive, got {config.eval_batch_size}.')
  need(config.dtype in _DTYPES, f"config.dtype must be one of {', '.join(_DTYPES)}, got "
       f"'{config.dtype}'.")
  need(config.optim.learning_rate >= 0,
       f'config.optim.learning_rate must be >= 0, got {config.optim.learning_rate}.')
  need(config.optim.weight_decay >= 0,
       f'config.optim.weight_decay must be >= 0, got {config.optim.weight_decay}.')
  need(0.0 <= config.label_smoothing < 1.0,
       f'config.label_smoothing must be in [0, 1), got {config.label_smoothing}.')
  need(config.num_train_steps > 0 or config.num_epochs > 0,
       'Set config.num_epochs or config.num_train_steps to a positive number.')
  need(len(config.data.mean) == len(config.data.std),
       'config.data.mean and config.data.std need one value per channel each.')
  need(all(s > 0 for s in config.data.std), 'config.data.std values must be positive.')
  need(config.log_every_steps > 0,
       f'config.log_every_steps must be positive, got {config.log_every_steps}.')
  need(config.keep_checkpoints > 0,
       f'config.keep_checkpoints must be positive, got {config.keep_checkpoints}.')
