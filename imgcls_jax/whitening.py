"""Patch-whitening initialisation of the first convolution (``config.init.patch_whitening``).

As airbench (Jordan 2024) does for CIFAR-10: the first conv's filters become the eigenvectors of
the covariance of its k x k input patches (taken from the first training images), each scaled by
``1 / sqrt(eigenvalue + eps)``, so its outputs on those patches are decorrelated with variance
``eigenvalue / (eigenvalue + eps)`` (about 1). With ``whitening_negatives`` each filter comes with
its negative (a ReLU follows: both signs pass). Filters are ordered by decreasing eigenvalue
(interleaved with their negatives: v1, -v1, v2, -v2, ...); when the layer has fewer output
channels than that, the first ones are used; when it has more, the rest keep their random
initialisation. ``config.init.freeze_whitening`` keeps the layer fixed (zero updates in
``optim.py``). Only a fresh run is initialised so (a resumed run has its own weights).

The patches are those the conv sees: normalised images (``config.data.mean`` / ``std``), after
the family's parameter-free stem when it has one (fast_cnn's space-to-depth); the covariance is
centred, in float64. A family opts in with a ``models.FirstConv`` on its table entry (or given to
``models.register``): which kernel to set, and that stem.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import ml_collections
import numpy as np

from imgcls_jax import models
from imgcls_jax.errors import UserError


def enabled(config: ml_collections.ConfigDict) -> bool:
  init = config.get('init')
  return bool(init and init.get('patch_whitening', False))


def first_conv(config: ml_collections.ConfigDict) -> str:
  """The dotted name of the kernel patch whitening sets; UserError for a model family without a
  ``models.FirstConv``."""
  name = config.model.name
  if models.family(name).first_conv is None:
    able = [n for n in models.names() if models.family(n).first_conv is not None]
    raise UserError(f"config.init.patch_whitening is available for the model families "
                    f"{', '.join(able)}, not '{name}'; set it to False.")
  if config.get('transfer') and config.transfer.init_from:
    raise UserError('config.init.patch_whitening and config.transfer.init_from both set the first '
                    'convolution; use one of them.')
  return models.family(name).first_conv.kernel


def frozen_names(config: ml_collections.ConfigDict) -> frozenset[str]:
  """The parameters ``config.init.freeze_whitening`` freezes (empty when off); checks that patch
  whitening fits the model when it is on."""
  if not enabled(config):
    return frozenset()
  name = first_conv(config)
  return frozenset({name}) if config.init.get('freeze_whitening', False) else frozenset()


def conv_inputs(images_NxHxWxC: np.ndarray, config: ml_collections.ConfigDict) -> np.ndarray:
  """uint8 images -> what the first conv sees (float64): normalised, then the family's stem
  (``models.FirstConv.stem``, e.g. fast_cnn's 2x2 pixel blocks to channels) when it has one."""
  x = images_NxHxWxC.astype(np.float64) / 255.0
  x = (x - np.asarray(config.data.mean, np.float64)) / np.asarray(config.data.std, np.float64)
  conv = models.family(config.model.name).first_conv
  return np.asarray(conv.stem(x, config.model)) if conv and conv.stem else x


def patch_moments(x_NxHxWxC: np.ndarray, kh: int, kw: int,
                  chunk: int = 256) -> tuple[np.ndarray, np.ndarray, int]:
  """(sum of patches ``D``, sum of outer products ``DxD``, count) of every ``kh x kw`` patch
  (flattened in (row, column, channel) order, as a conv kernel's first three axes)."""
  c = x_NxHxWxC.shape[-1]
  d = kh * kw * c
  total, outer, count = np.zeros(d), np.zeros((d, d)), 0
  for i in range(0, len(x_NxHxWxC), chunk):
    windows = np.lib.stride_tricks.sliding_window_view(x_NxHxWxC[i:i + chunk], (kh, kw), (1, 2))
    # N x H' x W' x C x kh x kw -> patches x (kh kw C)
    p = windows.transpose(0, 1, 2, 4, 5, 3).reshape(-1, d)
    total += p.sum(0)
    outer += p.T @ p
    count += len(p)
  return total, outer, count


def whitening_filters(x_NxHxWxC: np.ndarray, kernel_shape: tuple[int, ...], *, eps: float,
                      negatives: bool) -> tuple[np.ndarray, np.ndarray]:
  """(the whitening filters as a ``kh x kw x C x n`` kernel, the eigenvalues, decreasing) of the
  patches of ``x``; n = the patch dimension (twice that with ``negatives``)."""
  kh, kw, c, _ = kernel_shape
  if x_NxHxWxC.shape[-1] != c:
    raise UserError(f'The first convolution takes {c} channels but its inputs have '
                    f'{x_NxHxWxC.shape[-1]}; check config.model.')
  total, outer, count = patch_moments(x_NxHxWxC, kh, kw)
  if count < 2:
    raise UserError('config.init.patch_whitening needs training images at least as large as '
                    'the first convolution.')
  mean = total / count
  cov = (outer - count * np.outer(mean, mean)) / (count - 1)
  eigenvalues, vectors = np.linalg.eigh(cov)       # ascending
  eigenvalues, vectors = eigenvalues[::-1].clip(min=0.0), vectors[:, ::-1]
  filters = vectors / np.sqrt(eigenvalues + eps)    # columns: one filter each
  if negatives:
    filters = np.stack([filters, -filters], axis=-1).reshape(filters.shape[0], -1)
  return filters.reshape(kh, kw, c, -1), eigenvalues


def filters_for(config: ml_collections.ConfigDict, images_NxHxWxC: np.ndarray,
                kernel_shape: tuple[int, ...]) -> np.ndarray:
  """The whitening filters (``kh x kw x C x n``, float32) that go into the first ``n`` output
  channels of a first conv of ``kernel_shape``, from ``images`` (uint8)."""
  init = config.init
  filters, eigenvalues = whitening_filters(
      conv_inputs(images_NxHxWxC, config), tuple(kernel_shape), eps=float(init.whitening_eps),
      negatives=bool(init.whitening_negatives))
  n = min(kernel_shape[-1], filters.shape[-1])
  logging.info('Patch whitening: %d of %d filters of the first convolution from %d training '
               'images (eigenvalues %.3g .. %.3g)%s.', n, kernel_shape[-1], len(images_NxHxWxC),
               eigenvalues[0], eigenvalues[-1],
               ', frozen' if init.get('freeze_whitening', False) else '')
  return filters[..., :n].astype(np.float32)


def override(config: ml_collections.ConfigDict, info: Any,
             model_fn: Any) -> dict[str, Callable[[Any], Any]]:
  """``{first conv kernel name: kernel -> whitened kernel}`` for ``state.create``: the first
  output channels become the filters of the first ``config.init.whitening_examples`` training
  images (eval-preprocessed); the others keep the seed's random values."""
  from imgcls_jax import state as state_lib
  from imgcls_jax import weights
  from imgcls_jax.data import reader
  name = first_conv(config)
  count = int(config.init.whitening_examples)
  if count < 1:
    raise UserError(f'config.init.whitening_examples={count} must be positive (e.g. 5000).')
  if not float(config.init.whitening_eps) > 0:
    raise UserError(f'config.init.whitening_eps={config.init.whitening_eps} must be > 0 (it bounds '
                    'the gain of low-variance directions; e.g. 5e-4).')
  shape = weights.flatten(state_lib.abstract_variables(model_fn).params)[name].shape
  images = reader.samples(config.data, info, eval_count=1, train_count=count)['train_images']
  filters = filters_for(config, images, tuple(shape))
  return {name: lambda kernel: kernel.at[..., :filters.shape[-1]].set(filters)}
