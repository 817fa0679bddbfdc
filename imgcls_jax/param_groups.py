"""Which parameters train, and at which rate: ``config.transfer``'s modes and head, the parameters
``config.optim.freeze`` names, and the per-leaf learning-rate factors (normalisation parameters and
biases, ``config.transfer.layer_decay``'s per-layer decay) that ``optim.build`` applies as optax
transformations (``scale_by_tree``; labels for ``optax.multi_transform``)."""
from __future__ import annotations

from typing import Any, Callable

import jax
import ml_collections
import optax

from imgcls_jax import weights
from imgcls_jax.errors import UserError
from imgcls_jax.models import LayerDepths

TRANSFER_MODES = ('finetune', 'linear_probe')
# Top-level attribute names that hold a model's classifier head, in order of preference.
HEAD_NAMES = ('fc', 'head', 'classifier')


def validate_transfer(cfg: ml_collections.ConfigDict) -> None:
  """Raises UserError for a bad ``config.transfer`` value."""
  if cfg.mode not in TRANSFER_MODES:
    raise UserError(f"Unknown config.transfer.mode '{cfg.mode}'; use one of "
                    f"{', '.join(TRANSFER_MODES)}.")
  if not 0.0 < cfg.layer_decay <= 1.0:
    raise UserError(f'config.transfer.layer_decay must be in (0, 1] (1.0 = off), got '
                    f'{cfg.layer_decay}.')
  if cfg.mode == 'linear_probe' and cfg.layer_decay != 1.0:
    raise UserError('config.transfer.layer_decay applies to fine-tuning; a linear probe trains '
                    'only the head, so set layer_decay=1.0 (or mode=finetune).')
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
