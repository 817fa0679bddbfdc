"""The user's own images (an image folder or a CSV manifest; ``folder_index.py``) as a tf.data
source.

Selected with ``config.data.name = 'image_folder'`` and ``config.data.folder`` (or
``config.data.manifest``). Images of any size, mode (grey, RGB, RGBA, palette, 16-bit) and format
PIL reads (``images.IMAGE_EXTENSIONS``: JPEG, PNG, GIF, BMP, WebP, TIFF, PNM) are decoded by the
same function as ``--mode=predict`` and ``--mode=serve`` use (``images.decode``: EXIF orientation
applied, so a portrait phone photo trains upright), to one channel count for the whole dataset: 1
when every training image is grey, else 3 (grey replicated, alpha dropped).

A file that fails to decode here (found after the index was built) is logged once and becomes a
blank image with ``valid = False``: its row is masked out of the loss (training) or of the counts
(evaluation), and every other row of the batch keeps its image, so exact resume still holds.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable

import numpy as np

from imgcls_jax.data.tf_import import tf
from imgcls_jax.data import folder_index, folder_layout
from imgcls_jax.data.images import UnreadableImage, decode

NAME = folder_layout.NAME
_FAILED: set[str] = set()
_FAILED_LOCK = threading.Lock()


is_folder = folder_layout.is_folder


def channels(train: folder_index.Split) -> int:
  """1 when every training image is grey (1 or 2 channels), else 3."""
  return 1 if train.channels_found <= {1, 2} else 3


def image_shape(splits: list[folder_index.Split], num_channels: int) -> tuple[int | None, int | None, int]:
  """H, W, C of the decoded images of ``splits``: (None, None, C) unless all share one size."""
  sizes = set().union(*(s.sizes_found for s in splits))
  if len(sizes) != 1:
    return None, None, num_channels
  (h, w), = sizes
  return h, w, num_channels


def size_examples(split: folder_index.Split, shown: int = 3) -> str:
  """An example file of each image size in ``split`` (the commonest first), for a message:
  ``'train/cat/a.jpg is 30x20 pixels (width x height), train/dog/b.png 25x40 and 6 more
  sizes'``; '' when they share one size."""
  first = dict(split.size_examples)
  if len(first) < 2:
    return ''
  (h, w), rel = next(iter(first.items()))
  listed = [f'{rel} is {w}x{h} pixels (width x height)'] + [
      f'{rel} {w}x{h}' for (h, w), rel in list(first.items())[1:shown]]
  more = f' and {len(first) - shown} more sizes' if len(first) > shown else ''
  return ', '.join(listed) + more


def even_slice(n: int, index: int, count: int, drop_remainder: bool) -> tuple[int, int]:
  """[start, end) of part ``index`` of ``count`` contiguous parts of ``n`` items (as tfds.even_splits)."""
  if drop_remainder:
    per = n // count
    return index * per, (index + 1) * per
  per, extra = divmod(n, count)
  start = index * per + min(index, extra)
  return start, start + per + (1 if index < extra else 0)


def _decoder(num_channels: int, blank_hw: tuple[int, int]):
  def load(path: bytes) -> tuple[np.ndarray, np.bool_]:
    try:
      return decode(path.decode(), channels=num_channels), np.bool_(True)
    except UnreadableImage as e:
      name = path.decode()
      with _FAILED_LOCK:
        first = name not in _FAILED
        _FAILED.add(name)
      if first:
        logging.warning('%s is %s; it is masked out wherever it is drawn.', name, e)
      return np.zeros((*blank_hw, num_channels), np.uint8), np.bool_(False)
  return load


def decoder(split: folder_index.Split, num_channels: int) -> Callable[[dict], dict]:
  """A tf.data map: ``'image'`` (a file path) -> the decoded uint8 image, plus ``'valid'``."""
  load = _decoder(num_channels, split.typical_hw)
  # One size for every image of the split (the index read it from each header): say so.
  fixed_hw = next(iter(split.sizes_found)) if len(split.sizes_found) == 1 else (None, None)

  def read(ex: dict) -> dict:
    image, valid = tf.numpy_function(load, [ex['image']], [tf.uint8, tf.bool], stateful=False)
    image.set_shape([*fixed_hw, num_channels])
    valid.set_shape([])
    return {**ex, 'image': image, 'valid': valid}
  return read


def labels_array(split: folder_index.Split, lo: int = 0, hi: int | None = None) -> np.ndarray:
  """Labels of images ``lo:hi``: int64 class indices, or (multi-label: tuples of tags) uint8
  multi-hot rows of width K."""
  labels = split.labels[lo:hi]
  if labels and isinstance(labels[0], tuple):
    out = np.zeros((len(labels), len(split.counts)), np.uint8)
    for row, tags in enumerate(labels):
      out[row, list(tags)] = 1
    return out
  if not labels and split.labels and isinstance(split.labels[0], tuple):
    return np.zeros((0, len(split.counts)), np.uint8)
  return np.asarray(labels, np.int64)


def dataset(split: folder_index.Split, num_channels: int, *, process_index: int = 0,
            process_count: int = 1, drop_remainder: bool = False,
            decode: bool = True) -> tf.data.Dataset:
  """``{'image': uint8 HxWxC, 'label': int64, 'tfds_id': id, 'valid': bool}`` per image of this
  process's contiguous part of ``split``; with ``decode=False`` 'image' is the file's path (decode
  later with ``decoder``: after shuffling, a training stream then shuffles paths, not images)."""
  lo, hi = even_slice(len(split), process_index, process_count, drop_remainder)
  ds = tf.data.Dataset.from_tensor_slices({
      'image': tf.constant(list(split.paths[lo:hi]), tf.string),
      'tfds_id': tf.constant(list(split.ids[lo:hi]), tf.string),
      'label': tf.constant(labels_array(split, lo, hi))})
  if not decode:
    return ds
  return ds.map(decoder(split, num_channels), num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True)
