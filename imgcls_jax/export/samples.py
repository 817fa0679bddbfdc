"""The images an export is checked and calibrated on: the dataset, else the run directory alone.

Eval images (verification) come from the eval split; when the dataset cannot be read, from the
samples stored in the run directory (``run_directory.read_samples``, where available), else from
seeded synthetic images of the model's input shape (agreement with JAX only, no accuracy).
Calibration images for int8 come from the training split, else from the stored samples.
"""
from __future__ import annotations

import dataclasses
import logging

import ml_collections
import numpy as np

from imgcls_jax import run_directory
from imgcls_jax.errors import UserError


@dataclasses.dataclass
class Samples:
  """uint8 NxHxWxC images at the model's input shape, their labels when known, and their origin."""
  images: np.ndarray
  labels: np.ndarray | None
  source: str


def read_split(data: ml_collections.ConfigDict, split: str, n: int) -> Samples:
  """The first ``n`` (all when ``n`` < 0) images and labels of ``split``, eval-preprocessed."""
  from imgcls_jax.data import reader
  images, labels, total = [], [], 0
  for batch in reader.eval_data(data, split, local_batch_size=256).batches():
    mask = batch['mask']
    images.append(batch['image'][mask])
    labels.append(batch['label'][mask])
    total += int(mask.sum())
    if 0 <= n <= total:
      break
  if not total:
    raise UserError(f"The split '{split}' of '{data.name}' is empty; choose another split.")
  stop = n if n >= 0 else total
  return Samples(np.concatenate(images)[:stop], np.concatenate(labels)[:stop].astype(np.int64),
                 f"the split '{split}' of '{data.name}'")


def _stored(workdir: str, kind: str, data: ml_collections.ConfigDict,
            shape: tuple[int, int, int]) -> Samples | None:
  """The run directory's stored ``kind`` ('eval' or 'train') samples at the input shape, if any."""
  stored = run_directory.read_samples(workdir)
  if not stored or stored.get(f'{kind}_images') is None or not len(stored[f'{kind}_images']):
    return None
  images = np.asarray(stored[f'{kind}_images'], np.uint8)
  if images.shape[1:] != shape:  # stored before eval preprocessing
    from imgcls_jax.data import pp
    op = pp.numpy_op(data.eval_preprocess or '')
    images = np.stack([op(x) for x in images]) if op is not None else images
    if images.shape[1:] != shape:
      logging.warning('Samples stored in %s are %s, not the model input %s; not used.', workdir,
                      images.shape[1:], shape)
      return None
  labels = stored.get(f'{kind}_labels')
  return Samples(images, None if labels is None else np.asarray(labels, np.int64),
                 f'{len(images)} {kind} images stored in the run directory')


def eval_samples(data: ml_collections.ConfigDict, workdir: str, shape: tuple[int, int, int],
                 n: int, seed: int = 0) -> Samples:
  """``n`` (all when < 0) eval images: the eval split, else stored samples, else synthetic."""
  try:
    return read_split(data, data.eval_split, n)
  except UserError as e:
    reason = str(e)
  logging.warning('The eval split is not readable (%s); verifying on the run directory alone.',
                  reason)
  stored = _stored(workdir, 'eval', data, shape)
  if stored is not None:
    stop = len(stored.images) if n < 0 else n
    return Samples(stored.images[:stop], None if stored.labels is None else stored.labels[:stop],
                   stored.source + ' (the dataset is not readable)')
  count = n if n > 0 else 256
  images = np.random.default_rng(seed).integers(0, 256, (count, *shape), dtype=np.uint8)
  return Samples(images, None, f'{count} synthetic images (seed {seed}; the dataset is not '
                 'readable and the run directory stores no samples): agreement only, no accuracy')


def calibration_images(data: ml_collections.ConfigDict, workdir: str,
                       shape: tuple[int, int, int], n: int) -> Samples:
  """``n`` training images for int8 calibration: the train split, else the stored samples."""
  try:
    return read_split(data, data.train_split, n)
  except UserError as e:
    reason = str(e)
  stored = _stored(workdir, 'train', data, shape)
  if stored is None:
    raise UserError(f'int8 quantisation needs training images for calibration, but the train '
                    f'split is not readable ({reason.rstrip(".")}) and the run directory stores '
                    'none; make the dataset available (config.data.*) or export with '
                    "--config.export.quantize=float16 or ''.")
  return Samples(stored.images[:n], None, stored.source)
