"""The optax optimizer and learning-rate schedule from ``config.optim``, and the transfer masks.

``config.transfer`` (documented in configs/default.py) shapes the optimizer two ways:
  * ``mode='linear_probe'`` freezes every parameter but the head through optax masking (frozen
    parameters get zero updates, no weight decay and no optimizer state);
  * ``layer_decay`` < 1 trains a parameter at depth ``d`` at ``layer_decay ** (L - d)`` x the rate
    (stem 0, each block +1, head ``L``); each model family gives its depths
    (``imgcls_jax.models.layer_depths``).
Also per-group learning rates (normalisation parameters, biases), frozen parameters by name and
Lookahead (``config.optim.lookahead``).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
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
          layer_depths: LayerDepths | None = None, norm_names: frozenset[str] = frozenset(),
          frozen: frozenset[str] = frozenset()) -> optax.GradientTransformation:
  """The optimizer ``cfg.name`` (see ``_base``) with weight decay on kernels only.

  ``cfg.norm_lr_factor`` / ``cfg.bias_lr_factor`` scale the learning rate of normalisation-layer
  parameters (``norm_names``) / of the other biases; ``transfer`` (``config.transfer``) adds
  layer-wise learning-rate decay (by the model family's ``layer_depths`` rule) and, for a linear
  probe, freezes everything but the head; the parameters named in ``frozen`` get zero updates
  (a frozen patch-whitening layer, ``cfg.freeze``); ``cfg.lookahead.sync_period`` > 0 wraps it
  all in Lookahead. With the defaults the optimizer is ``_base`` unchanged.
  """
  tx = _base(cfg, lr)
  norm_f, bias_f = float(cfg.get('norm_lr_factor', 1.0)), float(cfg.get('bias_lr_factor', 1.0))
  if norm_f != 1.0 or bias_f != 1.0:
    if not (norm_f >= 0 and bias_f >= 0):
      raise UserError(f'config.optim.norm_lr_factor={norm_f} and bias_lr_factor={bias_f} must be '
                      '>= 0 (1.0 = the base learning rate).')
    if cfg.name == 'schedule_free_adamw':
      raise UserError('config.optim.norm_lr_factor / bias_lr_factor cannot be combined with '
                      'schedule_free_adamw (its update is not linear in the learning rate); set '
                      'them to 1.0.')
    # As for layer decay: scaling a leaf's final update = training it at a scaled learning rate.
    tx = optax.chain(tx, scale_by_tree(lambda t: group_factors(t, norm_names, norm_f, bias_f)))
  probe = False
  if transfer is not None:
    validate_transfer(transfer)
    probe = transfer.mode == 'linear_probe'
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
  if probe or frozen:
    tx = optax.partition({'trainable': tx, 'frozen': optax.set_to_zero()},
                         lambda t: trainable_labels(t, transfer if probe else None, frozen))
  la = cfg.get('lookahead')
  if la is not None and int(la.get('sync_period', 0) or 0) > 0:
    period, alpha = int(la.sync_period), float(la.alpha)
    if not 0.0 < alpha <= 1.0:
      raise UserError(f'config.optim.lookahead.alpha={alpha} must be in (0, 1] (the slow weights '
                      'move this fraction of the way to the fast ones at every sync; e.g. 0.5).')
    if cfg.name == 'schedule_free_adamw':
      raise UserError('config.optim.lookahead cannot be combined with schedule_free_adamw (its '
                      'weights are already an average); set lookahead.sync_period=0.')
    tx = optax.chain(tx, lookahead(period, alpha))
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
    check(cfg)
  return optax.chain(*parts)


def check(cfg: ml_collections.ConfigDict) -> None:
  """UserError unless ``config.optim.name`` is one of ``OPTIMIZERS`` and its momentum and Adam
  betas are decay rates in [0, 1) (2 would make every update grow without bound)."""
  if cfg.name not in OPTIMIZERS:
    raise UserError(f"Unknown config.optim.name '{cfg.name}'; use one of {', '.join(OPTIMIZERS)}.")
  for key in ('momentum', 'b1', 'b2', 'muon_beta'):
    value = cfg.get(key)
    if value is not None and not 0 <= float(value) < 1:
      raise UserError(f'config.optim.{key}={value} must be in [0, 1): it is the share of the '
                      'previous average kept at each step (e.g. 0.9).')


def muon_dimensions(params: Any) -> Any:
  """Muon's matrix view of each kernel: inputs (all but the last axis) x outputs (the last axis);
  None (Adam) for biases and norm parameters."""
  return jax.tree.map(
      lambda p: optax.contrib.MuonDimensionNumbers(tuple(range(p.ndim - 1)), p.ndim - 1)
      if p.ndim >= 2 else None, params)


def eval_params(opt_state: Any, params: Any) -> Any:
  """The weights to evaluate: for schedule-free optimizers the averaged sequence ``x`` (from the
  optimizer state: a live optax state, or one read from a checkpoint as plain nested mappings),
  else ``params`` themselves."""
  parts = schedule_free_parts(opt_state)
  return params if parts is None else schedule_free_x(*parts, params)


def schedule_free_parts(opt_state: Any) -> tuple[Any, Any] | None:
  """``(b1, z)`` of the schedule-free state inside ``opt_state`` (an
  ``optax.contrib.ScheduleFreeState``, or a mapping with ``b1`` and ``z`` when read from a
  checkpoint, or its tree metadata), or None."""
  for node in jax.tree.leaves(opt_state, is_leaf=_is_schedule_free):
    if isinstance(node, optax.contrib.ScheduleFreeState):
      return node.b1, node.z
    if isinstance(node, Mapping):
      return node['b1'], node['z']
  return None


def schedule_free_x(b1: Any, z: Any, y: Any) -> Any:
  """Schedule-free's evaluation weights ``x = (y - (1 - b1) z) / b1`` from the training point
  ``y`` (the state's params) and the state's ``z``, as ``optax.contrib.schedule_free_eval_params``;
  leaves that ``z`` does not hold (frozen parameters under ``optax.partition``: a MaskedNode, or
  None once restored from a checkpoint) never moved, so they are ``y`` itself."""
  return jax.tree.map(lambda zi, yi: yi if _masked(zi) else (yi - (1.0 - b1) * zi) / b1, z, y,
                      is_leaf=_masked)


def _masked(x: Any) -> bool:
  return x is None or isinstance(x, optax.MaskedNode)


def _is_schedule_free(x: Any) -> bool:
  return (isinstance(x, optax.contrib.ScheduleFreeState)
          or (isinstance(x, Mapping) and 'b1' in x and 'z' in x))


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


def frozen_by_name(cfg: ml_collections.ConfigDict, param_names: list[str]) -> frozenset[str]:
  """The parameters ``cfg.freeze`` names: a comma-separated list of dotted prefixes (a parameter
  ``norms.0.scale`` matches ``norms.0`` and ``norms``, not ``norm``); UserError for a prefix that
  matches no parameter."""
  spec = str(cfg.get('freeze', '') or '')
  prefixes = [p.strip() for p in spec.split(',') if p.strip()]
  frozen: set[str] = set()
  for prefix in prefixes:
    hits = {n for n in param_names if in_head(n, prefix)}
    if not hits:
      groups = sorted({n.rsplit('.', 1)[0] for n in param_names})
      raise UserError(f"config.optim.freeze names '{prefix}', which matches no parameter of this "
                      f"model; use dotted prefixes of its parameter names, e.g. "
                      f"{', '.join(repr(g) for g in groups[:6])}.")
    frozen |= hits
  return frozenset(frozen)


def trainable_labels(tree: Any, cfg: ml_collections.ConfigDict | None,
                     frozen: frozenset[str] = frozenset()) -> Any:
  """``'trainable'`` / ``'frozen'`` per leaf: in linear_probe (``cfg``) only the head trains; the
  leaves named in ``frozen`` never do."""
  probe = cfg is not None and cfg.mode == 'linear_probe'
  head = head_name(weights.flatten(tree), cfg) if probe else ''
  return weights.map_named(
      lambda n, _: 'frozen' if n in frozen or (probe and not in_head(n, head)) else 'trainable',
      tree)


def group_factors(tree: Any, norm_names: frozenset[str], norm_factor: float,
                  bias_factor: float) -> Any:
  """Per-leaf learning-rate multipliers: ``norm_factor`` for normalisation-layer parameters,
  ``bias_factor`` for the other biases, 1 elsewhere."""
  def factor(name: str, _: Any) -> float:
    if name in norm_names:
      return norm_factor
    return bias_factor if name.rsplit('.', 1)[-1] == 'bias' else 1.0
  return weights.map_named(factor, tree)


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


# ------------------------------------------------------------------------------- lookahead

class LookaheadState(NamedTuple):
  slow: Any                # the slow weights
  count: jax.Array         # int32: steps since the last synchronisation


def lookahead(sync_period: int, alpha: float) -> optax.GradientTransformation:
  """Lookahead (Zhang et al. 2019; airbench's weight averaging with reset), chained after the
  optimizer: every ``sync_period``-th step the slow weights move ``alpha`` of the way to the fast
  ones (after that step's update) and the fast weights are set to them. Same arithmetic as
  ``optax.lookahead``, but the parameters stay the fast weights (no ``LookaheadParams``) and the
  slow ones live in the optimizer state (checkpointed with it). A leaf whose updates are zero
  (frozen) stays bit-identical."""
  def init(params):
    return LookaheadState(slow=jax.tree.map(jnp.copy, params), count=jnp.zeros((), jnp.int32))

  def update(updates, state, params=None):
    if params is None:
      raise ValueError('lookahead needs the parameters')
    sync = state.count == sync_period - 1
    diff = jax.tree.map(lambda f, u, s: f + u - s, params, updates, state.slow)
    updates = jax.tree.map(lambda u, d: jnp.where(sync, u - (1 - alpha) * d, u), updates, diff)
    slow = jax.tree.map(lambda s, d: jnp.where(sync, s + alpha * d, s), state.slow, diff)
    return updates, LookaheadState(slow=slow, count=(state.count + 1) % sync_period)

  return optax.GradientTransformation(init, update)
