"""Per-class loss weights from ``config.loss``, resolved against the dataset: class weights and
logit-adjustment offsets (single-label softmax runs), tag ``pos_weight`` (multi-label runs), and
the check that a multi-label run uses none of the single-label options.

``run.setup`` puts the resolved numbers into the step's ``StepConfig``; the counts they need come
from the training split (``data.sources``, imported only when an option asks for counts, so this
module loads where TensorFlow is not installed).
"""
from __future__ import annotations

import logging
from typing import Any

import ml_collections
import numpy as np

from imgcls_jax.data.info import DatasetInfo
from imgcls_jax.errors import UserError


def class_weights(config: ml_collections.ConfigDict, info: DatasetInfo
                  ) -> tuple[float, ...] | None:
  """``config.loss.class_weights`` resolved to K numbers ('balanced': ``n / (K * n_k)`` from the
  training split's counts, as ``sklearn.utils.class_weight.compute_class_weight``); None = off."""
  spec = (config.get('loss') or {}).get('class_weights', '') or ''
  k = info.num_classes
  if isinstance(spec, str) and not spec.strip():
    return None
  if spec == 'balanced':
    from imgcls_jax.data import reader
    counts = reader.class_counts(config.data, config.data.train_split, k).astype(np.float64)
    if (counts == 0).any():
      missing = [info.class_names[i] for i in np.flatnonzero(counts == 0)[:5]]
      raise UserError(f"class_weights='balanced' needs every class in the training split; "
                      f"{', '.join(missing)} has none. Give explicit config.loss.class_weights.")
    weights = counts.sum() / (k * counts)
    logging.info('Class weights (balanced): %s.', ', '.join(
        f'{n} {w:.3g}' for n, w in list(zip(info.class_names, weights))[:20]))
    return tuple(float(w) for w in weights)
  values = _numbers(spec)
  if len(values) != k or any(not v >= 0 for v in values) or not any(values):
    raise UserError(f"config.loss.class_weights={spec!r} must be '', 'balanced' or {k} "
                    'non-negative numbers (one per class, comma-separated), not all zero.')
  return tuple(values)


def _numbers(spec: Any) -> list[float]:
  """K numbers from a comma-separated string or a sequence ([] when they are not numbers)."""
  try:
    return ([float(v) for v in spec.split(',')] if isinstance(spec, str)
            else [float(v) for v in spec])
  except (TypeError, ValueError):
    return []


def check_multilabel(config: ml_collections.ConfigDict) -> None:
  """The single-label loss options a multi-label (sigmoid) run cannot use, named."""
  loss = config.get('loss') or {}
  for key, off in (('class_weights', ''), ('focal_gamma', 0.0), ('logit_adjustment', 0.0)):
    value = loss.get(key, off)
    if value not in (off, None, 0, ''):
      raise UserError(f'config.loss.{key}={value!r} is a single-label (softmax) option; a '
                      'multi-label run (config.data.multilabel=True) weighs rare tags with '
                      "config.loss.pos_weight ('balanced' or one number per tag) instead.")


def warn_untrainable_tags(config: ml_collections.ConfigDict, info: DatasetInfo) -> None:
  """At training a multi-label run from an arrays file or the user's images (whose counts are
  at hand): a tag on no training image, or on every one, cannot be learned, and its AP / F1 /
  ROC-AUC are undefined or constant, moving the macro means; say which, once."""
  from imgcls_jax.data import folder_layout, reader
  from imgcls_jax.data.arrays import is_arrays
  if not info.multilabel or not (is_arrays(config.data) or folder_layout.is_folder(config.data)):
    return
  split = config.data.train_split
  if '@' in split:   # a k-fold's fold: its whole split was checked (or is read through tf.data)
    return
  counts = reader.class_counts(config.data, split, info.num_classes)
  n = reader.split_size(config.data, split, info)
  on_all = counts == n if n else np.zeros_like(counts, bool)   # n: None when not known
  for what, hit in (('no', counts == 0), ('every', on_all)):
    names = [info.class_names[k] for k in np.flatnonzero(hit)]
    if names:
      more = f' and {len(names) - 5} more' if len(names) > 5 else ''
      logging.warning("Tag(s) %s%s are on %s image of the training split '%s': the model cannot "
                      'learn them, and their precision / recall / AP enter the macro means as 0 '
                      'or 1; tag some images with them and some without, or leave them out.',
                      ', '.join(names[:5]), more, what, split)


def pos_weight(config: ml_collections.ConfigDict, info: DatasetInfo
               ) -> tuple[float, ...] | None:
  """``config.loss.pos_weight`` of a multi-label run resolved to K numbers ('balanced': each
  tag's negatives / positives in the training split, capped at 100, as PyTorch's BCE
  ``pos_weight`` is usually set); None = off."""
  spec = (config.get('loss') or {}).get('pos_weight', '') or ''
  if isinstance(spec, str) and not spec.strip():
    return None
  k = info.num_classes
  if not info.multilabel:
    raise UserError(f'config.loss.pos_weight={spec!r} is for multi-label runs '
                    '(config.data.multilabel=True); use config.loss.class_weights here.')
  if spec == 'balanced':
    from imgcls_jax.data import reader
    split = config.data.train_split
    counts = reader.class_counts(config.data, split, k).astype(np.float64)
    n = reader.split_size(config.data, split)
    if n is None:  # mock_data: count the examples
      from imgcls_jax.data import sources
      n = sources.count(sources.read(config.data, split, 0, 1, drop_remainder=False,
                                     decode=False))
    weights = np.minimum((n - counts) / np.maximum(counts, 1), 100.0)
    return tuple(float(w) for w in weights)
  values = _numbers(spec)
  if len(values) != k or any(not v > 0 for v in values):
    raise UserError(f"config.loss.pos_weight={spec!r} must be '', 'balanced' or {k} positive "
                    'numbers (one per tag, comma-separated).')
  return tuple(values)


def logit_offsets(config: ml_collections.ConfigDict, info: DatasetInfo
                  ) -> tuple[float, ...] | None:
  """``tau * log(prior_k)`` for ``config.loss.logit_adjustment = tau > 0`` (the priors from the
  training split's class counts); None = off."""
  tau = float((config.get('loss') or {}).get('logit_adjustment', 0.0) or 0.0)
  if tau == 0:
    return None
  if tau < 0:
    raise UserError(f'config.loss.logit_adjustment={tau} must be >= 0 (0 = off; e.g. 1.0).')
  if config.label_smoothing:
    raise UserError(f'config.loss.logit_adjustment={tau} needs config.label_smoothing=0: '
                    'smoothing puts target mass on the rare classes, which the prior offsets '
                    'turn into predicting them everywhere.')
  from imgcls_jax.data import reader
  counts = reader.class_counts(config.data, config.data.train_split, info.num_classes)
  prior = np.maximum(counts, 1) / max(counts.sum(), 1)   # a class without images: one, not zero
  return tuple(float(tau * np.log(p)) for p in prior)
