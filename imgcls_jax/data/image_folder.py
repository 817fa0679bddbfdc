"""The user's own images: ``root/<split>/<class>/*.jpg`` (any of ``images.IMAGE_EXTENSIONS``) as a
tf.data source.

Selected with ``config.data.name = 'image_folder'`` and ``config.data.folder = root``. Classes are
the sub-directories of the training split, sorted by name (their names travel with checkpoints).
Images of any size and mode (grey, RGB, RGBA, palette) are decoded by TensorFlow to one channel
count for the whole dataset: 1 when every image is grey, else 3 (grey is replicated, alpha dropped).

Every file is decoded once when a split is first scanned (in parallel, by the same decoder that
training uses); files that are not images or cannot be decoded (e.g. WebP and TIFF, which
TensorFlow does not read) are skipped and reported by count and name, never a crash. A missing split, a split without class folders and a class without
readable images are clear errors. Examples are listed in a fixed shuffled order (so even a small
shuffle buffer mixes classes) and carry their path relative to ``root`` as ``tfds_id``.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import threading

import numpy as np
import tensorflow as tf

from imgcls_jax.data.images import is_image_file
from imgcls_jax.errors import UserError

NAME = 'image_folder'
_SHOWN = 10  # skipped file names listed in the warning


@dataclasses.dataclass(frozen=True)
class Split:
  """The readable images of one split and what was skipped."""
  root: str
  split: str
  paths: tuple[str, ...]                    # absolute, in the fixed shuffled order
  labels: tuple[int, ...]
  channels_found: frozenset[int]            # channel counts of the decoded images
  sizes_found: frozenset[tuple[int, int]]   # (height, width) of the decoded images
  skipped: tuple[tuple[str, str], ...]      # (path relative to root, reason)

  def __len__(self) -> int:
    return len(self.paths)


_CACHE: dict[tuple[str, str, tuple[str, ...]], Split] = {}
_LOCK = threading.Lock()


def is_folder(data) -> bool:
  """True when ``config.data`` selects an image folder."""
  return data.name == NAME


def root_of(data) -> str:
  root = data.get('folder') or ''
  if not root:
    raise UserError("config.data.name is 'image_folder' but config.data.folder is not set; set it "
                    'to the root directory holding <split>/<class>/*.jpg.')
  root = os.path.abspath(os.path.expanduser(root))
  if not os.path.isdir(root):
    raise UserError(f'The image folder {root} (config.data.folder) does not exist; point '
                    'config.data.folder at the directory holding <split>/<class>/*.jpg.')
  return root


def _split_dir(root: str, split: str) -> str:
  if not split or any(ch in split for ch in '[]+@/'):
    raise UserError(f"Image-folder splits are plain directory names under {root}, got '{split}'; "
                    'set config.data.train_split / eval_split to e.g. train and test.')
  path = os.path.join(root, split)
  if not os.path.isdir(path):
    found = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    raise UserError(f"Split '{split}' does not exist in the image folder {root} (found: "
                    f"{', '.join(found) or 'no sub-directories'}); create {path}/<class>/ or set "
                    'config.data.train_split / eval_split.')
  return path


def class_names(root: str, train_split: str) -> tuple[str, ...]:
  """The class sub-directories of the training split, sorted."""
  path = _split_dir(root, train_split)
  names = sorted(d for d in os.listdir(path)
                 if os.path.isdir(os.path.join(path, d)) and not d.startswith('.'))
  if not names:
    raise UserError(f'The training split {path} has no class sub-directories; put the images in '
                    f'{path}/<class name>/.')
  return tuple(names)


def _decodable(paths: list[str]) -> dict[int, tuple[int, int, int]]:
  """index -> decoded (height, width, channels), for every path TensorFlow decodes (others are
  absent)."""
  if not paths:
    return {}

  def probe(i, path):
    image = tf.io.decode_image(tf.io.read_file(path), expand_animations=False)
    return i, tf.shape(image)

  ds = tf.data.Dataset.from_tensor_slices(paths).enumerate()
  ds = ds.map(probe, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors(log_warning=False)
  return {int(i): tuple(int(d) for d in shape) for i, shape in ds.as_numpy_iterator()}


def scan(root: str, split: str, names: tuple[str, ...]) -> Split:
  """Lists and decodes every file of ``root/split`` once per process (memoised)."""
  key = (root, split, names)
  with _LOCK:
    if key in _CACHE:
      return _CACHE[key]
  split_dir = _split_dir(root, split)
  extra = sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d))
                 and not d.startswith('.') and d not in names)
  if extra:
    raise UserError(f"Split '{split}' of {root} has classes the training split lacks "
                    f"({', '.join(extra[:5])}); every class folder must exist in the training split.")
  candidates, labels, skipped = [], [], []
  for label, name in enumerate(names):
    class_dir = os.path.join(split_dir, name)
    if not os.path.isdir(class_dir):
      continue
    for dirpath, dirnames, filenames in os.walk(class_dir):
      dirnames.sort()
      for f in sorted(filenames):
        path = os.path.join(dirpath, f)
        if f.startswith('.'):
          continue
        if not is_image_file(f):
          skipped.append((os.path.relpath(path, root), 'not an image file'))
          continue
        candidates.append(path)
        labels.append(label)
  ok = _decodable(candidates)
  for i, path in enumerate(candidates):
    if i not in ok:
      skipped.append((os.path.relpath(path, root), 'cannot be decoded'))
  keep = [i for i in range(len(candidates)) if i in ok]
  counts = np.bincount([labels[i] for i in keep], minlength=len(names))
  empty = [names[k] for k in range(len(names)) if counts[k] == 0 and
           os.path.isdir(os.path.join(split_dir, names[k]))]
  if empty:
    raise UserError(f"Class folder(s) {', '.join(empty[:5])} of split '{split}' in {root} hold no "
                    'readable images; add images or remove the folder(s).')
  if not keep:
    raise UserError(f"Split '{split}' of the image folder {root} has no readable images.")
  order = np.random.RandomState(0).permutation(len(keep))
  keep = [keep[j] for j in order]
  if skipped:
    shown = ', '.join(f'{p} ({why})' for p, why in skipped[:_SHOWN])
    more = f' and {len(skipped) - _SHOWN} more' if len(skipped) > _SHOWN else ''
    logging.warning("Image folder %s, split '%s': skipped %d file(s): %s%s.", root, split,
                    len(skipped), shown, more)
  result = Split(root=root, split=split, paths=tuple(candidates[i] for i in keep),
                 labels=tuple(labels[i] for i in keep),
                 channels_found=frozenset(ok[i][2] for i in keep),
                 sizes_found=frozenset(ok[i][:2] for i in keep), skipped=tuple(skipped))
  with _LOCK:
    _CACHE[key] = result
  return result


def channels(train: Split) -> int:
  """1 when every training image is grey (1 or 2 channels), else 3."""
  return 1 if train.channels_found <= {1, 2} else 3


def image_shape(splits: list[Split], num_channels: int) -> tuple[int | None, int | None, int]:
  """H, W, C of the decoded images of ``splits``: (None, None, C) unless all share one size."""
  sizes = set().union(*(s.sizes_found for s in splits))
  if len(sizes) != 1:
    return None, None, num_channels
  (h, w), = sizes
  return h, w, num_channels


def even_slice(n: int, index: int, count: int, drop_remainder: bool) -> tuple[int, int]:
  """[start, end) of part ``index`` of ``count`` contiguous parts of ``n`` items (as tfds.even_splits)."""
  if drop_remainder:
    per = n // count
    return index * per, (index + 1) * per
  per, extra = divmod(n, count)
  start = index * per + min(index, extra)
  return start, start + per + (1 if index < extra else 0)


def dataset(split: Split, num_channels: int, *, process_index: int = 0, process_count: int = 1,
            drop_remainder: bool = False, decode: bool = True) -> tf.data.Dataset:
  """``{'image': uint8 HxWxC, 'label': int64, 'tfds_id': path relative to root}`` per image
  (with ``decode=False``, 'image' is the file's encoded bytes)."""
  lo, hi = even_slice(len(split), process_index, process_count, drop_remainder)
  paths = list(split.paths[lo:hi])
  ids = [os.path.relpath(p, split.root) for p in paths]
  ds = tf.data.Dataset.from_tensor_slices({
      'path': tf.constant(paths, tf.string), 'tfds_id': tf.constant(ids, tf.string),
      'label': tf.constant(np.asarray(split.labels[lo:hi], np.int64))})

  def load(ex):
    image = tf.io.read_file(ex['path'])
    if decode:
      image = tf.io.decode_image(image, channels=num_channels, expand_animations=False,
                                 dtype=tf.uint8)
      image.set_shape([None, None, num_channels])
    return {'image': image, 'label': ex['label'], 'tfds_id': ex['tfds_id']}
  return ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
