"""tfds -> tf.data pipelines for training and exact-once evaluation.

Training order is a pure function of ``(seed, step)``: epoch ``e`` is the process's slice of the
split shuffled with seed ``(seed, e)``; each example's augmentation seed is ``(seed, e, position)``.
So a run resumed at step ``s`` rebuilds the stream from step ``s`` (no iterator state to save) and
sees exactly the batches an uninterrupted run would.

Evaluation covers every example of a split exactly once: the last partial batch is padded and its
``mask`` marks the real examples.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from imgcls_jax.data import digits as _digits  # noqa: F401  (registers sklearn_digits)
from imgcls_jax.data import ops
from imgcls_jax.errors import UserError

# Datasets whose classes are not mirror-symmetric: a horizontal flip changes the label's meaning.
NO_FLIP_DATASETS = frozenset({'sklearn_digits', 'mnist', 'emnist', 'kmnist', 'svhn_cropped'})

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the rest of the program needs to know about a dataset."""
  name: str
  num_classes: int
  class_names: tuple[str, ...]
  channels: int
  num_examples: dict[str, int | None]  # per split; None where unknown (e.g. under mock_data)


def _hide_gpus_from_tf() -> None:
  try:  # TF must never grab accelerator memory that JAX needs.
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:
    pass


def builder(data: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """The prepared tfds builder for ``data.name`` (prepares it locally when needed)."""
  _hide_gpus_from_tf()
  try:
    b = tfds.builder(data.name, data_dir=data.get('data_dir') or None)
  except tfds.core.registered.DatasetNotFoundError:
    raise UserError(f"Dataset '{data.name}' is not a tfds dataset; set config.data.name to a "
                    "registered name (e.g. sklearn_digits, fashion_mnist, imagenet2012).") from None
  if not b.is_prepared():
    manual_dir = data.get('manual_dir') or None
    try:
      b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    except Exception as e:  # tfds raises many types (network, checksum, manual-dir) here.
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise UserError(
          f"Dataset '{data.name}' is not prepared in {b.data_dir} and preparing it failed "
          f"({type(e).__name__}: {first[:300]}); prepare it first (see README) or point "
          "config.data.data_dir / config.data.manual_dir at the files.") from None
  return b


def info(data: ml_collections.ConfigDict) -> DatasetInfo:
  """Class count, class names, channels and split sizes of ``data.name``."""
  b = builder(data)
  features = b.info.features
  if 'label' not in features or 'image' not in features:
    raise UserError(f"Dataset '{data.name}' has no 'image'/'label' features; it is not an image "
                    'classification dataset.')
  label = features['label']
  sizes: dict[str, int | None] = {}
  for split in (data.train_split, data.eval_split):
    try:
      sizes[split] = int(b.info.splits[split].num_examples)
    except (KeyError, ValueError, TypeError):
      sizes[split] = None  # mock_data leaves info.splits empty.
  channels = features['image'].shape[-1] or 3
  return DatasetInfo(name=data.name, num_classes=int(label.num_classes),
                     class_names=tuple(label.names), channels=int(channels), num_examples=sizes)


def check_split(b: tfds.core.DatasetBuilder, split: str, name: str) -> None:
  known = list(b.info.splits.keys())
  base = split.split('[')[0].split('+')[0]
  if known and base not in known:
    raise UserError(f"Split '{split}' does not exist in dataset '{name}'; its splits are: "
                    f"{', '.join(sorted(known))}.")


def _select(example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
  return {'image': example['image'], 'label': tf.cast(example['label'], tf.int32)}


def _read(data: ml_collections.ConfigDict, split: str, process_index: int, process_count: int,
          drop_remainder: bool) -> tf.data.Dataset:
  b = builder(data)
  check_split(b, split, data.name)
  subsplit = tfds.even_splits(split, n=process_count, drop_remainder=drop_remainder)[process_index]
  ds = b.as_dataset(split=subsplit, shuffle_files=False,
                    read_config=tfds.ReadConfig(try_autocache=False, shuffle_seed=0))
  ds = ds.map(_select, num_parallel_calls=tf.data.AUTOTUNE)
  return ds.cache() if data.cache else ds


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  options.experimental_optimization.map_parallelization = True
  return options


def count(ds: tf.data.Dataset) -> int:
  """Number of elements of a finite dataset (iterates it once when its cardinality is unknown)."""
  n = int(ds.cardinality())
  if n >= 0:
    return n
  return int(ds.reduce(np.int64(0), lambda c, _: c + 1))


def examples_per_process(data: ml_collections.ConfigDict, split: str, process_index: int,
                         process_count: int) -> int:
  """Training examples this process sees per epoch (each process gets an equal share)."""
  size = info(data).num_examples.get(split)
  if size is not None:
    return size // process_count
  return count(_read(data, split, process_index, process_count, drop_remainder=True))


def check_flip(data: ml_collections.ConfigDict) -> None:
  if data.name in NO_FLIP_DATASETS and 'flip_lr' in (data.train_preprocess or ''):
    raise UserError(f"Horizontal flips change the meaning of '{data.name}' images; remove flip_lr "
                    'from config.data.train_preprocess.')


def train_dataset(data: ml_collections.ConfigDict, *, seed: int, local_batch_size: int,
                  start_step: int = 0, process_index: int = 0,
                  process_count: int = 1) -> tuple[tf.data.Dataset, int]:
  """The endless training stream from ``start_step`` on, and the process's examples per epoch.

  Yields ``{'image': uint8 BxHxWxC, 'label': int32 B}`` with B = ``local_batch_size``.
  """
  check_flip(data)
  base = _read(data, data.train_split, process_index, process_count, drop_remainder=True)
  n = count(base)
  if n < local_batch_size:
    raise UserError(f'The training split has {n} examples per process, fewer than the per-process '
                    f'batch of {local_batch_size}; lower config.batch_size.')
  buffer = int(min(n, data.shuffle_buffer))
  augment = ops.compose(data.train_preprocess)
  seed = int(seed)

  def epoch(e):
    d = base.shuffle(buffer, seed=tf.cast(seed * 1_000_003 + e, tf.int64),
                     reshuffle_each_iteration=False)
    return d.enumerate().map(lambda i, ex: (e, i, ex))

  consumed = start_step * local_batch_size
  start_epoch, offset = divmod(consumed, n)
  ds = tf.data.Dataset.range(start_epoch, 2**62).flat_map(epoch).skip(offset)

  def preprocess(e, i, ex):
    ex_seed = tf.stack([tf.cast(seed, tf.int64), e * n + i])
    return {'image': augment(ex['image'], ex_seed), 'label': ex['label']}

  ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(local_batch_size, drop_remainder=True).prefetch(data.prefetch)
  return ds.with_options(_options()), n


class EvalData:
  """One split for evaluation; iterate ``batches()`` each time (cached after the first pass)."""

  def __init__(self, data: ml_collections.ConfigDict, split: str, *, local_batch_size: int,
               process_index: int = 0, process_count: int = 1,
               split_size: int | None = None):
    self.split = split
    self.local_batch_size = local_batch_size
    ds = _read(data, split, process_index, process_count, drop_remainder=False)
    preprocess = ops.compose(data.eval_preprocess)
    seed0 = tf.zeros([2], tf.int64)
    ds = ds.map(lambda ex: {'image': preprocess(ex['image'], seed0), 'label': ex['label']},
                num_parallel_calls=tf.data.AUTOTUNE)
    self._ds = ds.batch(local_batch_size).prefetch(data.prefetch).with_options(_options())
    # Every process must run the same number of eval steps: pad with empty batches up to the
    # largest process's count (known from the split size, when tfds knows it).
    self.num_batches = (math.ceil(math.ceil(split_size / process_count) / local_batch_size)
                        if split_size else None)

  def batches(self) -> Iterator[Batch]:
    """Batches of exactly ``local_batch_size`` with a boolean ``mask`` of real examples."""
    emitted = 0
    template: Batch | None = None
    for batch in tfds.as_numpy(self._ds):
      real = len(batch['label'])
      template = batch
      yield _pad(batch, self.local_batch_size, real)
      emitted += 1
    while self.num_batches is not None and emitted < self.num_batches and template is not None:
      yield _pad(template, self.local_batch_size, 0)
      emitted += 1


def _pad(batch: Batch, size: int, real: int) -> Batch:
  out: dict[str, Any] = {}
  for k, v in batch.items():
    v = v[:real]
    pad = np.zeros((size - real,) + v.shape[1:], v.dtype)
    out[k] = np.concatenate([v, pad]) if real < size else v
  out['mask'] = np.arange(size) < real
  return out
