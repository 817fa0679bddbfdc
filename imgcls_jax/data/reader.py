"""The run layer's one door to a dataset: an arrays file (``data/arrays.py``, numpy only) or a
tf.data source (tfds datasets and image folders: ``sources.py`` / ``pipeline.py``, imported only
when one is used). So training, evaluation and the run directory's samples work where TensorFlow
is not installed, for arrays files.
"""
from __future__ import annotations

import logging
import re
from typing import Any, Iterator

import ml_collections
import numpy as np

from imgcls_jax.data import arrays, folder_layout, resident
from imgcls_jax.data.info import DatasetInfo
from imgcls_jax.errors import UserError

Batch = dict[str, np.ndarray]


def describe(data: ml_collections.ConfigDict) -> DatasetInfo:
  """Classes, decoded image shape, split sizes and flip safety of ``config.data`` (an id-listed
  split whose file lists ids the split lacks: warned of, ``folds.check_listed``)."""
  if arrays.is_arrays(data):
    return arrays.describe(data)
  from imgcls_jax.data import folds, sources
  info = sources.describe(data)
  for key in ('train_split', 'eval_split'):
    folds.check_listed(data, data[key], f'data.{key}', info.class_names)
  return info


def check_preprocess(data: ml_collections.ConfigDict, info: DatasetInfo | None = None) -> None:
  """Raises a UserError for a ``data.train_preprocess`` / ``eval_preprocess`` spec that does not
  parse or has bad arguments, before any work (the streams build their ops later); with the
  dataset's ``info`` and a fixed image size, also for one those images rule out (e.g. a mirror
  pad wider than the image), by running the ops once on a blank image of that size, and a
  warning for random ops in ``eval_preprocess``."""
  if arrays.is_arrays(data):
    arrays.check(data)
    return
  from imgcls_jax.data import pp
  h, w, c = info.image_shape if info is not None else (None, None, 0)
  for key in ('train_preprocess', 'eval_preprocess'):
    spec = data.get(key) or ''
    try:
      pp.parse(spec)
      if spec and h is not None and w is not None:
        pp.output_shape(spec, (h, w), c)
    except UserError as e:
      raise UserError(f'config.data.{key}: {e}') from None
  if data.get('eval_preprocess') and c:
    from imgcls_jax.data.pp import registry
    random = registry.seed_dependent(data.eval_preprocess, c, (h, w))
    if random:
      logging.warning('config.data.eval_preprocess has random ops (%s): evaluation, predict and '
                      'serve apply them at one fixed seed, the same distortion for every run of '
                      'an image; move them to config.data.train_preprocess.', ', '.join(random))


def random_host_ops(data: ml_collections.ConfigDict, info: DatasetInfo) -> list[str]:
  """The ops of ``data.train_preprocess`` whose output changes with the seed (none for arrays,
  which refuse host ops)."""
  if arrays.is_arrays(data) or not data.get('train_preprocess'):
    return []
  from imgcls_jax.data.pp import registry
  return registry.seed_dependent(data.train_preprocess, info.channels, info.image_shape[:2])


def examples_per_process(data: ml_collections.ConfigDict, split: str, process_index: int,
                         process_count: int) -> int:
  """Training examples this process sees per epoch (``pipeline.examples_per_process``)."""
  if arrays.is_arrays(data):
    return arrays.examples_per_process(data, split, process_count)
  from imgcls_jax.data import pipeline
  return pipeline.examples_per_process(data, split, process_index, process_count)


def eval_data(data: ml_collections.ConfigDict, split: str, *, local_batch_size: int,
              process_index: int = 0, process_count: int = 1, split_size: int | None = None,
              info: DatasetInfo | None = None, with_head: bool = False) -> Any:
  """``split`` for evaluation: ``batches()`` (every example once, padded, ``mask``ed),
  ``head_batches(n)``, ``num_batches``, ``split``, ``examples_read`` (this process's examples in
  the last ``batches()`` pass: where the next process's part starts) (``pipeline.EvalData``'s
  interface)."""
  if arrays.is_arrays(data):
    return arrays.EvalData(data, split, local_batch_size=local_batch_size,
                           process_index=process_index, process_count=process_count)
  from imgcls_jax.data import pipeline
  return pipeline.EvalData(data, split, local_batch_size=local_batch_size,
                           process_index=process_index, process_count=process_count,
                           split_size=split_size, info=info, with_head=with_head)


def train_batches(data: ml_collections.ConfigDict, *, seed: int, local_batch_size: int,
                  start_step: int = 0, process_index: int = 0,
                  process_count: int = 1) -> Iterator[Batch]:
  """The endless training stream from ``start_step`` as host batches: this process's rows of
  each global batch, a pure function of ``(seed, step)``."""
  if arrays.is_arrays(data):
    n = arrays.split_size(data, data.train_split)
    return arrays.train_batches(data, resident.Order(arrays.order(seed, n), n).indices,
                                local_batch_size=local_batch_size, start_step=start_step,
                                process_index=process_index, process_count=process_count)
  from imgcls_jax.data import pipeline
  ds, _ = pipeline.train_dataset(data, seed=seed, local_batch_size=local_batch_size,
                                 start_step=start_step, process_index=process_index,
                                 process_count=process_count)
  return ds.as_numpy_iterator()


def resident_split(data: ml_collections.ConfigDict, seed: int, process_count: int
                   ) -> tuple[resident.TrainArrays, resident.Order] | None:
  """With ``config.data.device_resident``: the training split as arrays and the order of the
  stream ``train_batches`` gives, so a resident run trains on exactly its batches; else None."""
  if not resident.enabled(data):
    return None
  resident.check(data, process_count)
  if arrays.is_arrays(data):
    images, labels = arrays.train_split(data)
    split = resident.TrainArrays(images=images, labels=labels)
    resident.check_size(data, split.images.nbytes)
    return split, resident.Order(arrays.order(seed, split.num_examples), split.num_examples)
  split = resident.load(data)
  return split, resident.Order.of_stream(data, seed, split.num_examples)


def samples(data: ml_collections.ConfigDict, info: DatasetInfo, *, eval_count: int = 64,
            train_count: int = 256) -> dict[str, np.ndarray]:
  """The first images (eval-preprocessed, uint8) and labels of the eval and train splits."""
  if arrays.is_arrays(data):
    return arrays.samples(data, eval_count, train_count)
  from imgcls_jax.data import pipeline
  return pipeline.samples(data, info, eval_count=eval_count, train_count=train_count)


def split_size(data: ml_collections.ConfigDict, split: str,
               info: DatasetInfo | None = None) -> int | None:
  """Examples in ``split`` (None when the dataset does not say)."""
  if arrays.is_arrays(data):
    return arrays.split_size(data, split)
  from imgcls_jax.data import sources
  return sources.split_size(data, split, info)


def shared_examples(data: ml_collections.ConfigDict, a: str, b: str,
                    info: DatasetInfo | None = None) -> int | None:
  """How many examples the split specs ``a`` and ``b`` have in common (tfds slice syntax: NAME,
  NAME[lo:hi] with counts or percentages rounded as tfds does, parts joined by '+'; ``all``: every
  split ``info`` names), or an id-listed cross-validation split (``NAME@ids_file``) by its
  example ids (read from the dataset: tfds ids, image paths); None when a spec is of neither
  form, ids are not known (an arrays file) or a size is unknown."""
  def ranges(spec: str) -> list[tuple[str, int, int]] | None:
    out = []
    for part in str(spec).replace(' ', '').split('+'):
      if part == 'all':   # tfds's (and an image folder's) every split
        if info is None or not info.num_examples:
          return None
        out += [(name, 0, int(n)) for name, n in info.num_examples.items() if name != 'all']
        continue
      m = arrays.SLICE.match(part)
      n = split_size(data, m.group(1), info) if m else None
      if n is None:
        return None
      start, stop = arrays.slice_bound(m.group(2), n, 0), arrays.slice_bound(m.group(3), n, n)
      if start is None or stop is None:
        return None
      out.append((m.group(1), start, stop))
    return out

  plain = re.compile(r'\w+$')
  if a != b and all(plain.match(str(x)) and x != 'all' for x in (a, b)):
    return 0   # two whole splits by name: no sizes needed (nor the dataset's reader)
  ra, rb = ranges(a), ranges(b)
  if ra is None or rb is None:
    if '@' in str(a) + str(b) and not arrays.is_arrays(data):   # an id-listed fold: by its ids
      return len(_ids_of(data, str(a), info) & _ids_of(data, str(b), info))
    return None
  return sum(max(0, min(s1, s2) - max(lo1, lo2))
             for n1, lo1, s1 in ra for n2, lo2, s2 in rb if n1 == n2)


_IDS: dict[tuple[str, str], frozenset[str]] = {}   # (the data config, split) -> its example ids


def _ids_of(data: ml_collections.ConfigDict, split: str,
            info: DatasetInfo | None) -> frozenset[str]:
  """``example_ids`` as a set, once per process for each tfds data config and split (the checks
  of a cross-validation fold ask several times; a tfds split's ids take a pass over its
  records)."""
  if folder_layout.is_folder(data):   # files can change: folder_index memoises what it may
    return frozenset(example_ids(data, split, info))
  key = (data.to_json_best_effort(sort_keys=True), split)
  if key not in _IDS:
    _IDS[key] = frozenset(example_ids(data, split, info))
  return _IDS[key]


def example_ids(data: ml_collections.ConfigDict, split: str,
                info: DatasetInfo | None = None) -> list[str]:
  """Ids of ``split``'s examples in evaluation order, one process (``sources.example_ids``: image
  paths, tfds ids); an arrays file's examples have none (an empty list: errors.csv then names
  them by their position in the split)."""
  if arrays.is_arrays(data):
    return []
  from imgcls_jax.data import sources
  return sources.example_ids(data, split, info)


def class_counts(data: ml_collections.ConfigDict, split: str, num_classes: int) -> np.ndarray:
  """Examples per class in ``split`` (int64; multi-label: examples tagged with each class)."""
  if arrays.is_arrays(data):
    return arrays.class_counts(data, split, num_classes)
  from imgcls_jax.data import sources
  return sources.class_counts(data, split, num_classes)


def default_eval_split(data: ml_collections.ConfigDict) -> str:
  """The split to evaluate on when ``data`` points at new images (``sources.default_eval_split``)."""
  if arrays.is_arrays(data):
    return data.eval_split
  from imgcls_jax.data import sources
  return sources.default_eval_split(data)


def dataset_name(data: ml_collections.ConfigDict) -> str:
  """The name reports give the dataset."""
  if arrays.is_arrays(data):
    return arrays.PREFIX + arrays.path_of(data)
  from imgcls_jax.data import sources
  return sources.dataset_name(data)

