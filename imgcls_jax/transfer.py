"""Transfer learning: a fresh train state whose weights come from elsewhere, with a new head.

``config.transfer.init_from`` is a run directory / checkpoint of this project
(``checkpoint_files.read_weights``) or a ``.safetensors`` / ``.pt`` / ``.pth`` file of a
torchvision- or timm-layout ResNet, ViT, ConvNeXt, EfficientNet or MobileNetV3
(``torch_import``). It is used only when the workdir has no checkpoint yet (a resumed run
continues from its own checkpoints). Weights are matched by name
(``layer1.0.conv1.kernel``); everything but the head must exist with the same shape, and a mismatch
names the parameter. Freezing and layer-wise decay are optimizer masks (``optim.py``).
"""
from __future__ import annotations

import logging
import os
from typing import Any

import jax
import ml_collections
import optax

from imgcls_jax import state as state_lib
from imgcls_jax import checkpoint_files, optim
from imgcls_jax import weights as weights_lib
from imgcls_jax.errors import UserError

TORCH_SUFFIXES = ('.safetensors', '.pt', '.pth', '.bin')


def check_source(path: str) -> None:
  """UserError when ``config.transfer.init_from`` does not exist."""
  if not os.path.exists(path):
    raise UserError(f'config.transfer.init_from={path} does not exist; give a run directory of '
                    'this project or a .safetensors / .pt file.')


def load_weights(path: str, step: int | None = None) -> weights_lib.Weights:
  """Weights from a checkpoint of this project or a torchvision/timm-layout weights file."""
  check_source(path)
  if os.path.isfile(path):
    if not path.endswith(TORCH_SUFFIXES):
      raise UserError(f'Cannot load weights from {path}: expected a .safetensors, .pt, .pth or '
                      '.bin file (torchvision / timm ResNet, ViT or ConvNeXt; torchvision '
                      'EfficientNet / MobileNetV3) or a run directory of this project.')
    from imgcls_jax import torch_import
    return weights_lib.check_finite(torch_import.load(path), 'save the weights again from a '
                                    'model that evaluates well, or start from another file')
  return checkpoint_files.read_weights(path, step, step_key='transfer.init_step')


def init_state(state: Any, shardings: Any, cfg: ml_collections.ConfigDict,
               tx: optax.GradientTransformation, model_name: str = '') -> Any:
  """A fresh train state with the backbone (and head, if ``keep_head``) from ``cfg.init_from``;
  ``model_name`` (config.model.name) only words the error for weights of another architecture."""
  source = load_weights(cfg.init_from, cfg.get('init_step', -1))
  if os.path.isfile(cfg.init_from):   # torch weights: a ViT trained at another image size
    from imgcls_jax import torch_import
    source = torch_import.fit_to(source, state.params)
  head = optim.head_name(weights_lib.flatten(state.params), cfg)
  keep = bool(cfg.get('keep_head', False))
  hint = (', or train a new head (config.transfer.keep_head=False)' if keep else '')

  def skip(name: str) -> bool:
    return not keep and optim.in_head(name, head)

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
