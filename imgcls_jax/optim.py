"""The optax optimizer and learning-rate schedule from ``config.optim``, and the transfer masks.

``config.transfer`` (documented in configs/default.py) shapes the optimizer two ways:
  * ``mode='linear_probe'`` freezes every parameter but the head through optax masking (frozen
    parameters get zero updates, no weight decay and no optimizer state);
  * ``layer_decay`` < 1 trains a parameter at depth ``d`` at ``layer_decay ** (L - d)`` x the rate
    (stem 0, each block +1, head ``L``); each model family gives its depths
    (``imgcls_jax.models.layer_depths``).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import ml_collections
import optax
import optax.contrib

from imgcls_jax import weights
from imgcls_jax.errors import UserError
from imgcls_jax.models import LayerDepths

OPTIMIZERS = ('sgd', 'adamw', 'lamb', 'lars', 'muon', 'schedule_free_adamw')
SCHEDULES = ('cosine', 'constant', 'linear')
TRANSFER_MODES = ('finetune', 'linear_probe')
# Top-level attribute names that hold a model's classifier head, in order of preference.
HEAD_NAMES = ('fc', 'head', 'classifier')


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
          transfer: ml_collections.ConfigDict | None = None, *,
          layer_depths: LayerDepths | None = None) -> optax.GradientTransformation:
  """The optimizer ``cfg.name`` (see ``_base``) with weight decay on kernels only.

  ``transfer`` (``config.transfer``) adds layer-wise learning-rate decay (by the model family's
  ``layer_depths`` rule) and, for a linear probe, freezes everything but the head; without it, or
  with its defaults, the optimizer is unchanged.
  """
  tx = _base(cfg, lr)
  if transfer is None:
    return tx
  validate_transfer(transfer)
  if transfer.layer_decay != 1.0:
    if cfg.name == 'schedule_free_adamw':
      raise UserError('config.transfer.layer_decay cannot be combined with schedule_free_adamw '
                      '(its update is not linear in the learning rate); set layer_decay=1.0.')
    if layer_depths is None:
      raise UserError('config.transfer.layer_decay needs the model family\'s layer-depth rule; '
                      'set layer_decay=1.0 for this model.')
    # The update is linear in the learning rate (all but schedule-free), so scaling the final
    # update of a leaf is exactly training that leaf at a scaled learning rate.
    decay = float(transfer.layer_decay)
    tx = optax.chain(tx, scale_by_tree(lambda t: lr_factors(t, decay, layer_depths)))
  if transfer.mode == 'linear_probe':
    tx = optax.partition({'trainable': tx, 'frozen': optax.set_to_zero()},
                         lambda t: trainable_labels(t, transfer))
  return tx


def _base(cfg: ml_collections.ConfigDict, lr: optax.Schedule) -> optax.GradientTransformation:
  """Global-norm clipping (when set), then the optimizer:

  * ``sgd``: (Nesterov) momentum, L2 decay added to the gradient of kernels;
  * ``adamw``: Adam with decoupled weight decay;
  * ``lamb``: Adam direction + decoupled decay, scaled per tensor by ||w|| / ||update|| (You et al.
    2020; large batches);
  * ``lars``: SGD momentum on the gradient + decay, scaled per kernel by ``trust_coefficient *
    ||w|| / ||g + wd w||`` (You et al. 2017; large batches); biases and norms are not scaled;
  * ``muon``: momentum orthogonalised by Newton-Schulz per kernel (conv kernels as
    (kh kw cin) x cout matrices; Jordan et al. 2024), Adam for biases and norm parameters;
  * ``schedule_free_adamw``: schedule-free AdamW (Defazio et al. 2024); its evaluation weights
    are ``eval_params(opt_state, params)``, not ``params``.

  Weight decay goes to kernels only (``decay_mask``) in every case.
  """
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
  elif cfg.name == 'lamb':
    parts.append(optax.lamb(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                            weight_decay=cfg.weight_decay, mask=decay_mask))
  elif cfg.name == 'lars':
    parts.append(optax.lars(lr, weight_decay=cfg.weight_decay, weight_decay_mask=decay_mask,
                            trust_coefficient=cfg.trust_coefficient,
                            trust_ratio_mask=decay_mask, momentum=cfg.momentum,
                            nesterov=cfg.nesterov))
  elif cfg.name == 'muon':
    parts.append(optax.contrib.muon(
        lr, beta=cfg.muon_beta, weight_decay=cfg.weight_decay,
        weight_decay_mask=decay_mask, adam_b1=cfg.b1, adam_b2=cfg.b2, eps=cfg.eps,
        muon_weight_dimension_numbers=muon_dimensions))
  elif cfg.name == 'schedule_free_adamw':
    adam = optax.chain(optax.scale_by_rms(decay=cfg.b2, eps=cfg.eps, eps_in_sqrt=False,
                                          bias_correction=True),
                       optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask),
                       optax.scale_by_learning_rate(lr))
    parts.append(optax.contrib.schedule_free(adam, lr, b1=cfg.b1))
  else:
    raise UserError(f"Unknown config.optim.name '{cfg.name}'; use one of {', '.join(OPTIMIZERS)}.")
  return optax.chain(*parts)


def muon_dimensions(params: Any) -> Any:
  """Muon's matrix view of each kernel: inputs (all but the last axis) x outputs (the last axis);
  None (Adam) for biases and norm parameters."""
  return jax.tree.map(
      lambda p: optax.contrib.MuonDimensionNumbers(tuple(range(p.ndim - 1)), p.ndim - 1)
      if p.ndim >= 2 else None, params)


def eval_params(opt_state: Any, params: Any) -> Any:
  """The weights to evaluate: for schedule-free optimizers the averaged sequence ``x`` (from the
  optimizer state), else ``params`` themselves."""
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=_is_schedule_free)
           if _is_schedule_free(s)]
  if not found:
    return params
  return optax.contrib.schedule_free_eval_params(found[0], params)


def _is_schedule_free(x: Any) -> bool:
  return isinstance(x, optax.contrib.ScheduleFreeState)


# ------------------------------------------------------------------------ transfer masks

def validate_transfer(cfg: ml_collections.ConfigDict) -> None:
  """Raises UserError for a bad ``config.transfer`` value."""
  if cfg.mode not in TRANSFER_MODES:
    raise UserError(f"Unknown config.transfer.mode '{cfg.mode}'; use one of "
                    f"{', '.join(TRANSFER_MODES)}.")
  if not 0.0 < cfg.layer_decay <= 1.0:
    raise UserError(f'config.transfer.layer_decay must be in (0, 1] (1.0 = off), got '
                    f'{cfg.layer_decay}.')
  if cfg.mode == 'linear_probe' and cfg.layer_decay != 1.0:
    raise UserError('config.transfer.layer_decay applies to fine-tuning; a linear probe trains only '
                    'the head, so set layer_decay=1.0 (or mode=finetune).')
  if cfg.mode == 'linear_probe' and not cfg.init_from:
    raise UserError("config.transfer.mode='linear_probe' trains only the head on a frozen "
                    'backbone, which is random without weights; set config.transfer.init_from.')


def head_name(names: Any, cfg: ml_collections.ConfigDict | None = None) -> str:
  """The top-level attribute holding the head: ``cfg.head`` if set, else fc / head / classifier."""
  tops = {n.split('.')[0] for n in names}
  wanted = (cfg.get('head') if cfg is not None else '') or ''
  if wanted:
    if wanted not in tops:
      raise UserError(f"config.transfer.head='{wanted}' is not a top-level parameter group of this "
                      f"model ({', '.join(sorted(tops))}); set it to the head's attribute name.")
    return wanted
  for name in HEAD_NAMES:
    if name in tops:
      return name
  raise UserError(f"Cannot tell which parameters form this model's head (none of "
                  f"{', '.join(HEAD_NAMES)} among {', '.join(sorted(tops))}); set "
                  'config.transfer.head.')


def in_head(name: str, head: str) -> bool:
  """Whether the dotted parameter ``name`` belongs to the top-level group ``head``."""
  return name == head or name.startswith(head + '.')


def trainable_labels(tree: Any, cfg: ml_collections.ConfigDict) -> Any:
  """``'trainable'`` / ``'frozen'`` per leaf: in linear_probe only the head trains."""
  head = head_name(weights.flatten(tree), cfg)
  probe = cfg.mode == 'linear_probe'
  return weights.map_named(
      lambda n, _: 'trainable' if not probe or in_head(n, head) else 'frozen', tree)


def lr_factors(tree: Any, decay: float, layer_depths: LayerDepths) -> Any:
  """Per-leaf learning-rate multipliers ``decay ** (L - depth)``."""
  depths, top = layer_depths(list(weights.flatten(tree)))
  return weights.map_named(lambda n, _: decay ** (top - depths[n]), tree)


def scale_by_tree(factors_fn: Callable[[Any], Any]) -> optax.GradientTransformation:
  """Multiplies each update by a per-leaf constant computed from the tree's names (stateless)."""
  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    del params
    factors = factors_fn(updates)
    return jax.tree.map(lambda u, f: u * f, updates, factors), state

  return optax.GradientTransformation(init, update)
