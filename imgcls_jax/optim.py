"""The optax optimizer and learning-rate schedule from ``config.optim``, and the transfer masks.

``config.transfer`` (documented in configs/default.py) shapes the optimizer two ways:
  * ``mode='linear_probe'`` freezes every parameter but the head through optax masking (frozen
    parameters get zero updates, no weight decay and no optimizer state);
  * ``layer_decay`` < 1 trains a parameter at depth ``d`` at ``layer_decay ** (L - d)`` x the rate
    (stem 0, each block +1, head ``L``); each model family gives its depths
    (``imgcls_jax.models.layer_depths``).
Also per-group learning rates (normalisation parameters, biases), frozen parameters by name (which
parameters train and at which rate: ``param_groups.py``) and Lookahead
(``config.optim.lookahead``).

Optimizers and schedules are tables: adding one is one ``OPTIMIZERS`` / ``SCHEDULES`` entry (or a
``register_optimizer`` / ``register_schedule`` call from one's own config file) naming its builder
and the config.optim keys it reads; ``check`` warns about a key set on the command line that the
chosen one does not read.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Iterable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
import optax.contrib

from imgcls_jax import param_groups
from imgcls_jax.errors import UserError
from imgcls_jax.models import LayerDepths



@dataclasses.dataclass(frozen=True)
class Optimizer:
  """A registered optimizer. ``build(cfg, lr)`` (config.optim, the schedule) -> the optax
  transformations to chain after gradient clipping (a list: their states stay flat in
  checkpoints); ``keys``: the config.optim keys it reads besides the ones every optimizer reads
  (learning rate, schedule, clipping, ...), ``decay_rates`` those that must lie in [0, 1);
  ``linear_in_lr``: its update is linear in the learning rate (per-group rates and layer decay
  scale its updates); ``averaged``: it evaluates an average of its iterates (no Lookahead)."""
  build: Callable[[ml_collections.ConfigDict, optax.Schedule], list[optax.GradientTransformation]]
  keys: tuple[str, ...] = ()
  decay_rates: tuple[str, ...] = ()
  linear_in_lr: bool = True
  averaged: bool = False


@dataclasses.dataclass(frozen=True)
class LrSchedule:
  """A registered schedule after warmup: ``build(cfg, peak, decay_steps) -> optax.Schedule``;
  ``keys``: the config.optim keys it reads besides the peak and warmup ones."""
  build: Callable[[ml_collections.ConfigDict, float, int], optax.Schedule]
  keys: tuple[str, ...] = ()


def peak_learning_rate(cfg: ml_collections.ConfigDict, batch_size: int) -> float:
  """``learning_rate``, times ``batch_size / lr_batch_reference`` when that reference is set."""
  ref = cfg.get('lr_batch_reference', 0)
  return cfg.learning_rate * (batch_size / ref if ref else 1.0)


SCHEDULES: dict[str, LrSchedule] = {
    'cosine': LrSchedule(lambda cfg, peak, steps: optax.cosine_decay_schedule(
        peak, steps, alpha=cfg.end_lr_factor), keys=('end_lr_factor',)),
    'constant': LrSchedule(lambda cfg, peak, steps: optax.constant_schedule(peak)),
    'linear': LrSchedule(lambda cfg, peak, steps: optax.linear_schedule(
        peak, peak * cfg.end_lr_factor, steps), keys=('end_lr_factor',)),
}


def schedule(cfg: ml_collections.ConfigDict, *, batch_size: int, total_steps: int,
             warmup_steps: int) -> optax.Schedule:
  """Linear warmup from 0, then ``SCHEDULES[cfg.schedule]``: cosine / linear decay to
  ``end_lr_factor`` x peak, or constant."""
  peak = peak_learning_rate(cfg, batch_size)
  warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
  decay_steps = max(total_steps - warmup_steps, 1)
  if cfg.schedule not in SCHEDULES:
    raise UserError(f"Unknown config.optim.schedule '{cfg.schedule}'; use one of "
                    f"{', '.join(SCHEDULES)}.")
  after = SCHEDULES[cfg.schedule].build(cfg, peak, decay_steps)
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
    if not OPTIMIZERS[cfg.name].linear_in_lr:
      raise UserError('config.optim.norm_lr_factor / bias_lr_factor cannot be combined with '
                      f'{cfg.name} (its update is not linear in the learning rate); set '
                      'them to 1.0.')
    # As for layer decay: scaling a leaf's final update = training it at a scaled learning rate.
    tx = optax.chain(tx, param_groups.scale_by_tree(
        lambda t: param_groups.group_factors(t, norm_names, norm_f, bias_f)))
  probe = False
  if transfer is not None:
    param_groups.validate_transfer(transfer)
    probe = transfer.mode == 'linear_probe'
    if transfer.layer_decay != 1.0:
      if not OPTIMIZERS[cfg.name].linear_in_lr:
        raise UserError(f'config.transfer.layer_decay cannot be combined with {cfg.name} '
                        '(its update is not linear in the learning rate); set layer_decay=1.0.')
      if layer_depths is None:
        raise UserError('config.transfer.layer_decay needs the model family\'s layer-depth rule; '
                        'set layer_decay=1.0 for this model.')
      # The update is linear in the learning rate (all but schedule-free), so scaling the final
      # update of a leaf is exactly training that leaf at a scaled learning rate.
      decay = float(transfer.layer_decay)
      tx = optax.chain(tx, param_groups.scale_by_tree(
          lambda t: param_groups.lr_factors(t, decay, layer_depths)))
  if probe or frozen:
    tx = optax.partition({'trainable': tx, 'frozen': optax.set_to_zero()},
                         lambda t: param_groups.trainable_labels(t, transfer if probe else None,
                                                                 frozen))
  la = cfg.get('lookahead')
  if la is not None and int(la.get('sync_period', 0) or 0) > 0:
    period, alpha = int(la.sync_period), float(la.alpha)
    if not 0.0 < alpha <= 1.0:
      raise UserError(f'config.optim.lookahead.alpha={alpha} must be in (0, 1] (the slow weights '
                      'move this fraction of the way to the fast ones at every sync; e.g. 0.5).')
    if OPTIMIZERS[cfg.name].averaged:
      raise UserError(f'config.optim.lookahead cannot be combined with {cfg.name} (its '
                      'weights are already an average); set lookahead.sync_period=0.')
    tx = optax.chain(tx, lookahead(period, alpha))
  return tx


def _base(cfg: ml_collections.ConfigDict, lr: optax.Schedule) -> optax.GradientTransformation:
  """Global-norm clipping (when set), then the optimizer ``OPTIMIZERS[cfg.name]``:

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
  if cfg.name not in OPTIMIZERS:
    check(cfg)
  parts = []
  if cfg.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
  return optax.chain(*parts, *OPTIMIZERS[cfg.name].build(cfg, lr))


def _sgd(cfg: ml_collections.ConfigDict, lr: optax.Schedule) -> list[Any]:
  decay = ([optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask)]
           if cfg.weight_decay > 0 else [])
  return decay + [optax.sgd(lr, momentum=cfg.momentum or None, nesterov=cfg.nesterov)]


def _schedule_free_adamw(cfg: ml_collections.ConfigDict, lr: optax.Schedule) -> list[Any]:
  adam = optax.chain(optax.scale_by_rms(decay=cfg.b2, eps=cfg.eps, eps_in_sqrt=False,
                                        bias_correction=True),
                     optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask),
                     optax.scale_by_learning_rate(lr))
  return [optax.contrib.schedule_free(adam, lr, b1=cfg.b1)]


_ADAM = ('b1', 'b2', 'eps', 'weight_decay')
OPTIMIZERS: dict[str, Optimizer] = {
    'sgd': Optimizer(_sgd, keys=('momentum', 'nesterov', 'weight_decay'),
                     decay_rates=('momentum',)),
    'adamw': Optimizer(lambda cfg, lr: [optax.adamw(
        lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask)],
        keys=_ADAM, decay_rates=('b1', 'b2')),
    'lamb': Optimizer(lambda cfg, lr: [optax.lamb(
        lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask)],
        keys=_ADAM, decay_rates=('b1', 'b2')),
    'lars': Optimizer(lambda cfg, lr: [optax.lars(
        lr, weight_decay=cfg.weight_decay, weight_decay_mask=decay_mask,
        trust_coefficient=cfg.trust_coefficient, trust_ratio_mask=decay_mask,
        momentum=cfg.momentum, nesterov=cfg.nesterov)],
        keys=('momentum', 'nesterov', 'weight_decay', 'trust_coefficient'),
        decay_rates=('momentum',)),
    'muon': Optimizer(lambda cfg, lr: [optax.contrib.muon(
        lr, beta=cfg.muon_beta, weight_decay=cfg.weight_decay, weight_decay_mask=decay_mask,
        adam_b1=cfg.b1, adam_b2=cfg.b2, eps=cfg.eps,
        muon_weight_dimension_numbers=muon_dimensions)],
        keys=('muon_beta', *_ADAM), decay_rates=('muon_beta', 'b1', 'b2')),
    'schedule_free_adamw': Optimizer(
        _schedule_free_adamw, keys=(*_ADAM, 'schedule_free_bn_batches'),
        decay_rates=('b1', 'b2'), linear_in_lr=False, averaged=True),
}


def register_optimizer(name: str, build: Callable[..., list[optax.GradientTransformation]], *,
                       keys: tuple[str, ...] = (), decay_rates: tuple[str, ...] = (),
                       linear_in_lr: bool = True, averaged: bool = False,
                       replace: bool = False) -> None:
  """Adds an optimizer defined outside this module (``Optimizer`` says what each argument is)."""
  _register(OPTIMIZERS, 'Optimizer', name, replace)
  OPTIMIZERS[name] = Optimizer(build, tuple(keys), tuple(decay_rates), linear_in_lr, averaged)


def register_schedule(name: str, build: Callable[..., optax.Schedule], *,
                      keys: tuple[str, ...] = (), replace: bool = False) -> None:
  """Adds a schedule defined outside this module (``LrSchedule`` says what each argument is)."""
  _register(SCHEDULES, 'Schedule', name, replace)
  SCHEDULES[name] = LrSchedule(build, tuple(keys))


def _register(table: dict[str, Any], what: str, name: str, replace: bool) -> None:
  if name in table and not replace:
    raise UserError(f"{what} '{name}' is already registered; pick another name or pass "
                    'replace=True.')


def check(cfg: ml_collections.ConfigDict, given: Iterable[str] = ()) -> None:
  """UserError unless ``config.optim.name`` is one of ``OPTIMIZERS`` and its decay rates
  (every optimizer's ``decay_rates``: momentum, Adam betas) are in [0, 1) (2 would make every
  update grow without bound). Logs a warning for each config.optim key in ``given`` (main gives
  those set on the command line, ``main.given_keys``) that the chosen optimizer or schedule
  does not read while another one does."""
  if cfg.name not in OPTIMIZERS:
    raise UserError(f"Unknown config.optim.name '{cfg.name}'; use one of {', '.join(OPTIMIZERS)}.")
  for key in dict.fromkeys(k for o in OPTIMIZERS.values() for k in o.decay_rates):
    value = cfg.get(key)
    if value is not None and not 0 <= float(value) < 1:
      raise UserError(f'config.optim.{key}={value} must be in [0, 1): it is the share of the '
                      'previous average kept at each step (e.g. 0.9).')
  for message in unread_keys(cfg, given):
    logging.warning(message)


def unread_keys(cfg: ml_collections.ConfigDict, given: Iterable[str]) -> list[str]:
  """A warning for each key of ``given`` that the optimizer ``cfg.name`` (or the schedule
  ``cfg.schedule``) does not read while another registered one does."""
  messages = []
  for table, field, what in ((OPTIMIZERS, 'name', 'optimizer'), (SCHEDULES, 'schedule',
                                                                  'schedule')):
    chosen = table.get(cfg.get(field))
    for key in [k for k in dict.fromkeys(given) if chosen is not None and k not in chosen.keys]:
      readers = [n for n, entry in table.items() if key in entry.keys]
      if readers:
        messages.append(f"--config.optim.{key} has no effect: the {what} "
                        f"config.optim.{field}='{cfg.get(field)}' does not read it (only "
                        f"{', '.join(readers)} do); drop it, or choose one of those.")
  return messages



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
