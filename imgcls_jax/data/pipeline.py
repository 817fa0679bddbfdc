"""tfds -> tf.data pipelines for training and exact-once evaluation.

Training order is a pure function of ``(seed, step)``: epoch ``e`` is the split shuffled with seed
``(seed, e)``; each example's augmentation seed is ``(seed, e, position)``. So a run resumed at step
``s`` rebuilds the stream from step ``s`` (no iterator state to save) and sees exactly the batches an
uninterrupted run would.

The global batch is defined once, independently of the number of processes: the split is cut into
``data.read_shards`` equal slices (default 1), each shuffled on its own and feeding a fixed block of
rows of every global batch. A process builds only its own rows of each global batch (the rows its
devices hold) and reads only the slices those rows come from. So 1 process x 4 devices and 2
processes x 2 devices train on identical global batches; with ``read_shards`` a multiple of the
process count, each process also reads only its own ``1/process_count`` of the files.

Evaluation covers every example of a split exactly once: the last partial batch is padded and its
``mask`` marks the real examples.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any, Iterator

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from imgcls_jax.data import digits as _digits  # noqa: F401  (registers sklearn_digits)
from imgcls_jax.data import image_folder, ops, prepare_fashion_mnist
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
    if manual_dir is None and data.name in LOCAL_SOURCES:
      manual_dir = LOCAL_SOURCES[data.name](b)
    try:
      b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    except Exception as e:  # tfds raises many types (network, checksum, manual-dir) here.
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise UserError(
          f"Dataset '{data.name}' is not prepared in {b.data_dir} and preparing it failed "
          f"({type(e).__name__}: {first[:300]}); prepare it first (see README) or point "
          "config.data.data_dir / config.data.manual_dir at the files.") from None
  return b


def _local_fashion_mnist(b: tfds.core.DatasetBuilder) -> str | None:
  """Debian's Fashion-MNIST files as a tfds manual_dir, when they are installed."""
  if not os.path.isdir(prepare_fashion_mnist.DEBIAN_DIR):
    return None
  manual_dir = os.path.join(os.path.dirname(os.path.dirname(str(b.data_dir))), 'downloads',
                            'manual', 'fashion_mnist')
  prepare_fashion_mnist.write_manual_dir(prepare_fashion_mnist.DEBIAN_DIR, manual_dir)
  return manual_dir


# tfds name -> function giving a manual_dir of local files that prepares it (None: none here).
LOCAL_SOURCES = {'fashion_mnist': _local_fashion_mnist}


def supervised_keys(b: tfds.core.DatasetBuilder, name: str) -> tuple[str, str]:
  """(image feature, label feature): tfds's supervised_keys when they name an Image and a
  ClassLabel, else ('image', 'label')."""
  features = b.info.features
  keys = b.info.supervised_keys
  if not (isinstance(keys, tuple) and len(keys) == 2 and all(isinstance(k, str) for k in keys)):
    keys = ('image', 'label')
  image, label = keys
  if (image not in features or label not in features
      or not isinstance(features[image], tfds.features.Image)
      or not isinstance(features[label], tfds.features.ClassLabel)):
    raise UserError(f"Dataset '{name}' has no image feature with a class label (features: "
                    f"{', '.join(features.keys())}); it is not an image classification dataset.")
  return image, label


def _folder_info(data: ml_collections.ConfigDict) -> DatasetInfo:
  root = image_folder.root_of(data)
  names = image_folder.class_names(root, data.train_split)
  train = image_folder.scan(root, data.train_split, names)
  sizes: dict[str, int | None] = {}
  for split in (data.train_split, data.eval_split):
    sizes[split] = len(image_folder.scan(root, split, names))
  return DatasetInfo(name=f'{image_folder.NAME}:{root}', num_classes=len(names), class_names=names,
                     channels=image_folder.channels(train), num_examples=sizes)


def info(data: ml_collections.ConfigDict) -> DatasetInfo:
  """Class count, class names, channels and split sizes of ``data.name``."""
  if image_folder.is_folder(data):
    return _folder_info(data)
  b = builder(data)
  features = b.info.features
  image_key, label_key = supervised_keys(b, data.name)
  label = features[label_key]
  sizes: dict[str, int | None] = {}
  for split in (data.train_split, data.eval_split):
    try:
      sizes[split] = int(b.info.splits[split].num_examples)
    except (KeyError, ValueError, TypeError):
      sizes[split] = None  # mock_data leaves info.splits empty.
  channels = features[image_key].shape[-1] or 3
  return DatasetInfo(name=data.name, num_classes=int(label.num_classes),
                     class_names=tuple(label.names), channels=int(channels), num_examples=sizes)


def check_split(b: tfds.core.DatasetBuilder, split: str, name: str) -> None:
  known = list(b.info.splits.keys())
  base = split.split('[')[0].split('+')[0]
  if known and base not in known:
    raise UserError(f"Split '{split}' does not exist in dataset '{name}'; its splits are: "
                    f"{', '.join(sorted(known))}.")


def _selector(image_key: str, label_key: str) -> Any:
  def select(example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    return {'image': example[image_key], 'label': tf.cast(example[label_key], tf.int32)}
  return select


def _folder_read(data: ml_collections.ConfigDict, split: str, process_index: int,
                 process_count: int, drop_remainder: bool, decode: bool) -> tf.data.Dataset:
  root = image_folder.root_of(data)
  names = image_folder.class_names(root, data.train_split)
  channels = image_folder.channels(image_folder.scan(root, data.train_split, names))
  return image_folder.dataset(image_folder.scan(root, split, names), channels,
                              process_index=process_index, process_count=process_count,
                              drop_remainder=drop_remainder, decode=decode)


def _only_ids(ids_file: str) -> Any:
  """Predicate keeping the examples whose tfds id is listed (one per line) in ``ids_file``."""
  try:
    with tf.io.gfile.GFile(ids_file) as f:
      ids = [line.strip() for line in f if line.strip()]
  except tf.errors.NotFoundError:
    ids = []
  if not ids:
    raise UserError(f"The example-id file '{ids_file}' (split '...@{ids_file}') is missing or "
                    'empty; give a file of tfds ids, one per line (see imgcls_jax/data/folds.py).')
  table = tf.lookup.StaticHashTable(
      tf.lookup.KeyValueTensorInitializer(tf.constant(ids), tf.ones([len(ids)], tf.int32)), 0)
  return lambda ex: table.lookup(ex['tfds_id']) > 0


def _read(data: ml_collections.ConfigDict, split: str, process_index: int, process_count: int,
          drop_remainder: bool, decode: bool = True) -> tf.data.Dataset:
  """This process's part of ``split`` as ``{'image': uint8 HxWxC, 'label': int32}``, in a fixed
  order (a tfds dataset, or an image folder when ``data.name == 'image_folder'``). With
  ``decode=False`` 'image' holds the encoded bytes (decoded later, fused with cropping)."""
  # 'SPLIT@IDS_FILE' reads only the examples of SPLIT whose tfds ids IDS_FILE lists, in their
  # usual order (cross-validation folds: imgcls_jax/data/folds.py).
  split, ids_file = split.split('@', 1) if '@' in split else (split, None)
  if image_folder.is_folder(data):  # its examples always carry 'tfds_id' (the relative path)
    ds = _folder_read(data, split, process_index, process_count, drop_remainder, decode)
    keys = ('image', 'label')
  else:
    b = builder(data)
    check_split(b, split, data.name)
    keys = supervised_keys(b, data.name)
    subsplit = tfds.even_splits(split, n=process_count,
                                drop_remainder=drop_remainder)[process_index]
    ds = b.as_dataset(split=subsplit, shuffle_files=False,
                      read_config=tfds.ReadConfig(try_autocache=False, shuffle_seed=0,
                                                  add_tfds_id=ids_file is not None),
                      decoders=None if decode else {keys[0]: tfds.decode.SkipDecoding()})
  if ids_file is not None:
    ds = ds.filter(_only_ids(ids_file))
  ds = ds.map(_selector(*keys), num_parallel_calls=tf.data.AUTOTUNE)
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


def read_shards(data: ml_collections.ConfigDict) -> int:
  """``data.read_shards`` (absent = 1): slices of the split that the training stream reads."""
  shards = data.get('read_shards', 1)
  shards = 1 if shards is None else int(shards)
  if shards < 1:
    raise UserError(f'config.data.read_shards={shards} must be >= 1.')
  return shards


def examples_per_process(data: ml_collections.ConfigDict, split: str, process_index: int,
                         process_count: int) -> int:
  """Training examples this process sees per epoch: an equal share of the global epoch.

  The global epoch is ``read_shards`` equal slices of the split (any remainder is dropped), so
  ``examples_per_process // local_batch`` (steps per epoch) does not depend on the process count.
  """
  shards = read_shards(data)
  size = info(data).num_examples.get(split)
  per_shard = (size // shards if size is not None else
               count(_read(data, split, 0, shards, drop_remainder=True)))
  return per_shard * shards // process_count


def check_flip(data: ml_collections.ConfigDict) -> None:
  device = data.get('device_preprocess', '') or ''
  if device not in ('', 'flip_lr'):
    raise UserError(f"config.data.device_preprocess='{device}' is not a device-side op; use '' or "
                    "'flip_lr' (other augmentations go in config.data.train_preprocess).")
  for key, spec in (('train_preprocess', data.train_preprocess or ''), ('device_preprocess', device)):
    if data.name in NO_FLIP_DATASETS and 'flip_lr' in spec:
      raise UserError(f"Horizontal flips change the meaning of '{data.name}' images; remove "
                      f'flip_lr from config.data.{key}.')


def check_tta(data: ml_collections.ConfigDict, tta: str) -> None:
  """``config.evaluate.tta`` is a known mode, and flips only datasets whose meaning survives them."""
  if tta not in ('', 'flip'):
    raise UserError(f"config.evaluate.tta='{tta}' must be '' (none) or 'flip'.")
  if tta == 'flip' and data.name in NO_FLIP_DATASETS:
    raise UserError(f"Horizontal flips change the meaning of '{data.name}' images; leave "
                    'config.evaluate.tta empty for this dataset.')


def train_dataset(data: ml_collections.ConfigDict, *, seed: int, local_batch_size: int,
                  start_step: int = 0, process_index: int = 0,
                  process_count: int = 1) -> tuple[tf.data.Dataset, int]:
  """The endless training stream from ``start_step`` on, and the process's examples per epoch.

  Yields ``{'image': uint8 BxHxWxC, 'label': int32 B}`` with B = ``local_batch_size``: rows
  ``[process_index * B, (process_index + 1) * B)`` of each global batch of
  ``B * process_count`` rows, which is the same whatever ``process_count`` is.
  """
  check_flip(data)
  global_batch = local_batch_size * process_count
  shards = read_shards(data)
  if global_batch % shards or (shards % process_count and process_count % shards):
    raise UserError(
        f'config.data.read_shards={shards} must divide the global batch ({global_batch}) and '
        f'divide or be a multiple of the process count ({process_count}); e.g. set it to '
        f'{process_count}.')
  if shards < process_count and not data.cache:
    logging.warning('Each of the %d processes reads 1/%d of the training split to build its '
                    '1/%d of every batch; set config.data.read_shards=%d (or a multiple) so each '
                    'reads only its own part.', process_count, shards, process_count,
                    process_count)
  chunk = global_batch // shards  # rows of every global batch that come from one slice
  lo, hi = process_index * local_batch_size, (process_index + 1) * local_batch_size
  # Without a cache, images are decoded in the stream; a leading random_resized_crop then fuses
  # with decoding (JPEGs decode only the crop window): the same crops, less work.
  fuse = not data.cache and ops.fuses_with_decoding(data.train_preprocess)
  augment = (ops.compose(data.train_preprocess,
                         decode_channels=info(data).channels if fuse else None)
             if data.train_preprocess or fuse else None)
  parts, per_epoch = [], 0
  for shard in range(lo // chunk, (hi - 1) // chunk + 1):
    rows = (max(lo, shard * chunk) - shard * chunk, min(hi, (shard + 1) * chunk) - shard * chunk)
    part, n = _slice_stream(data, augment, decode=not fuse, seed=int(seed), shard=shard,
                            shards=shards, chunk=chunk, rows=rows, start_step=start_step)
    parts.append(part)
    per_epoch = n * shards // process_count
  if len(parts) == 1:
    ds = parts[0]
  else:
    ds = tf.data.Dataset.zip(tuple(parts)).map(
        lambda *bs: {k: tf.concat([b[k] for b in bs], 0) for k in bs[0]})
  ds = ds.prefetch(data.prefetch)
  return ds.with_options(_options()), per_epoch


def _slice_stream(data: ml_collections.ConfigDict, augment: Any, *, decode: bool, seed: int,
                  shard: int, shards: int, chunk: int, rows: tuple[int, int],
                  start_step: int) -> tuple[tf.data.Dataset, int]:
  """Rows ``[rows[0], rows[1])`` of slice ``shard``'s ``chunk`` of each global batch, batched."""
  base = _read(data, data.train_split, shard, shards, drop_remainder=True, decode=decode)
  n = count(base)
  if n < chunk:
    raise UserError(f'The training split has {n * shards} examples, fewer than the global batch '
                    f'of {chunk * shards}; lower config.batch_size.')
  buffer = int(max(1, min(n, data.shuffle_buffer // shards)))

  def epoch(e):
    d = base.shuffle(buffer, seed=(tf.cast(seed * 1_000_003, tf.int64) + e) * shards + shard,
                     reshuffle_each_iteration=False)
    return d.enumerate().map(lambda i, ex: (e, i, ex))

  start_epoch, offset = divmod(start_step * chunk, n)
  ds = tf.data.Dataset.range(start_epoch, 2**62).flat_map(epoch).skip(offset)
  first, last = rows
  if (first, last) != (0, chunk):  # keep only this process's rows before any augmentation work
    def mine(j, _):
      return tf.logical_and(j % chunk >= first, j % chunk < last)

    def drop_index(_, item):
      return item

    ds = ds.enumerate().filter(mine).map(drop_index)

  if augment is None:  # nothing to do per example: batch first, then drop the indices per batch
    check_fixed_size(ds.map(lambda e, i, ex: ex), data, 'train_preprocess')
    ds = ds.batch(last - first, drop_remainder=True).map(
        lambda e, i, ex: {'image': ex['image'], 'label': ex['label']})
    return ds, n

  def preprocess(e, i, ex):
    ex_seed = tf.stack([tf.cast(seed, tf.int64), (e * n + i) * shards + shard])
    return {'image': augment(ex['image'], ex_seed), 'label': ex['label']}

  ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  check_fixed_size(ds, data, 'train_preprocess')
  return ds.batch(last - first, drop_remainder=True), n


def check_fixed_size(ds: tf.data.Dataset, data: ml_collections.ConfigDict, key: str) -> None:
  """Batching needs one image size: a preprocessing spec must end images at a fixed size."""
  shape = ds.element_spec['image'].shape
  if not shape.is_fully_defined():
    raise UserError(f"Images of '{data.name}' differ in size after config.data.{key}="
                    f"'{data.get(key)}'; add an op that fixes the size, e.g. "
                    "'random_resized_crop(size=224)' for training or 'center_crop(size=224)' / "
                    "'resize(size=224)' for evaluation.")


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
    check_fixed_size(ds, data, 'eval_preprocess')
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
