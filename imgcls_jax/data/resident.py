"""The training split as in-memory arrays, in the training stream's exact order
(``config.data.device_resident``).

For a small dataset (Fashion-MNIST's 60,000 training images are 47 MB) the whole split can live on
the devices: each step then gathers its batch there from a vector of indices, and no host pipeline
runs beside training (on a 2-core CPU the tf.data threads share the cores with the step). The
order is the plain stream's (``data/pipeline.py``): epoch ``e`` is the split shuffled by the same
tf.data shuffle with the same seed, buffer and size, applied here to the indices ``0..n-1`` (a
shuffle's order depends on its seed, buffer and length, never on the elements). So a resident run
trains on exactly the batches of a streamed one, resumes at any step like it, and can be checked
against it bit for bit. An arrays file (``data/arrays.py``) is already arrays: its split and its
numpy order come from there (``reader.resident_split``), without TensorFlow.

What it needs: one process, one read shard, no host augmentation (``data.train_preprocess=''``:
augment on the device with ``data.device_preprocess``), no class-balanced sampling, and a split of
fixed-size images whose arrays fit ``data.device_resident_max_mb``.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import ml_collections
import numpy as np

from imgcls_jax.data import info
from imgcls_jax.errors import UserError


def enabled(data: ml_collections.ConfigDict) -> bool:
  """``data.device_resident`` (absent in older runs' configs: False)."""
  return bool(data.get('device_resident', False))


def check(data: ml_collections.ConfigDict, process_count: int) -> None:
  """Raises a UserError naming the setting that a resident training split cannot honour."""
  fix = 'or set config.data.device_resident=False'
  if process_count != 1:
    raise UserError(f'config.data.device_resident=True runs in one process (this run has '
                    f'{process_count}); {fix}.')
  if info.read_shards(data) != 1:
    raise UserError(f'config.data.device_resident=True reads the split as one slice; set '
                    f'config.data.read_shards=1 {fix}.')
  if data.get('balanced_sampling', False):
    raise UserError(f'config.data.device_resident=True keeps the plain shuffled order; set '
                    f'config.data.balanced_sampling=False {fix}.')
  if data.train_preprocess:
    raise UserError(
        f"config.data.device_resident=True holds the decoded images, so host augmentation "
        f"(config.data.train_preprocess='{data.train_preprocess}') cannot run per step; set it to "
        f"'' and augment on the device with config.data.device_preprocess (e.g. "
        f"'flip_alternate|translate(pad=2)') {fix}.")


@dataclasses.dataclass(frozen=True)
class TrainArrays:
  """The training split in its stored order: uint8 ``N x H x W x C`` images and their labels."""
  images: np.ndarray
  labels: np.ndarray

  @property
  def num_examples(self) -> int:
    return int(self.labels.shape[0])


def load(data: ml_collections.ConfigDict) -> TrainArrays:
  """Reads the whole training split into arrays (the order ``pipeline.train_dataset`` shuffles)."""
  from imgcls_jax.data import pipeline, sources  # tf.data sources (arrays files: data/arrays.py)
  check(data, 1)
  base = sources.read(data, data.train_split, 0, 1, drop_remainder=True)
  if set(base.element_spec) != {'image', 'label'}:
    raise UserError(f"config.data.device_resident=True needs images that all decode; "
                    f"'{data.name}' may hold unreadable files (they are masked out when streamed): "
                    'set config.data.device_resident=False.')
  pipeline.check_fixed_size(base, data, 'train_preprocess')
  shape = base.element_spec['image'].shape
  check_size(data, sources.count(base) * int(np.prod(shape)))
  images, labels = [], []
  for batch in base.batch(8192).as_numpy_iterator():
    images.append(batch['image'])
    labels.append(batch['label'])
  return TrainArrays(images=np.concatenate(images), labels=np.concatenate(labels))


def check_size(data: ml_collections.ConfigDict, nbytes: int) -> None:
  """Raises a UserError when ``nbytes`` of training images exceed
  ``config.data.device_resident_max_mb``."""
  limit_mb = float(data.get('device_resident_max_mb', 1024))
  size_mb = nbytes / 2**20
  if size_mb > limit_mb:
    raise UserError(f"The training split of '{data.name}' takes {size_mb:.3g} MB as arrays, more "
                    f'than config.data.device_resident_max_mb={limit_mb:g}; raise that limit if '
                    'the devices hold it, or set config.data.device_resident=False.')


class Order:
  """Split indices for stream positions (examples counted from step 0), epoch orders cached;
  ``epoch_order(e)`` is the permutation of ``0..n-1`` that epoch ``e`` reads."""

  def __init__(self, epoch_order: Callable[[int], np.ndarray], n: int):
    self.epoch_order, self.n = epoch_order, n
    self._epochs: dict[int, np.ndarray] = {}

  @classmethod
  def of_stream(cls, data: ml_collections.ConfigDict, seed: int, n: int) -> 'Order':
    """The order of the tf.data stream (``pipeline.train_dataset``) of a tfds dataset or folder."""
    from imgcls_jax.data import pipeline  # tf.data
    return cls(lambda e: pipeline.epoch_order(data, int(seed), e, n), n)

  def epoch(self, e: int) -> np.ndarray:
    if e not in self._epochs:
      for old in [k for k in self._epochs if k < e - 1]:
        del self._epochs[old]
      self._epochs[e] = self.epoch_order(e)
    return self._epochs[e]

  def indices(self, first: int, count: int) -> np.ndarray:
    """Split indices (int32) of stream positions ``first .. first + count - 1`` (a batch may
    straddle two epochs, as in the stream)."""
    out = np.empty(count, np.int32)
    pos = first
    while pos < first + count:
      e, offset = divmod(pos, self.n)
      take = min(self.n - offset, first + count - pos)
      out[pos - first:pos - first + take] = self.epoch(e)[offset:offset + take]
      pos += take
    return out
