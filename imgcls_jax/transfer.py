"""Transfer learning: start from another run's weights (or torchvision/timm files), with a new head.

``config.transfer`` (documented in configs/default.py):
  * ``init_from``: a run directory / checkpoint of this project, or a ``.safetensors`` / ``.pt`` /
    ``.pth`` file of a torchvision- or timm-layout ResNet (see ``torch_import``). Used only when the
    workdir has no checkpoint yet (a resumed run continues from its own checkpoints).
  * ``mode``: ``'finetune'`` trains everything; ``'linear_probe'`` freezes every parameter but the
    head through optax masking (frozen parameters get zero updates and no optimizer state).
  * ``layer_decay``: layer-wise learning-rate decay; a parameter at depth ``d`` (stem 0, each
    residual block / conv layer +1, head ``L``) trains at ``layer_decay ** (L - d)`` x the rate.

Weights are matched by name (``layer1.0.conv1.kernel``); everything but the head must exist with
the same shape, and a mismatch names the parameter.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
import optax

from imgcls_jax.errors import UserError

MODES = ('finetune', 'linear_probe')
# Top-level attribute names that hold a model's classifier head, in order of preference.
HEAD_NAMES = ('fc', 'head', 'classifier')
TORCH_SUFFIXES = ('.safetensors', '.pt', '.pth', '.bin')

FlatArrays = dict[str, np.ndarray]


@dataclasses.dataclass
class Weights:
  """Named arrays from some source, in this project's naming (``layer1.0.conv1.kernel``)."""
  params: FlatArrays
  batch_stats: FlatArrays
  origin: str                              # for messages: 'checkpoint 300 of /runs/a'
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)


# ---------------------------------------------------------------------------- parameter names

def path_name(path: tuple[Any, ...]) -> str:
  """``(DictKey('layer1'), DictKey(0), DictKey('conv1'), ...)`` -> ``'layer1.0.conv1...'``."""
  parts = []
  for k in path:
    for attr in ('key', 'idx', 'name'):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return '.'.join(parts)


def flatten(tree: Any) -> dict[str, Any]:
  """A pytree of arrays as ``{dotted name: leaf}``."""
  return {path_name(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _map_named(fn: Callable[[str, Any], Any], tree: Any) -> Any:
  return jax.tree_util.tree_map_with_path(lambda p, v: fn(path_name(p), v), tree)


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


def _in_head(name: str, head: str) -> bool:
  return name == head or name.startswith(head + '.')


# ------------------------------------------------------------------------- optimizer masks

def trainable_labels(tree: Any, cfg: ml_collections.ConfigDict) -> Any:
  """``'trainable'`` / ``'frozen'`` per leaf: in linear_probe only the head trains."""
  head = head_name(flatten(tree), cfg)
  probe = cfg.mode == 'linear_probe'
  return _map_named(lambda n, _: 'trainable' if not probe or _in_head(n, head) else 'frozen', tree)


_RESNET_STAGE = re.compile(r'^layer(\d+)$')


def layer_depths(names: list[str]) -> tuple[dict[str, int], int]:
  """(depth per parameter name, depth of the head) for the model families of ``imgcls_jax.models``.

  Depth 0 is the stem; each residual block (ResNet, WideResNet) or conv layer (CNN) adds one; the
  head and any norm right before it sit at the top depth ``L``.
  """
  tops = {n.split('.')[0] for n in names}
  block_of: dict[str, int] = {}      # group prefix -> depth
  if any(_RESNET_STAGE.match(t) for t in tops):          # models/resnet.py
    stages = sorted((int(_RESNET_STAGE.match(t).group(1)), t) for t in tops
                    if _RESNET_STAGE.match(t))
    depth = 0
    for _, stage in stages:
      for i in sorted({int(n.split('.')[1]) for n in names if n.split('.')[0] == stage}):
        depth += 1
        block_of[f'{stage}.{i}'] = depth
    stem = {'conv1', 'bn1'}
  elif 'convs' in tops:                                   # models/cnn.py
    idx = sorted({int(n.split('.')[1]) for n in names if n.split('.')[0] in ('convs', 'norms')})
    for i in idx:
      block_of[f'convs.{i}'] = block_of[f'norms.{i}'] = i + 1
    depth, stem = len(idx), set()
  elif 'blocks' in tops:                                  # models/wide_resnet.py
    idx = sorted({int(n.split('.')[1]) for n in names if n.split('.')[0] == 'blocks'})
    for i in idx:
      block_of[f'blocks.{i}'] = i + 1
    depth, stem = len(idx), {'stem'}
  else:
    raise UserError('config.transfer.layer_decay does not know the layer order of a model with '
                    f"parameter groups {', '.join(sorted(tops))}; add a rule in "
                    'imgcls_jax/transfer.py:layer_depths or set layer_decay=1.0.')
  top = depth + 1
  out = {}
  for n in names:
    first, rest = n.split('.', 1)[0], n.split('.')
    prefix = '.'.join(rest[:2])
    if prefix in block_of:
      out[n] = block_of[prefix]
    elif first in stem:
      out[n] = 0
    else:  # the head, and norms between the last block and the head
      out[n] = top
  return out, top


def lr_factors(tree: Any, cfg: ml_collections.ConfigDict) -> Any:
  """Per-leaf learning-rate multipliers ``layer_decay ** (L - depth)``."""
  depths, top = layer_depths(list(flatten(tree)))
  decay = float(cfg.layer_decay)
  return _map_named(lambda n, _: decay ** (top - depths[n]), tree)


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


def wrap_optimizer(tx: optax.GradientTransformation,
                   cfg: ml_collections.ConfigDict | None) -> optax.GradientTransformation:
  """``tx`` with layer-wise lr decay and/or a frozen backbone as ``cfg`` says (``tx`` when off)."""
  if cfg is None:
    return tx
  validate(cfg)
  if cfg.layer_decay != 1.0:
    # The update is linear in the learning rate for sgd and adamw, so scaling the final update of
    # a leaf is exactly training that leaf at a scaled learning rate.
    tx = optax.chain(tx, scale_by_tree(lambda t: lr_factors(t, cfg)))
  if cfg.mode == 'linear_probe':
    tx = optax.partition({'trainable': tx, 'frozen': optax.set_to_zero()},
                         lambda t: trainable_labels(t, cfg))
  return tx


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Raises UserError for a bad ``config.transfer`` value."""
  if cfg.mode not in MODES:
    raise UserError(f"Unknown config.transfer.mode '{cfg.mode}'; use one of {', '.join(MODES)}.")
  if not 0.0 < cfg.layer_decay <= 1.0:
    raise UserError(f'config.transfer.layer_decay must be in (0, 1] (1.0 = off), got '
                    f'{cfg.layer_decay}.')
  if cfg.mode == 'linear_probe' and cfg.layer_decay != 1.0:
    raise UserError('config.transfer.layer_decay applies to fine-tuning; a linear probe trains only '
                    'the head, so set layer_decay=1.0 (or mode=finetune).')
  if cfg.mode == 'linear_probe' and not cfg.init_from:
    raise UserError("config.transfer.mode='linear_probe' trains only the head on a frozen "
                    'backbone, which is random without weights; set config.transfer.init_from.')


# ------------------------------------------------------------------------------ weight sources

def _checkpoint_dir(path: str) -> tuple[str, int | None]:
  """(checkpoints directory, explicit step or None) for a run dir, checkpoints dir or step dir."""
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, 'checkpoints')):
    return os.path.join(path, 'checkpoints'), None
  base = os.path.basename(path.rstrip('/'))
  if base.isdigit() and os.path.isdir(os.path.join(path, 'state')):
    return os.path.dirname(path), int(base)
  if os.path.isdir(path) and any(d.isdigit() for d in os.listdir(path)):
    return path, None
  raise UserError(f'No checkpoint of this project at {path}; point config.transfer.init_from at a '
                  'run directory (with checkpoints/), one checkpoint step directory, or a '
                  '.safetensors / .pt file.')


def read_checkpoint(path: str, step: int | None = None) -> Weights:
  """Parameters, batch statistics and metadata of a checkpoint written by this project, as numpy.

  ``path`` is a run directory, its ``checkpoints`` directory or one step directory; ``step``
  (default: the one in ``path``, else the latest) picks the checkpoint. Any device layout works.
  """
  import orbax.checkpoint as ocp

  directory, path_step = _checkpoint_dir(path)
  steps = sorted(int(d) for d in os.listdir(directory)
                 if d.isdigit() and os.path.isdir(os.path.join(directory, d, 'state')))
  step = path_step if step is None or step < 0 else step
  if step is None:
    if not steps:
      raise UserError(f'No finished checkpoint in {directory}; train that run first.')
    step = steps[-1]
  if step not in steps:
    raise UserError(f'Checkpoint step {step} is not in {directory} (it has: '
                    f"{', '.join(map(str, steps)) or 'none'}); pick one of those.")
  state_dir = os.path.join(directory, str(step), 'state')
  origin = f'checkpoint {step} of {directory}'
  ckptr = ocp.PyTreeCheckpointer()
  try:
    from etils import epath
    tree = ocp.PyTreeCheckpointHandler().metadata(epath.Path(state_dir)).tree
    item = {k: tree[k] for k in ('params', 'batch_stats') if k in tree}
    if 'params' not in item:
      raise KeyError('params')
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    restored = ckptr.restore(state_dir, args=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True))
  except (ValueError, KeyError, TypeError, OSError, FileNotFoundError) as e:
    raise UserError(f'Cannot read {origin} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); '
                    'it is incomplete or not a checkpoint of this project.') from None
  meta: dict[str, Any] = {}
  meta_file = os.path.join(directory, str(step), 'meta', 'metadata')
  if os.path.exists(meta_file):
    import json
    with open(meta_file) as f:
      meta = json.load(f) or {}
  meta['step'] = step
  return Weights(params=flatten(restored['params']),
                 batch_stats=flatten(restored.get('batch_stats', {})), origin=origin, meta=meta)


def load_weights(path: str, step: int | None = None) -> Weights:
  """Weights from a checkpoint of this project or a torchvision/timm-layout ResNet file."""
  if not os.path.exists(path):
    raise UserError(f'config.transfer.init_from={path} does not exist; give a run directory of '
                    'this project or a .safetensors / .pt file.')
  if os.path.isfile(path):
    if not path.endswith(TORCH_SUFFIXES):
      raise UserError(f'Cannot load weights from {path}: expected a .safetensors, .pt, .pth or '
                      '.bin file (torchvision / timm ResNet layout) or a run directory of this '
                      'project.')
    from imgcls_jax import torch_import
    return torch_import.load(path)
  return read_checkpoint(path, step)


# ------------------------------------------------------------------------------ merging

def merge(target: Any, source: FlatArrays, *, origin: str, skip: Callable[[str], bool],
          kind: str = 'Parameter', hint: str = '') -> tuple[Any, int]:
  """``target`` with every leaf that is not ``skip``-ped replaced by the same-named numpy array.

  ``target`` is a pytree of arrays or ``ShapeDtypeStruct``s; skipped leaves are kept as they are.
  Returns (the pytree, how many leaves came from ``source``). Raises UserError naming the first
  parameter that is missing from ``source``, extra in it, or of another shape.
  """
  names = flatten(target)
  wanted = {n for n in names if not skip(n)}
  missing = sorted(wanted - set(source))
  if missing:
    more = f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''
    raise UserError(f"{kind} '{missing[0]}'{more} of this model is not in {origin}; the weights "
                    'are from another architecture: match config.model to the run that wrote them.')
  extra = sorted(n for n in source if n not in names and not skip(n))
  if extra:
    more = f' (and {len(extra) - 1} more)' if len(extra) > 1 else ''
    raise UserError(f"{kind} '{extra[0]}'{more} in {origin} does not exist in this model; the "
                    'weights are from another architecture: match config.model to them.')
  for n in sorted(wanted):
    want, got = tuple(names[n].shape), tuple(np.shape(source[n]))
    if want != got:
      raise UserError(f"{kind} '{n}' has shape {got} in {origin} but {want} in this model; match "
                      f'config.model (and the image channels) to the weights{hint}.')
  merged = _map_named(lambda n, leaf: np.asarray(source[n], dtype=leaf.dtype) if n in wanted
                      else leaf, target)
  return merged, len(wanted)


def _place(values: Any, like: Any) -> Any:
  """Numpy leaves as global arrays with the shardings of ``like`` (works across processes)."""
  def put(v, ref):
    if isinstance(v, jax.Array):
      return v
    return jax.make_array_from_callback(v.shape, ref.sharding, lambda idx: v[idx])
  return jax.tree.map(put, values, like)


def init_state(state: Any, shardings: Any, cfg: ml_collections.ConfigDict,
               tx: optax.GradientTransformation) -> Any:
  """A fresh train state with the backbone (and head, if ``keep_head``) from ``cfg.init_from``."""
  weights = load_weights(cfg.init_from, cfg.get('init_step', -1))
  head = head_name(flatten(state.params), cfg)
  keep = bool(cfg.get('keep_head', False))
  hint = (', or train a new head (config.transfer.keep_head=False)' if keep else '')

  def skip(name: str) -> bool:
    return not keep and _in_head(name, head)

  params, n_params = merge(state.params, weights.params, origin=weights.origin, skip=skip,
                           hint=hint)
  stats, n_stats = merge(state.batch_stats, weights.batch_stats, origin=weights.origin, skip=skip,
                         kind='Batch statistic', hint=hint)
  params = _place(params, state.params)
  batch_stats = _place(stats, state.batch_stats)
  opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
  logging.info('Initialised %d parameter and %d statistic arrays from %s; %s head %r; mode %s, '
               'layer_decay %g.', n_params, n_stats, weights.origin,
               'kept the' if keep else 'new', head, cfg.mode, cfg.layer_decay)
  return state.replace(params=params, batch_stats=batch_stats, opt_state=opt_state)
