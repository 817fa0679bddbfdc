"""Where examples come from: tfds datasets (prepared locally when needed) and image folders.

``describe`` gives the one complete ``DatasetInfo`` of ``config.data``; ``read`` gives this
process's part of a split as ``{'image': uint8 HxWxC, 'label': int32}`` in a fixed order, for the
streams of ``pipeline.py`` to shuffle, augment and batch.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Callable

import ml_collections
import numpy as np
import requests

from imgcls_jax.data.tf_import import tf  # before tensorflow_datasets: no Keras
import tensorflow_datasets as tfds

from imgcls_jax.data import digits as _digits  # noqa: F401  (registers sklearn_digits)
from imgcls_jax.data import (download, folder_index, folder_layout, image_folder,
                             prepare_fashion_mnist)
from imgcls_jax.data.info import ARRAYS_PREFIX, DatasetInfo, flips_allowed
from imgcls_jax.errors import UserError, first_line


def _hide_gpus_from_tf() -> None:
  try:  # TF must never grab accelerator memory that JAX needs.
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:
    pass


def builder(data: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """The prepared tfds builder for ``data.name`` (prepares it locally when needed)."""
  if str(data.name).startswith(ARRAYS_PREFIX):  # data/arrays.py reads those
    raise UserError(f"config.data.name='{data.name}' is an arrays file, and this reads tfds "
                    'datasets and image folders only (cross-validation folds, host '
                    "preprocessing); point config.data.name at one (e.g. 'fashion_mnist').")
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
    offline = download.unreachable_host(b)  # offline, tfds would retry each download for ~3.5 minutes
    try:
      with download.one_attempt_each() if offline else contextlib.nullcontext():
        b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    except Exception as e:  # tfds raises many types (network, checksum, manual-dir) here.
      if offline and isinstance(e, requests.ConnectionError):
        raise UserError(f"Dataset '{data.name}' is not prepared in {b.data_dir} and must be "
                        f'downloaded, but {offline} cannot be reached; connect to the network (or '
                        'set HTTPS_PROXY), or point config.data.manual_dir at its downloaded files '
                        'or config.data.data_dir at a copy prepared elsewhere.') from None
      raise UserError(
          f"Dataset '{data.name}' is not prepared in {b.data_dir} and preparing it failed "
          f"({first_line(e, limit=300)}); prepare it first (see README) or point "
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
LOCAL_SOURCES: dict[str, Callable[[tfds.core.DatasetBuilder], str | None]] = {
    'fashion_mnist': _local_fashion_mnist}


def _tag_sequence(feature: Any) -> Any:
  """The ClassLabel inside a ``Sequence(ClassLabel)`` feature (a multi-label one), else None."""
  inner = getattr(feature, 'feature', None)
  return inner if (isinstance(feature, tfds.features.Sequence)
                   and isinstance(inner, tfds.features.ClassLabel)) else None


def supervised_keys(b: tfds.core.DatasetBuilder, name: str,
                    multilabel: bool = False) -> tuple[str, str]:
  """(image feature, label feature): tfds's supervised_keys when they name an Image and a
  ClassLabel (``multilabel``: a sequence of ClassLabels, e.g. ``labels``), else ('image',
  'label') / ('image', 'labels')."""
  features = b.info.features
  keys = b.info.supervised_keys
  if not (isinstance(keys, tuple) and len(keys) == 2 and all(isinstance(k, str) for k in keys)):
    keys = ('image', 'labels' if multilabel and 'labels' in features else 'label')
  image, label = keys
  if multilabel and (label not in features or _tag_sequence(features[label]) is None):
    tagged = [k for k, f in features.items() if _tag_sequence(f) is not None]
    if tagged:
      label = tagged[0]
  listed = ', '.join(features.keys())
  if image not in features or not isinstance(features[image], tfds.features.Image):
    raise UserError(f"Dataset '{name}' has no image feature '{image}' (features: {listed}); it is "
                    'not an image classification dataset.')
  if multilabel and (label not in features or _tag_sequence(features[label]) is None):
    raise UserError(f"config.data.multilabel=True but dataset '{name}' has no label feature that "
                    f'is a sequence of class labels (features: {listed}); set '
                    'config.data.multilabel=False.')
  if not multilabel and (label not in features
                         or not isinstance(features[label], tfds.features.ClassLabel)):
    if any(_tag_sequence(f) is not None for f in features.values()):
      raise UserError(f"Dataset '{name}' labels each image with a sequence of classes (features: "
                      f'{listed}): it is multi-label; set config.data.multilabel=True.')
    raise UserError(f"Dataset '{name}' has no image feature with a class label (features: "
                    f'{listed}); it is not an image classification dataset.')
  return image, label


def label_feature(b: tfds.core.DatasetBuilder, label_key: str) -> Any:
  """The ClassLabel of ``label_key`` (of its sequence, for a multi-label feature)."""
  feature = b.info.features[label_key]
  return _tag_sequence(feature) or feature


def check_split(b: tfds.core.DatasetBuilder, split: str, name: str, key: str = '') -> None:
  """Raises UserError when ``split`` names no split of the dataset, does not parse or selects no
  examples; ``key`` (e.g. 'data.eval_split') is the config key it came from, named if given."""
  known = list(b.info.splits.keys())
  if not known:
    return  # mock_data leaves info.splits empty.
  base = split.split('[')[0].split('+')[0]
  if base not in known:
    fix = f'set config.{key} to one of its splits:' if key else 'its splits are:'
    raise UserError(f"Split '{split}' does not exist in dataset '{name}'; {fix} "
                    f"{', '.join(sorted(known))}.")
  given = f"config.{key}='{split}'" if key else f"Split '{split}'"
  try:
    n = int(b.info.splits[split].num_examples)
  except (KeyError, ValueError) as e:
    why = str(e).strip().splitlines()[-1].split('. See format')[0].rstrip('.') if str(e) else ''
    raise UserError(f"{given} is not a valid split of dataset '{name}' ({why}); write NAME, "
                    "NAME[START:END] or NAME[A%:B%], parts joined by '+' (e.g. 'train[:80%]'), "
                    f'with NAME one of {", ".join(sorted(known))}.') from None
  if n <= 0:
    sizes = ', '.join(f'{k} has {b.info.splits[k].num_examples}' for k in sorted(known))
    raise UserError(f"{given} selects no examples of dataset '{name}' ({sizes}); give a slice "
                    f"with examples, e.g. '{base}' or '{base}[:50%]'.")


def _split_key(data: ml_collections.ConfigDict, split: str) -> str:
  """'data.train_split' / 'data.eval_split' when ``split`` is that key's split, else ''."""
  for key in ('train_split', 'eval_split'):
    if split == (data.get(key) or '').split('@')[0]:
      return f'data.{key}'
  return ''


def _describe_folder(data: ml_collections.ConfigDict) -> DatasetInfo:
  src = folder_layout.source_of(data)
  names = folder_layout.class_names(src)
  specs = (data.train_split, data.eval_split)
  splits = [folder_index.index(src, spec.split('@')[0], names) for spec in specs]
  channels = image_folder.channels(splits[0])  # decided by the training split
  sizes, digests = {}, {}
  for spec, s in zip(specs, splits):
    # 'SPLIT@IDS_FILE' (a cross-validation fold): the listed images of SPLIT.
    sizes[spec] = len(s) if '@' not in spec else len(set(s.ids) & set(_ids(spec.split('@', 1)[1])))
    if '@' not in spec:
      digests[spec] = s.digest
  return DatasetInfo(name=dataset_name(data), num_classes=len(names),
                     class_names=names, image_shape=image_folder.image_shape(splits, channels),
                     num_examples=sizes, mirror_safe=flips_allowed(data),
                     multilabel=src.multilabel, split_digests=digests)


def describe(data: ml_collections.ConfigDict) -> DatasetInfo:
  """Classes, decoded image shape, split sizes and flip safety of ``config.data``."""
  if image_folder.is_folder(data):
    return _describe_folder(data)
  b = builder(data)
  features = b.info.features
  multilabel = bool(data.get('multilabel', False))
  image_key, label_key = supervised_keys(b, data.name, multilabel)
  label = label_feature(b, label_key)
  if not multilabel and int(label.num_classes) < 2:
    has = f'only one class, {label.names[0]}' if label.num_classes == 1 else 'no class'
    raise UserError(f"Dataset '{data.name}' has {has} (label feature '{label_key}'); a classifier "
                    'needs at least 2 classes: set config.data.name to a dataset with 2 or more.')
  sizes: dict[str, int | None] = {}
  for key in ('train_split', 'eval_split'):
    split = data[key]
    check_split(b, split.split('@')[0], data.name, f'data.{key}')
    try:
      sizes[split] = int(b.info.splits[split].num_examples)
    except (KeyError, ValueError, TypeError):
      sizes[split] = None  # mock_data leaves info.splits empty.
  shape = features[image_key].shape
  h, w = (None if d is None else int(d) for d in shape[:2])
  return DatasetInfo(name=data.name, num_classes=int(label.num_classes),
                     class_names=tuple(label.names), image_shape=(h, w, int(shape[-1] or 3)),
                     num_examples=sizes, mirror_safe=flips_allowed(data),
                     multilabel=multilabel)


def dataset_name(data: ml_collections.ConfigDict) -> str:
  """``data.name``, or ``image_folder:<folder or manifest>`` for the user's images."""
  if image_folder.is_folder(data):
    return f'{image_folder.NAME}:{folder_layout.source_of(data).location}'
  return data.name


def default_eval_split(data: ml_collections.ConfigDict) -> str:
  """The split to evaluate a model on when ``data`` points at new images: ``data.eval_split``,
  except for an image folder without split directories (or a manifest without a split column),
  where it is every image (``'all'``)."""
  if image_folder.is_folder(data) and not folder_layout.has_splits(folder_layout.source_of(data)):
    return folder_layout.ALL
  return data.eval_split


def split_size(data: ml_collections.ConfigDict, split: str,
               info: DatasetInfo | None = None) -> int | None:
  """Examples in ``split`` of ``data`` (None when the dataset does not say), with ``info`` (a
  trained run's) fixing an image folder's classes."""
  if image_folder.is_folder(data):
    src = folder_layout.source_of(data)
    names = info.class_names if info is not None else folder_layout.class_names(src)
    base, _, ids_file = split.partition('@')
    indexed = folder_index.index(src, base, names)
    return len(indexed) if not ids_file else len(set(indexed.ids) & set(_ids(ids_file)))
  if '@' in split:
    return None
  try:
    return int(builder(data).info.splits[split].num_examples)
  except (KeyError, ValueError, TypeError):
    return None


def class_counts(data: ml_collections.ConfigDict, split: str, num_classes: int) -> np.ndarray:
  """Examples per class in ``split`` (int64, length ``num_classes``; multi-label: examples tagged
  with each class); reads labels only."""
  if image_folder.is_folder(data) and '@' not in split:
    src = folder_layout.source_of(data)
    return np.asarray(folder_index.index(src, split, folder_layout.class_names(src)).counts,
                      np.int64)
  ds = read(data, split, 0, 1, drop_remainder=False, decode=not can_defer_decoding(data))
  counts = np.zeros(num_classes, np.int64)
  for labels in ds.map(lambda ex: ex['label']).batch(4096).as_numpy_iterator():
    if labels.ndim == 2:  # multi-hot rows
      counts += labels.astype(np.int64).sum(axis=0)[:num_classes]
    else:
      counts += np.bincount(labels, minlength=num_classes)[:num_classes]
  return counts


def _selector(image_key: str, label_key: str, tags: int = 0) -> Any:
  """Example -> ``{'image', 'label'}``; with ``tags`` = K (a tfds sequence of class labels), the
  label becomes a uint8 multi-hot row of width K."""
  def select(example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    label = example[label_key]
    if tags:
      hot = tf.reduce_sum(tf.one_hot(tf.reshape(label, [-1]), tags, dtype=tf.int32), axis=0)
      label = tf.ensure_shape(tf.cast(tf.minimum(hot, 1), tf.uint8), [tags])   # none: all 0
    else:
      label = tf.cast(label, tf.int32)
    out = {'image': example[image_key], 'label': label}
    if 'valid' in example:  # image folders: False where a file failed to decode
      out['valid'] = example['valid']
    return out
  return select


def _read_folder(data: ml_collections.ConfigDict, split: str, process_index: int,
                 process_count: int, drop_remainder: bool, info: DatasetInfo | None,
                 decode: bool = True) -> tf.data.Dataset:
  indexed, channels = _folder_split(data, split, info)
  return image_folder.dataset(indexed, channels, process_index=process_index,
                              process_count=process_count, drop_remainder=drop_remainder,
                              decode=decode)


def _folder_split(data: ml_collections.ConfigDict, split: str, info: DatasetInfo | None
                  ) -> tuple[folder_index.Split, int]:
  """The index of ``split`` and the channel count to decode to (``info``: a trained model's
  classes and channels, whatever this folder holds)."""
  src = folder_layout.source_of(data)
  if info is not None:
    names, channels = info.class_names, info.channels
  else:
    names = folder_layout.class_names(src)
    channels = image_folder.channels(folder_index.index(src, data.train_split.split('@')[0],
                                                        names))
  return folder_index.index(src, split.split('@')[0], names), channels


def size_examples(data: ml_collections.ConfigDict, split: str, info: DatasetInfo | None) -> str:
  """An image folder's example file of each image size of ``split``, for a message ('' else)."""
  folder = image_folder.is_folder(data)
  return image_folder.size_examples(_folder_split(data, split, info)[0]) if folder else ''


def path_decoder(data: ml_collections.ConfigDict, split: str) -> Any:
  """For an image folder read with ``decode=False`` (file paths, cheap to shuffle): the tf.data
  map that decodes them (adding ``'valid'``); None for tfds datasets."""
  if not image_folder.is_folder(data):
    return None
  return image_folder.decoder(*_folder_split(data, split, None))


def _ids(ids_file: str) -> list[str]:
  """The example ids listed (one per line) in ``ids_file``."""
  try:
    with tf.io.gfile.GFile(ids_file) as f:
      ids = [line.strip() for line in f if line.strip()]
  except tf.errors.NotFoundError:
    ids = []
  if not ids:
    raise UserError(f"The example-id file '{ids_file}' (split '...@{ids_file}') is missing or "
                    'empty; give a file of tfds ids, one per line (see imgcls_jax/data/folds.py).')
  return ids


def _only_ids(ids_file: str) -> Any:
  """Predicate keeping the examples whose tfds id is listed (one per line) in ``ids_file``."""
  ids = _ids(ids_file)
  table = tf.lookup.StaticHashTable(
      tf.lookup.KeyValueTensorInitializer(tf.constant(ids), tf.ones([len(ids)], tf.int32)), 0)
  return lambda ex: table.lookup(ex['tfds_id']) > 0


def can_defer_decoding(data: ml_collections.ConfigDict) -> bool:
  """True when ``read(..., decode=False)`` gives encoded bytes (tfds); image folders give file
  paths instead (decoded by PIL, EXIF orientation applied, through ``path_decoder``), so their
  crops never fuse with decoding."""
  return not image_folder.is_folder(data)


def read(data: ml_collections.ConfigDict, split: str, process_index: int, process_count: int,
         drop_remainder: bool, decode: bool = True,
         info: DatasetInfo | None = None) -> tf.data.Dataset:
  """This process's part of ``split`` as ``{'image': uint8 HxWxC, 'label': int32}`` (image
  folders add ``'valid'``: False for a file that failed to decode), in a fixed order. With
  ``decode=False`` 'image' holds the encoded bytes (tfds: decoded later, fused with cropping) or
  the file path (image folders: see ``path_decoder``). ``info`` (a trained run's) fixes an image folder's class names and
  channels, e.g. to evaluate a model on a second folder."""
  # 'SPLIT@IDS_FILE' reads only the examples of SPLIT whose tfds ids IDS_FILE lists, in their
  # usual order (cross-validation folds: imgcls_jax/data/folds.py).
  split, ids_file = split.split('@', 1) if '@' in split else (split, None)
  if image_folder.is_folder(data):  # its examples always carry 'tfds_id' (the relative path)
    ds = _read_folder(data, split, process_index, process_count, drop_remainder, info, decode)
    keys, tags = ('image', 'label'), 0
  else:
    b = builder(data)
    check_split(b, split, data.name, _split_key(data, split))
    multilabel = bool(data.get('multilabel', False))
    keys = supervised_keys(b, data.name, multilabel)
    tags = int(label_feature(b, keys[1]).num_classes) if multilabel else 0
    subsplit = tfds.even_splits(split, n=process_count,
                                drop_remainder=drop_remainder)[process_index]
    ds = b.as_dataset(split=subsplit, shuffle_files=False,
                      read_config=tfds.ReadConfig(try_autocache=False, shuffle_seed=0,
                                                  add_tfds_id=ids_file is not None),
                      decoders=None if decode else {keys[0]: tfds.decode.SkipDecoding()})
  if ids_file is not None:
    ds = ds.filter(_only_ids(ids_file))
  ds = ds.map(_selector(*keys, tags), num_parallel_calls=tf.data.AUTOTUNE)
  return ds.cache() if data.cache else ds


def example_ids(data: ml_collections.ConfigDict, split: str,
                info: DatasetInfo | None = None) -> list[str]:
  """The ids of ``split``'s examples in the order one process reads them (``read``): an image
  folder's paths relative to the folder or manifest, a tfds dataset's tfds ids. Decodes nothing."""
  base, _, ids_file = split.partition('@')
  if image_folder.is_folder(data):
    ids = list(_folder_split(data, base, info)[0].ids)
  else:
    b = builder(data)
    check_split(b, base, data.name, _split_key(data, base))
    image_key, _ = supervised_keys(b, data.name, bool(data.get('multilabel', False)))
    ds = b.as_dataset(split=tfds.even_splits(base, n=1, drop_remainder=False)[0],
                      shuffle_files=False,
                      read_config=tfds.ReadConfig(try_autocache=False, shuffle_seed=0,
                                                  add_tfds_id=True),
                      decoders={image_key: tfds.decode.SkipDecoding()})
    ids = [i.decode() for i in tfds.as_numpy(ds.map(lambda ex: ex['tfds_id']))]
  if ids_file:
    listed = set(_ids(ids_file))
    ids = [i for i in ids if i in listed]
  return ids


def count(ds: tf.data.Dataset) -> int:
  """Number of elements of a finite dataset (iterates it once when its cardinality is unknown)."""
  n = int(ds.cardinality())
  if n >= 0:
    return n
  return int(ds.reduce(np.int64(0), lambda c, _: c + 1))
