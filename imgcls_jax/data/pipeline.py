"""The training and exact-once evaluation streams over ``sources.read``.

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

import itertools
import logging
import math
from typing import Any, Iterator

import ml_collections
import numpy as np

from imgcls_jax.data.tf_import import tf  # before tensorflow_datasets: no Keras
import tensorflow_datasets as tfds

from imgcls_jax.data import folder_layout, info, pp, sources
from imgcls_jax.data import info as info_lib
from imgcls_jax.errors import UserError

Batch = dict[str, np.ndarray]


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  options.experimental_optimization.map_parallelization = True
  # No autotuning thread: deleting an iterator waits for it to wake, up to ~60 s into a long run
  # (seen at the end of training and so on every stop and cross-validation fold: the process sat
  # idle in RootDataset::Iterator::~Iterator). Parallel maps then keep tf.data's default
  # parallelism and the prefetch depth is data.prefetch (folder-pipeline throughput unchanged within
  # noise: benchmarks/NOTES.md).
  options.autotune.enabled = False
  return options


def examples_per_process(data: ml_collections.ConfigDict, split: str, process_index: int,
                         process_count: int) -> int:
  """Training examples this process sees per epoch: an equal share of the global epoch.

  The global epoch is ``read_shards`` equal slices of the split (any remainder is dropped), so
  ``examples_per_process // local_batch`` (steps per epoch) does not depend on the process count.
  """
  shards = info.read_shards(data)
  size = sources.describe(data).num_examples.get(split)
  per_shard = (size // shards if size is not None else
               sources.count(sources.read(data, split, 0, shards, drop_remainder=True)))
  return per_shard * shards // process_count


def train_dataset(data: ml_collections.ConfigDict, *, seed: int, local_batch_size: int,
                  start_step: int = 0, process_index: int = 0,
                  process_count: int = 1) -> tuple[tf.data.Dataset, int]:
  """The endless training stream from ``start_step`` on, and the process's examples per epoch.

  Yields ``{'image': uint8 BxHxWxC, 'label': int32 B}`` with B = ``local_batch_size``: rows
  ``[process_index * B, (process_index + 1) * B)`` of each global batch of
  ``B * process_count`` rows, which is the same whatever ``process_count`` is.
  """
  info.check_flips(data)
  global_batch = local_batch_size * process_count
  shards = info.read_shards(data)
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
  fuse = (not data.cache and pp.fuses_with_decoding(data.train_preprocess)
          and sources.can_defer_decoding(data))
  # Uncached image folders shuffle file paths and decode after: no shuffle buffer of images to
  # fill before the first step (decoded images only where cached).
  late = None if data.cache else sources.path_decoder(data, data.train_split)
  augment = (pp.compose(data.train_preprocess,
                        decode_channels=sources.describe(data).channels if fuse else None)
             if data.train_preprocess or fuse else None)
  parts, per_epoch = [], 0
  for shard in range(lo // chunk, (hi - 1) // chunk + 1):
    rows = (max(lo, shard * chunk) - shard * chunk, min(hi, (shard + 1) * chunk) - shard * chunk)
    part, n = _slice_stream(data, augment, decode=not fuse and late is None, late=late,
                            seed=int(seed), shard=shard, shards=shards, chunk=chunk, rows=rows,
                            start_step=start_step)
    parts.append(part)
    per_epoch = n * shards // process_count
  if len(parts) == 1:
    ds = parts[0]
  else:
    ds = tf.data.Dataset.zip(tuple(parts)).map(
        lambda *bs: {k: tf.concat([b[k] for b in bs], 0) for k in bs[0]})
  ds = ds.prefetch(data.prefetch)
  return ds.with_options(_options()), per_epoch


def _slice_stream(data: ml_collections.ConfigDict, augment: Any, *, decode: bool, late: Any,
                  seed: int, shard: int, shards: int, chunk: int, rows: tuple[int, int],
                  start_step: int) -> tuple[tf.data.Dataset, int]:
  """Rows ``[rows[0], rows[1])`` of slice ``shard``'s ``chunk`` of each global batch, batched."""
  base = sources.read(data, data.train_split, shard, shards, drop_remainder=True, decode=decode)
  n = sources.count(base)
  if n < chunk:
    held = float(data.get('validation_fraction', 0.0) or 0.0)
    raise UserError(f'The training split has {n * shards} examples, fewer than the global batch '
                    f'of {chunk * shards}; lower config.batch_size'
                    + (f' or config.data.validation_fraction={held}, which holds part of it out.'
                       if held > 0 and folder_layout.is_folder(data) else '.'))
  buffer = int(max(1, min(n, data.shuffle_buffer // shards)))

  def epoch(e):
    d = base.shuffle(buffer, seed=(tf.cast(seed * 1_000_003, tf.int64) + e) * shards + shard,
                     reshuffle_each_iteration=False)
    return d.enumerate().map(lambda i, ex: (e, i, ex))

  if data.get('balanced_sampling', False):
    ds = _balanced_stream(base, n, seed=seed, shard=shard, buffer=int(data.shuffle_buffer),
                          cache=bool(data.cache)).skip(start_step * chunk)
  else:
    start_epoch, offset = divmod(start_step * chunk, n)
    ds = tf.data.Dataset.range(start_epoch, 2**62).flat_map(epoch).skip(offset)
  first, last = rows
  if (first, last) != (0, chunk):  # keep only this process's rows before any augmentation work
    def mine(j, _):
      return tf.logical_and(j % chunk >= first, j % chunk < last)

    def drop_index(_, item):
      return item

    ds = ds.enumerate().filter(mine).map(drop_index)
  if late is not None:  # paths were shuffled: decode the rows this process keeps
    ds = ds.map(lambda e, i, ex: (e, i, late(ex)), num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True)

  if augment is None:  # nothing to do per example: batch first, then drop the indices per batch
    check_fixed_size(ds.map(lambda e, i, ex: ex), data, 'train_preprocess', data.train_split)
    ds = ds.batch(last - first, drop_remainder=True).map(lambda e, i, ex: _train_row(ex))
    return ds, n

  def preprocess(e, i, ex):
    ex_seed = tf.stack([tf.cast(seed, tf.int64), (e * n + i) * shards + shard])
    return _train_row(ex, augment(ex['image'], ex_seed))

  ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  check_fixed_size(ds, data, 'train_preprocess', data.train_split)
  return ds.batch(last - first, drop_remainder=True), n


def epoch_order(data: ml_collections.ConfigDict, seed: int, epoch: int, n: int) -> np.ndarray:
  """Positions of epoch ``epoch``: the permutation of ``0..n-1`` the plain stream applies (the same
  tf.data shuffle, seed and buffer as ``_slice_stream`` with one read shard), for a split held as
  arrays (``data/resident.py``)."""
  buffer = int(max(1, min(n, data.shuffle_buffer)))
  order = tf.data.Dataset.range(n).shuffle(
      buffer, seed=tf.constant(seed * 1_000_003 + epoch, tf.int64),
      reshuffle_each_iteration=False).batch(n)
  return next(iter(order)).numpy()


def _balanced_stream(base: tf.data.Dataset, n: int, *, seed: int, shard: int, buffer: int,
                     cache: bool) -> tf.data.Dataset:
  """Class-balanced ``(epoch, index, example)`` stream: position j draws a class uniformly
  (stateless, seeded by ``(seed, shard, j)``) and takes the next example of that class's own
  endless shuffled stream. Positions count "epochs" of ``n`` examples for the augmentation seeds.
  A pure function of the seed, so a resumed run rebuilds it and skips to its step.

  Each class's stream is the split filtered to that class; with ``cache`` (``data.cache``) the
  filtered examples are cached, so a rare class costs its own size per pass, not the split's
  (uncached, a class of n_k examples re-reads the split every n_k draws)."""
  labels = np.concatenate([b for b in base.map(lambda ex: ex['label']).batch(8192)
                           .as_numpy_iterator()]) if n else np.zeros(0, np.int64)
  if labels.ndim != 1:
    raise UserError('config.data.balanced_sampling is for single-label data; for multi-label '
                    'runs weigh rare tags with config.loss.pos_weight.')
  present = sorted(int(k) for k in np.unique(labels))
  def only(k):
    d = base.filter(lambda ex: tf.equal(tf.cast(ex['label'], tf.int64), k))
    return d.cache() if cache else d

  streams = [only(k).repeat()
             .shuffle(int(max(1, min(buffer, np.sum(labels == k)))),
                      seed=(seed * 1_000_003 + k) * 7919 + shard, reshuffle_each_iteration=True)
             for k in present]
  key = tf.constant([seed, shard], tf.int64)

  def pick(j):
    return tf.random.stateless_uniform([], seed=tf.stack([key[0] * 1_000_003 + key[1], j]),
                                       maxval=len(present), dtype=tf.int64)

  choice = tf.data.Dataset.range(0, 2**62).map(pick)
  chosen = tf.data.Dataset.choose_from_datasets(streams, choice)
  return chosen.enumerate().map(lambda j, ex: (j // n, j % n, ex))


def _train_row(ex: dict[str, tf.Tensor], image: tf.Tensor | None = None) -> dict[str, tf.Tensor]:
  """What the train step gets: image, label, and (image folders) ``mask``: False for a file that
  failed to decode, whose row the loss ignores."""
  row = {'image': ex['image'] if image is None else image, 'label': ex['label']}
  if 'valid' in ex:
    row['mask'] = ex['valid']
  return row


def check_fixed_size(ds: tf.data.Dataset, data: ml_collections.ConfigDict, key: str,
                     split: str = '', info: info_lib.DatasetInfo | None = None) -> None:
  """Batching needs one image size: a preprocessing spec must end images at a fixed size (an
  image folder's ``split`` named: an example file of each size is named)."""
  shape = ds.element_spec['image'].shape
  if not shape.is_fully_defined():
    seen = sources.size_examples(data, split, info) if split else ''
    raise UserError(f"Images of '{data.name}' differ in size{f' ({seen})' if seen else ''} "
                    f"after config.data.{key}="
                    f"'{data.get(key)}'; add an op that fixes the size, e.g. "
                    "'random_resized_crop(size=224)' for training or 'center_crop(size=224)' / "
                    "'resize(size=224)' for evaluation.")


class EvalData:
  """One split for evaluation; iterate ``batches()`` each time (cached after the first pass)."""

  def __init__(self, data: ml_collections.ConfigDict, split: str, *, local_batch_size: int,
               process_index: int = 0, process_count: int = 1,
               split_size: int | None = None, info: info_lib.DatasetInfo | None = None,
               with_head: bool = False):
    self.split = split
    self.local_batch_size = local_batch_size
    self._args = (data, split, local_batch_size, process_index, process_count, info)
    self._head: EvalData | None = None
    self.examples_read = 0   # (batches() counts them)
    # ``info``: a trained run's classes and channels (evaluating it on another image folder).
    ds = sources.read(data, split, process_index, process_count, drop_remainder=False, info=info)
    preprocess = pp.compose(data.eval_preprocess)
    seed0 = tf.zeros([2], tf.int64)
    def row(ex):
      out = {'image': preprocess(ex['image'], seed0), 'label': ex['label']}
      if 'valid' in ex:  # image folders: False for a file that failed to decode
        out['valid'] = ex['valid']
      return out
    ds = ds.map(row, num_parallel_calls=tf.data.AUTOTUNE)
    check_fixed_size(ds, data, 'eval_preprocess', split, info)
    self._ds = ds.batch(local_batch_size).prefetch(data.prefetch).with_options(_options())
    # Every process must run the same number of eval steps: pad with empty batches up to the
    # largest process's count (known from the split size, when tfds knows it).
    self.num_batches = (math.ceil(math.ceil(split_size / process_count) / local_batch_size)
                        if split_size else None)
    # ``with_head``: build head_batches' pipeline now, with the rest of a run's set-up, not at its
    # first evaluation (a run builds no dataset while its checkpoints are being written).
    if with_head:
      self._head = self._uncached()

  def _uncached(self) -> 'EvalData':
    data, split, batch, index, count, info = self._args
    if not data.get('cache', False):
      return self
    uncached = ml_collections.ConfigDict(data.to_dict())
    uncached.cache = False
    return EvalData(uncached, split, local_batch_size=batch, process_index=index,
                    process_count=count, info=info)

  def head_batches(self, num_batches: int) -> Iterator[Batch]:
    """The first ``num_batches`` of ``batches()`` (``config.eval_subset``), read without the cache:
    a partial pass over a cached split must not touch the cache (tf.data can keep the partial
    cache: a later full pass then saw 17 of 64 examples)."""
    if self._head is None:
      self._head = self._uncached()
    return itertools.islice(self._head.batches(), num_batches)

  def batches(self) -> Iterator[Batch]:
    """Batches of exactly ``local_batch_size`` with a boolean ``mask`` of real examples;
    ``examples_read`` counts this process's examples read so far in the pass (an undecodable
    file's masked row included, the padding not): where the next process's part of the split
    starts, relative to this one's."""
    emitted = self.examples_read = 0
    template: Batch | None = None
    for batch in tfds.as_numpy(self._ds):
      real = len(batch['label'])
      template = batch
      self.examples_read += real
      yield _pad(batch, self.local_batch_size, real)
      emitted += 1
    while self.num_batches is not None and emitted < self.num_batches and template is not None:
      yield _pad(template, self.local_batch_size, 0)
      emitted += 1


def samples(data: ml_collections.ConfigDict, info: info_lib.DatasetInfo, *, eval_count: int = 64,
            train_count: int = 256) -> dict[str, np.ndarray]:
  """The first images of the eval and train splits, eval-preprocessed (uint8 NxHxWxC), with their
  labels: what a run directory keeps so its export can be checked (and int8-calibrated) after the
  data is gone."""
  data = ml_collections.ConfigDict(data.to_dict())
  data.cache = False  # a partial pass over a cached dataset would only be thrown away
  out: dict[str, np.ndarray] = {}
  for name, split, n in (('eval', data.eval_split, eval_count), ('train', data.train_split,
                                                                  train_count)):
    images, labels = [], []
    for batch in EvalData(data, split, local_batch_size=min(n, 64), info=info).batches():
      images.append(batch['image'][batch['mask']])
      labels.append(batch['label'][batch['mask']])
      if sum(map(len, labels)) >= n:
        break
    out[f'{name}_images'] = np.concatenate(images)[:n]
    out[f'{name}_labels'] = np.concatenate(labels)[:n].astype(np.int32)
  return out


def _pad(batch: Batch, size: int, real: int) -> Batch:
  out: dict[str, Any] = {}
  for k, v in batch.items():
    v = v[:real]
    pad = np.zeros((size - real,) + v.shape[1:], v.dtype)
    out[k] = np.concatenate([v, pad]) if real < size else v
  out['mask'] = np.arange(size) < real
  if 'valid' in out:  # a file that failed to decode is not an example
    out['mask'] &= out.pop('valid').astype(bool)
  return out
