"""Transfer learning: a fresh train state whose weights come from elsewhere, with a new head.

``config.transfer.init_from`` is a run directory / checkpoint of this project
(``checkpoint_files.read_weights``) or a ``.safetensors`` / ``.pt`` / ``.pth`` file of a
torchvision- or timm-layout ResNet, ViT, ConvNeXt, EfficientNet or MobileNetV3
(``torch_import``). It is used only when the workdir has no checkpoint yet (a resumed run
continues from its own checkpoints). Weights are matched by name
(``layer1.0.conv1.kernel``); everything but the head must exist with the same shape, and a mismatch
names the parameter. A run of this project gives the weights it evaluates with (its weight EMA
when it kept one for inference); a ViT's position embeddings are resampled to another image size,
and a first convolution of 3 input channels is summed for grey images (1 for colour: repeated
and divided by 3), as timm's ``adapt_input_conv`` does. With ``keep_head`` the source run's
classes must be this run's, in order. Freezing and layer-wise decay are optimizer masks
(``optim.py``).
"""
from __future__ import annotations

import logging
import os
from typing import Any

import jax
import ml_collections
import optax

from imgcls_jax import state as state_lib
from imgcls_jax import checkpoint_files, param_groups, steps
from imgcls_jax import weights as weights_lib
from imgcls_jax.data.info import DatasetInfo
from imgcls_jax.errors import UserError

TORCH_SUFFIXES = ('.safetensors', '.pt', '.pth', '.bin')


def check_source(path: str) -> None:
  """UserError when ``config.transfer.init_from`` does not exist."""
  if not os.path.exists(path):
    raise UserError(f'config.transfer.init_from={path} does not exist; give a run directory of '
                    'this project or a .safetensors / .pt file.')


def load_weights(path: str, step: int | None = None, model: Any = None) -> weights_lib.Weights:
  """Weights from a checkpoint of this project or a torchvision/timm-layout weights file;
  ``model`` (config.model) tells the torch import what the file's shapes do not (a ViT's heads)."""
  check_source(path)
  if os.path.isfile(path):
    if not path.endswith(TORCH_SUFFIXES):
      raise UserError(f'Cannot load weights from {path}: expected a .safetensors, .pt, .pth or '
                      '.bin file (torchvision / timm ResNet, ViT or ConvNeXt; torchvision '
                      'EfficientNet / MobileNetV3) or a run directory of this project.')
    from imgcls_jax import torch_import
    return weights_lib.check_finite(torch_import.load(path, model), 'save the weights again '
                                    'from a model that evaluates well, or start from another file')
  weights = checkpoint_files.read_weights(path, step, step_key='transfer.init_step')
  saved = weights.meta.get('config')
  if isinstance(saved, dict) and steps.uses_ema(saved):   # what the run evaluates with
    weights = checkpoint_files.ema_weights(weights, path, 'transfer.init_step')
  return weights


def fitted(source: weights_lib.Weights, params: Any) -> weights_lib.Weights:
  """``source`` fitted to the model whose parameters are ``params``: a ViT's position embeddings
  resampled to its image size, a first convolution adapted to its image channels (a torch file's
  or a run's alike)."""
  from imgcls_jax import torch_import   # (numpy only: torch is imported to read .pt files)
  return weights_lib.adapt_input_channels(torch_import.fit_to(source, params),
                                          weights_lib.flatten(params))


def init_state(state: Any, shardings: Any, config: ml_collections.ConfigDict,
               tx: optax.GradientTransformation, info: DatasetInfo | None = None) -> Any:
  """A fresh train state with the backbone (and head, if ``config.transfer.keep_head``) from
  ``config.transfer.init_from``; ``info`` (this run's data) checks a kept head's classes."""
  cfg, model_name = config.transfer, config.model.name
  source = fitted(load_weights(cfg.init_from, cfg.get('init_step', -1), config.model),
                  state.params)
  head = param_groups.head_name(weights_lib.flatten(state.params), cfg)
  keep = bool(cfg.get('keep_head', False))
  if keep and info is not None:
    _check_same_classes(source, info)
  _warn_other_normalisation(source, config)

  def hint(name: str) -> str:   # a kept head of another shape: another class count
    return (', or train a new head (config.transfer.keep_head=False)'
            if keep and param_groups.in_head(name, head) else '')

  def skip(name: str) -> bool:
    return not keep and param_groups.in_head(name, head)

  name = source.meta.get('model')   # the architecture a run recorded, or a torch file's layout fits
  if name and name != model_name:
    fix = f"set config.model.name='{name}' (the architecture of {source.origin})"
  elif name:
    fix = (f"match config.model's other keys (widths, depth, ...) to those {source.origin} "
           'was saved with')
  elif os.path.isfile(cfg.init_from):
    fix = 'set config.model to the architecture the file was saved from'
  else:
    fix = 'match config.model to the run that wrote them'
  params, n_params = weights_lib.merge(state.params, source.params, origin=source.origin,
                                       skip=skip, hint=hint, fix=fix)
  stats, n_stats = weights_lib.merge(state.batch_stats, source.batch_stats, origin=source.origin,
                                     skip=skip, kind='Batch statistic', hint=hint, fix=fix)
  params = weights_lib.place(params, state.params)
  batch_stats = weights_lib.place(stats, state.batch_stats)
  opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
  logging.info('Initialised %d parameter and %d statistic arrays from %s; %s head %r; mode %s, '
               'layer_decay %g.', n_params, n_stats, source.origin,
               'kept the' if keep else 'new', head, cfg.mode, cfg.layer_decay)
  ema = state.ema
  if ema is not None:  # the average starts from the loaded weights
    ema = jax.jit(state_lib.ema_copy, out_shardings=shardings.ema)(params, batch_stats)
  return state.replace(params=params, batch_stats=batch_stats, opt_state=opt_state, ema=ema)


def _source_classes(source: weights_lib.Weights) -> list[str] | None:
  meta = source.meta
  if isinstance(meta.get('dataset_info'), dict) and meta['dataset_info'].get('class_names'):
    return list(meta['dataset_info']['class_names'])
  return list(meta['class_names']) if meta.get('class_names') else None


def _check_same_classes(source: weights_lib.Weights, info: DatasetInfo) -> None:
  """A kept head answers in its own run's classes: UserError unless they are this run's, in
  order (a folder with one class renamed sorts them otherwise: every answer would be another
  class's, silently)."""
  theirs, ours = _source_classes(source), list(info.class_names)
  if theirs is None or theirs == ours or len(theirs) != len(ours):
    return   # (a torch file has none; another count is a head of another shape, named there)
  if sorted(theirs) == sorted(ours):
    at = next(i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b)
    why = (f"the same classes in another order (class {at} is '{theirs[at]}' there and "
           f"'{ours[at]}' here)")
  else:
    gone = [c for c in theirs if c not in ours]
    new = [c for c in ours if c not in theirs]
    why = (f"other classes ({', '.join(map(repr, gone[:3]))} there; "
           f"{', '.join(map(repr, new[:3]))} here)")
  raise UserError(f'config.transfer.keep_head=True keeps the head of {source.origin}, which was '
                  f'trained on {why}: its answers would name the wrong classes; train a new head '
                  '(config.transfer.keep_head=False), or give this data the same class names.')


def _warn_other_normalisation(source: weights_lib.Weights, config: ml_collections.ConfigDict
                              ) -> None:
  """A warning when the source run normalised its images with another mean / std: its features
  expect those inputs (a digits run's 99% fell to 14% under mean 0, std 1)."""
  saved = source.meta.get('config')
  data = saved.get('data') if isinstance(saved, dict) else None
  if not isinstance(data, dict):
    return
  theirs = [float(v) for v in data.get('mean', ())], [float(v) for v in data.get('std', ())]
  ours = [float(v) for v in config.data.mean], [float(v) for v in config.data.std]
  if not all(theirs):
    return
  if len(theirs[0]) != len(ours[0]):   # colour weights for grey images: their channels' mean
    same = all(abs(sum(t) / len(t) - sum(o) / len(o)) < 5e-3 for t, o in zip(theirs, ours))
  else:
    same = theirs == ours
  if not same:
    logging.warning('%s normalised its images with mean %s, std %s, and this run with mean %s, '
                    'std %s: its weights expect their inputs; set config.data.mean / .std to the '
                    "source's unless the change is meant.", source.origin, theirs[0], theirs[1],
                    ours[0], ours[1])
