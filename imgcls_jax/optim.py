"""The optax optimizer and learning-rate schedule from ``config.optim``."""
from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

from imgcls_jax import transfer as transfer_lib
from imgcls_jax.errors import UserError

OPTIMIZERS = ('sgd', 'adamw')
SCHEDULES = ('cosine', 'constant', 'linear')


def peak_learning_rate(cfg: ml_collections.ConfigDict, batch_size: int) -> float:
  """``learning_rate``, times ``batch_size / lr_batch_reference`` when that reference is set."""
  ref = cfg.get('lr_batch_reference', 0)
  return cfg.learning_rate * (batch_size / ref if ref else 1.0)


def schedule(cfg: ml_collections.ConfigDict, *, batch_size: int, total_steps: int,
             warmup_steps: int) -> optax.Schedule:
  """Linear warmup from 0, then cosine / linear decay to ``end_lr_factor`` x peak, or constant."""
  peak = peak_learning_rate(cfg, batch_size)
  warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
  decay_steps = max(total_steps - warmup_steps, 1)
  end = peak * cfg.end_lr_factor
  if cfg.schedule == 'cosine':
    after = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.end_lr_factor)
  elif cfg.schedule == 'linear':
    after = optax.linear_schedule(peak, end, decay_steps)
  elif cfg.schedule == 'constant':
    after = optax.constant_schedule(peak)
  else:
    raise UserError(f"Unknown config.optim.schedule '{cfg.schedule}'; use one of "
                    f"{', '.join(SCHEDULES)}.")
  if warmup_steps <= 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup_steps), after],
                              [warmup_steps])


def decay_mask(params: Any) -> Any:
  """True for weights that get weight decay: kernels (ndim >= 2), not biases or norm scales."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def build(cfg: ml_collections.ConfigDict, lr: optax.Schedule,
          transfer: ml_collections.ConfigDict | None = None) -> optax.GradientTransformation:
  """SGD (momentum, Nesterov; coupled L2 decay) or AdamW (decoupled decay), masked decay.

  ``transfer`` (``config.transfer``) adds layer-wise learning-rate decay and, for a linear probe,
  freezes everything but the head (see ``imgcls_jax.transfer``); without it, or with its defaults,
  the optimizer is unchanged.
  """
  return transfer_lib.wrap_optimizer(_base(cfg, lr), transfer)


def _base(cfg: ml_collections.ConfigDict, lr: optax.Schedule) -> optax.GradientTransformation:
  parts = []
  if cfg.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
  if cfg.name == 'sgd':
    if cfg.weight_decay > 0:
      parts.append(optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask))
    parts.append(optax.sgd(lr, momentum=cfg.momentum or None, nesterov=cfg.nesterov))
  elif cfg.name == 'adamw':
    parts.append(optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=decay_mask))
  else:
    raise UserError(f"Unknown config.optim.name '{cfg.name}'; use one of {', '.join(OPTIMIZERS)}.")
  return optax.chain(*parts)
